"""The API's bearer token: created once, at the server's first start, in a file only the user can read.

Every API endpoint but /health needs it, so another user on the machine, or a web page the user visits,
cannot drive the server. The CLI reads the same file. A worker on another machine gets it from
STIGMER_API_TOKEN.
"""

from __future__ import annotations

import os

from stigmer.fsutil import atomic_write
from stigmer.paths import Paths

ENV = "STIGMER_API_TOKEN"


def token_path(paths: Paths) -> str:
    return str(paths.home / "api.token")


def ensure_token(paths: Paths) -> str:
    """The token, created (0600) when there is none yet."""
    current = read_token(paths)
    if current:
        return current
    import secrets

    paths.ensure_home()
    token = secrets.token_urlsafe(32)
    atomic_write(paths.home / "api.token", token.encode())
    return token


def read_token(paths: Paths) -> str | None:
    if os.environ.get(ENV):
        return os.environ[ENV]
    try:
        return (paths.home / "api.token").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def same(given: str, expected: str) -> bool:
    """Constant-time comparison: the answer time must not tell how much of a guess was right."""
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())

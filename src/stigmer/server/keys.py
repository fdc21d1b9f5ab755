"""The server's secrets besides the API token, each created once in a file only the user can read:

  payload.key    AES-256 key of the payload codec: what crosses Temporal (inputs, results, signals,
                 failures) is encrypted with it, so Temporal's history is unreadable without it
  worker.token   what a worker shows the API: it may claim executions and post their events, and
                 nothing else (not the admin API)

A worker on another machine gets them from STIGMER_PAYLOAD_KEY and STIGMER_WORKER_TOKEN.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths

PAYLOAD_KEY_ENV = "STIGMER_PAYLOAD_KEY"
WORKER_TOKEN_ENV = "STIGMER_WORKER_TOKEN"


def payload_key_file(paths: Paths) -> Path:
    return paths.home / "payload.key"


def worker_token_file(paths: Paths) -> Path:
    return paths.home / "worker.token"


def _create_once(path: Path, value: str) -> str:
    """Write `value` unless the file exists; two processes starting at once end up with the same one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path) or value
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    return value


def _read(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8").strip() or None
    return None


def _value(paths: Paths, env: str, path: Path) -> str | None:
    return os.environ.get(env) or _read(path)


def ensure_keys(paths: Paths) -> None:
    """Create the payload key and the worker token when they are missing (the daemon, before its services)."""
    if not _value(paths, PAYLOAD_KEY_ENV, payload_key_file(paths)):
        _create_once(payload_key_file(paths), base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    if not _value(paths, WORKER_TOKEN_ENV, worker_token_file(paths)):
        _create_once(worker_token_file(paths), secrets.token_urlsafe(32))


def worker_token(paths: Paths) -> str | None:
    return _value(paths, WORKER_TOKEN_ENV, worker_token_file(paths))


def payload_key(paths: Paths) -> bytes:
    """The 32-byte codec key. Missing or malformed: an error saying where it comes from."""
    raw = _value(paths, PAYLOAD_KEY_ENV, payload_key_file(paths))
    where = PAYLOAD_KEY_ENV if os.environ.get(PAYLOAD_KEY_ENV) else str(payload_key_file(paths))
    if not raw:
        raise StigmerError(
            f"Stigmer's payload key is missing ({where}).",
            hint="Start the server once (stigmer server) to create it; a worker on another machine needs "
            f"the server's key in {PAYLOAD_KEY_ENV}.",
            code=ErrorCode.CONFIG_INVALID,
        )
    try:
        key = base64.urlsafe_b64decode(raw.encode())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise StigmerError(
            f"Stigmer's payload key in {where} is not valid (expected 32 bytes, base64).",
            hint=f"Copy it again from the server's {payload_key_file(paths).name}.",
            code=ErrorCode.CONFIG_INVALID,
        )
    return key


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key: tells a worker whether it holds the server's key."""
    return hashlib.sha256(b"stigmer-payload-key\0" + key).hexdigest()[:16]

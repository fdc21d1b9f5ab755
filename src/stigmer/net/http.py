"""Small HTTP helpers on the standard library (fast to import; urllib honours proxy variables).

Calls to our own local servers bypass proxies: a corporate HTTP_PROXY must never see loopback traffic.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from stigmer import __version__

USER_AGENT = f"stigmer/{__version__}"
DEFAULT_TIMEOUT = 30.0

_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_proxied: urllib.request.OpenerDirector | None = None


def opener(*, local: bool) -> urllib.request.OpenerDirector:
    """A direct opener for our local servers, the environment's proxies for everything else."""
    global _proxied
    if local:
        return _direct
    if _proxied is None:
        _proxied = urllib.request.build_opener()  # ProxyHandler() reads *_proxy / NO_PROXY
    return _proxied


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def redact(url: str) -> str:
    """Drop query and credentials (signed CDN URLs carry tokens) before a URL is logged or shown."""
    p = urlsplit(url)
    netloc = p.hostname or ""
    if p.port:
        netloc += f":{p.port}"
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


def request(
    url: str,
    *,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """Open a request; the caller reads and closes the response (an http.client.HTTPResponse)."""
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    return opener(local=is_loopback(url)).open(req, timeout=timeout)


def get_json(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    with request(url, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def stream_lines(url: str, body: Any, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[dict[str, Any]]:
    """POST and yield each JSON line of an ndjson answer as it arrives."""
    with request(url, method="POST", body=body, timeout=timeout) as resp:
        for raw in resp:
            line = raw.strip()
            if line:
                yield json.loads(line)


def error_body(err: urllib.error.HTTPError) -> str:
    """The `error` field of a JSON error answer, else its text."""
    try:
        raw = err.read()
    except OSError:
        return ""
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except ValueError:
        pass
    return raw.decode("utf-8", "replace").strip()[:200]


def is_unreachable(exc: BaseException) -> bool:
    """True for failures that mean 'no network / nothing listening', as opposed to a bad answer."""
    if isinstance(exc, urllib.error.HTTPError):
        return False
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    return isinstance(exc, ConnectionError | socket.gaierror | TimeoutError | socket.timeout | OSError)


def describe(exc: BaseException) -> str:
    """A short human reason for a network failure ("connection refused", "name not resolved")."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "host name could not be resolved"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(reason, ConnectionResetError):
        return "connection reset"
    text = getattr(reason, "strerror", None) or str(reason)
    return str(text).lower()

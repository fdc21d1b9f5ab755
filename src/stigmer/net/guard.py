"""Refuse requests that a web page, rather than a program on this machine, could have sent.

A server on 127.0.0.1 is still reachable from the user's browser: a page can send "simple" requests
(a POST with Content-Type text/plain needs no preflight), and with DNS rebinding a page on
evil.example can even read the answers, since its requests then carry `Host: evil.example`. So, as
Ollama does, a request is refused with 403 before it reaches any handler when:
  - its Host header is not a loopback name or address (localhost, 127.0.0.0/8, ::1), or
  - it carries an Origin that is neither this machine's (http(s)://localhost or a loopback IP, any
    port) nor in the allowed list (patterns like OLLAMA_ORIGINS: `https://app.example.com`,
    `http://*.lan:*`, `*`).
Clients on this machine (curl, the openai package) send no Origin and a loopback Host: they pass with
no key. With `cors=True`, an allowed cross-origin caller also gets CORS headers (never credentials);
with `cors=False` (the Stigmer API) no CORS header is ever sent.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from stigmer.net.addresses import is_loopback_host

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CORS_MAX_AGE = "600"


def host_of(header: str) -> str:
    """The host part of a Host header: `[::1]:8080` -> `::1`, `localhost:11435` -> `localhost`."""
    value = header.strip()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # a bare IPv6 address without brackets, or a plain name


def is_loopback_host_header(header: str) -> bool:
    return bool(header) and is_loopback_host(host_of(header))


def origin_allowed(origin: str, allowed: Sequence[str]) -> bool:
    """A browser Origin (scheme://host[:port]) that may call us: this machine's, or an allowed pattern."""
    value = origin.strip().lower()
    try:
        parts = urlsplit(value)
        _port = parts.port
    except ValueError:
        return False
    if value == "null" or not parts.scheme or not parts.hostname or parts.path not in ("", "/"):
        return False  # `null` comes from sandboxed frames and file:// pages: never trusted
    if parts.scheme in ("http", "https") and is_loopback_host(parts.hostname):
        return True
    return any(pattern == "*" or fnmatch.fnmatchcase(value, pattern.lower()) for pattern in allowed)


class LoopbackGuard:
    """Pure ASGI middleware: Host and Origin checks before `app` runs (streams pass through untouched)."""

    def __init__(self, app: App, *, allowed_origins: Sequence[str] = (), cors: bool = False) -> None:
        self.app = app
        self.allowed = tuple(allowed_origins)
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        if not is_loopback_host_header(headers.get("host", "")):
            await _refuse(send, "requests must be addressed to this machine (Host: localhost or 127.0.0.1)")
            return
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        if not origin_allowed(origin, self.allowed):
            await _refuse(send, f"requests from the web origin {origin[:100]} are not allowed")
            return
        if not self.cors:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await _preflight(send, origin, headers)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _refuse(send: Send, why: str) -> None:
    body = json.dumps(
        {"error": {"code": "access_denied", "message": f"Forbidden: {why}.", "hint": ""}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _preflight(send: Send, origin: str, headers: dict[str, str]) -> None:
    allow = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (
            b"access-control-allow-headers",
            headers.get("access-control-request-headers", "").encode("latin-1"),
        ),
        (b"access-control-max-age", CORS_MAX_AGE.encode()),
        (b"vary", b"Origin"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": allow})
    await send({"type": "http.response.body", "body": b""})

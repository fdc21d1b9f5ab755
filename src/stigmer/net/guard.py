"""Refuse requests that a web page, rather than a program on this machine, could have sent.

A server on 127.0.0.1 is still reachable from the user's browser: a page can send "simple" requests
(a POST with Content-Type text/plain needs no preflight), and with DNS rebinding a page on
evil.example can even read the answers, since its requests then carry `Host: evil.example`. So, as
Ollama does, a request is refused with 403 before it reaches any handler when:
  - its Host header is not a loopback name or address (localhost, 127.0.0.0/8, ::1, any port), or
  - it carries an Origin that is neither this machine's (http(s)://localhost or a loopback IP, any
    port) nor matched by an allowed pattern (as OLLAMA_ORIGINS: `https://app.example.com`,
    `http://*.lan:*`, `*`; `*` is the only wildcard).
Clients on this machine (curl, the openai package) send no Origin and a loopback Host: they pass with
no key. With `cors=True`, an allowed cross-origin caller also gets CORS headers (never credentials,
and whatever CORS headers the wrapped app sent are dropped); with `cors=False` (the Stigmer API) no
CORS header is added.

Pure ASGI and standard library only: the engine imports it before loading a model, and any ASGI app
(Starlette or not) can be wrapped.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from stigmer.net.addresses import is_loopback_host

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

CORS_MAX_AGE = "600"
PREFLIGHT_METHODS = "GET, POST, OPTIONS"

# What a browser sends as Origin: scheme://host[:port], nothing else. `null` (sandboxed frames, file://
# pages), paths, user info, queries and fragments never match, so they are refused.
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.\-]*)://(?P<host>\[[0-9a-z:.%]+\]|[^\s/?#@\[\]:]+)(?::(?P<port>\d{1,5}))?"
)
_HEADER_LIST = re.compile(r"[A-Za-z0-9\-_, ]*")  # Access-Control-Request-Headers we echo back


def _port_ok(port: str) -> bool:
    # RFC 9110 allows an empty port after the colon; anything else must be a real port number.
    return port == "" or (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535)


def _is_loopback_ipv6(text: str) -> bool:
    try:
        return ipaddress.IPv6Address(text).is_loopback
    except ValueError:
        return False


def is_loopback_host_header(value: str) -> bool:
    """Whether a Host header names this machine: `localhost`, `127.0.0.1:8080`, `[::1]:11435`.

    Only literal loopback addresses and the name localhost count: any other name, even one that
    resolves to 127.0.0.1 today (`127.0.0.1.nip.io`, `localhost.evil.com`), is what DNS rebinding
    uses. Odd spellings of 127.0.0.1 (`0x7f.1`, `2130706433`) are refused too: browsers send the
    canonical dotted form, and nothing legitimate sends the others.
    """
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :]
        if end < 0 or (rest and not (rest.startswith(":") and _port_ok(rest[1:]))):
            return False
        return _is_loopback_ipv6(text[1:end])
    if text.count(":") > 1:  # a bare IPv6 address: not valid in a Host header, but unambiguous
        return _is_loopback_ipv6(text)
    host, colon, port = text.partition(":")
    if colon and not _port_ok(port):
        return False
    return bool(host) and is_loopback_host(host)


def _is_loopback_origin_host(host: str) -> bool:
    if host.startswith("["):
        return _is_loopback_ipv6(host[1:-1])
    return is_loopback_host(host)


@functools.lru_cache(maxsize=256)
def _pattern(glob: str) -> re.Pattern[str]:
    # `*` is the only wildcard (as in OLLAMA_ORIGINS); fnmatch would also read `[...]` as a character
    # class, so `http://[::1]:*` would not mean what it says.
    return re.compile(".*".join(re.escape(part) for part in glob.strip().lower().split("*")))


def origin_allowed(origin: str, allowed_patterns: Sequence[str]) -> bool:
    """Whether a browser Origin may call us: this machine's own (http or https, a loopback host, any
    port), or one matched by a pattern of `allowed_patterns` (case-insensitive, `*` = anything)."""
    value = origin.strip().lower()
    match = _ORIGIN.fullmatch(value)
    if match is None or not _port_ok(match["port"] or ""):
        return False
    if match["scheme"] in ("http", "https") and _is_loopback_origin_host(match["host"]):
        return True
    return any(_pattern(p).fullmatch(value) for p in allowed_patterns if p.strip())


def refusal(headers: Sequence[tuple[str, str]], allowed_patterns: Sequence[str]) -> str | None:
    """Why a request with these headers (names lower-case) must be refused, or None when it may pass."""
    hosts = [v for k, v in headers if k == "host"]
    origins = [v for k, v in headers if k == "origin"]
    if len(hosts) != 1 or not is_loopback_host_header(hosts[0]):
        shown = hosts[0][:100] if hosts else "(none)"
        return f"requests must be addressed to this machine (Host: localhost or 127.0.0.1), not {shown}"
    if len(origins) > 1 or (origins and not origin_allowed(origins[0], allowed_patterns)):
        return f"requests from the web origin {origins[0][:100]} are not allowed"
    return None


def refusal_body(why: str) -> bytes:
    """The 403 body: the same error shape as the Stigmer API's (code, message, hint)."""
    error = {"code": "access_denied", "message": f"Forbidden: {why}.", "hint": ""}
    return json.dumps({"error": error}).encode()


class LoopbackGuard:
    """Pure ASGI middleware: Host and Origin checks before `app` runs (streams pass through untouched)."""

    def __init__(self, app: App, *, allowed_origins: Sequence[str] = (), cors: bool = False) -> None:
        self.app = app
        self.allowed = tuple(allowed_origins)
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan: nothing from the network
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers") or ()]
        why = refusal(headers, self.allowed)
        if why is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # before accept: the server sends 403
            else:
                await _refuse(send, why)
            return
        if not self.cors:
            await self.app(scope, receive, send)
            return
        origin = next((v for k, v in headers if k == "origin"), None)
        if origin is not None and scope["method"] == "OPTIONS":
            requested = dict(headers)
            if "access-control-request-method" in requested:
                await _preflight(send, origin, requested)
                return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = [(k, v) for k, v in message.get("headers", ()) if not _is_cors_header(k)]
                if origin is not None:
                    out += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                message = {**message, "headers": out}
            await send(message)

        await self.app(scope, receive, send_with_cors)


def _is_cors_header(name: bytes) -> bool:
    return name.lower().startswith(b"access-control-")


async def _refuse(send: Send, why: str) -> None:
    body = refusal_body(why)
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _preflight(send: Send, origin: str, requested: dict[str, str]) -> None:
    asked = requested.get("access-control-request-headers", "")
    allow = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", PREFLIGHT_METHODS.encode()),
        (b"access-control-max-age", CORS_MAX_AGE.encode()),
        (b"vary", b"Origin, Access-Control-Request-Headers"),
        (b"content-length", b"0"),
    ]
    if asked and _HEADER_LIST.fullmatch(asked):
        allow.append((b"access-control-allow-headers", asked.encode("latin-1")))
    if requested.get("access-control-request-private-network") == "true":
        # Chrome asks before a public page may reach a private address; the user allowed this origin.
        allow.append((b"access-control-allow-private-network", b"true"))
    await send({"type": "http.response.start", "status": 204, "headers": allow})
    await send({"type": "http.response.body", "body": b""})

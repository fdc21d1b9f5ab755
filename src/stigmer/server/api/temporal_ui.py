"""Temporal's Web UI, behind Stigmer's door, for the person signed in to Stigmer only.

The dev server's UI cannot refuse a foreign Host header (DNS rebinding) and trusts anyone who reaches
it. So it listens on an internal port that browsers refuse to connect to (a "bad port" of the Fetch
standard: no web page can reach it, whatever its address), and the port users open, temporal.ui_port,
is served by the API process through this guard:

  - the Host must be 127.0.0.1:<ui_port> (localhost is redirected there, so the cookie and the codec
    have one origin); a web origin other than that exact one is refused, other localhost ports included;
  - every page needs a session: `stigmer server temporal-ui` asks the API for a one-time sign-in link
    (random, single use, 2 minutes), which sets an HttpOnly, SameSite=Strict cookie (12 h idle);
  - /codec/decode is Temporal's remote-codec endpoint (--ui-codec-endpoint points here): the signed-in
    person sees decoded payloads; everyone else cannot reach the UI at all.
"""

from __future__ import annotations

import html
import json
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The Fetch standard's bad ports (https://fetch.spec.whatwg.org/#bad-port) that a user may bind:
# every browser refuses to connect to them, for pages and for navigation alike.
BROWSER_BLOCKED_PORTS = (6665, 6668, 6669, 6679, 4190, 3659, 10080, 1719, 6566, 4045, 6697)
COOKIE = "stigmer_temporal_ui"
STIGMER_COOKIES = "stigmer_"  # the prefix of every door's session cookie
LINK_TTL = 120.0
SESSION_IDLE = 12 * 3600.0
SIGNIN_PATH = "/_stigmer/signin"
CODEC_PATH = "/codec"
MAX_CODEC_BODY = 4 * 1024 * 1024
# What the UI's answers may not carry to the browser (hop-by-hop) or what we set ourselves.
_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade"})


def free_blocked_port(taken: set[int] | None = None) -> int:
    """A browser-blocked port that is free on 127.0.0.1, tried in a random order: servers starting at the
    same moment (other homes, other users) would otherwise all pick the first free one, and all but one
    lose it when Temporal binds it a second later."""
    import random
    import socket

    for port in random.sample(BROWSER_BLOCKED_PORTS, len(BROWSER_BLOCKED_PORTS)):
        if taken and port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise OSError("none of the browser-blocked ports for Temporal's internal listeners is free")


@dataclass
class Sessions:
    """One-time sign-in links and the sessions they open (in the API's memory: a restart signs out).

    One mechanism for every door that a person signs in to with a link (Temporal's UI, the web console),
    each with its own instance and cookie name: a link or session of one door never opens another. Cookies
    are not separated by port, so each door's cookie has a name of its own (and doors that pass cookies on
    strip every `stigmer_` one). `csrf` is a token tied to a session, for the pages of a door to send back
    with what they change."""

    cookie: str = COOKIE
    links: dict[str, float] = field(default_factory=dict)  # token -> expiry
    sessions: dict[str, float] = field(default_factory=dict)  # id -> last use
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def link(self) -> str:
        now = time.monotonic()
        self.links = {t: exp for t, exp in self.links.items() if exp > now}
        token = secrets.token_urlsafe(32)
        self.links[token] = now + LINK_TTL
        return token

    def redeem(self, token: str) -> str | None:
        expiry = self.links.pop(token, None)
        if expiry is None or expiry < time.monotonic():
            return None
        session = secrets.token_urlsafe(32)
        self.sessions[session] = time.monotonic()
        return session

    def valid(self, session: str | None) -> bool:
        now = time.monotonic()
        last = self.sessions.get(session or "")
        if last is None or now - last > SESSION_IDLE:
            self.sessions.pop(session or "", None)
            return False
        self.sessions[session or ""] = now
        return True

    def set_cookie(self, session: str) -> str:
        """The Set-Cookie value that carries a session (HttpOnly, SameSite=Strict, 12 h)."""
        return f"{self.cookie}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={int(SESSION_IDLE)}"

    def of(self, headers: list[tuple[str, str]]) -> str | None:
        """This door's session cookie among request headers (names lower-case), valid or not."""
        return _cookie(headers, self.cookie)

    def csrf(self, session: str) -> str:
        """The anti-forgery token of a session: only a page served to that session knows it."""
        import hashlib
        import hmac

        return hmac.new(self.secret, b"csrf:" + session.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: str, token: str | None) -> bool:
        import hmac

        return bool(token) and hmac.compare_digest(self.csrf(session), str(token))


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers") or ()]


def _cookie(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == "cookie":
            for part in value.split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v
    return None


async def _answer(
    send: Send, status: int, body: bytes, ctype: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", ctype.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-frame-options", b"DENY"),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _page(title: str, text: str) -> bytes:
    return (
        "<!doctype html><meta charset=utf-8><title>Stigmer: Temporal UI</title>"
        f"<body style='font-family:sans-serif;max-width:40em;margin:4em auto'><h1>{html.escape(title)}</h1>"
        f"<p>{text}</p></body>"
    ).encode()


SIGN_IN_PAGE = _page(
    "Sign in to see Temporal's UI",
    "Run <code>stigmer server temporal-ui</code> in a terminal: it opens this page with a one-time "
    "sign-in link (valid for 2 minutes).",
)


class TemporalUiGuard:
    """Pure ASGI: the checks above, then a proxy to the UI's internal port (or the codec)."""

    def __init__(
        self, *, port: int, internal_port: Callable[[], int], sessions: Sessions, key: bytes
    ) -> None:
        self.origin = f"http://127.0.0.1:{port}"
        self.host = f"127.0.0.1:{port}"
        self.port = port
        self.internal_port = internal_port  # where the UI listens now (a restarted Temporal may move it)
        self.sessions = sessions
        self.key = key
        self._client: Any = None
        self._client_port = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = _headers(scope)
        hosts = [v for k, v in headers if k == "host"]
        origins = [v for k, v in headers if k == "origin"]
        host = hosts[0].strip().lower() if len(hosts) == 1 else ""
        if host == f"localhost:{self.port}" and scope["method"] in ("GET", "HEAD") and not origins:
            target = (
                self.origin
                + scope["path"]
                + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
            )
            await _answer(send, 307, b"", "text/plain", [(b"location", target.encode("latin-1"))])
            return
        if host != self.host:
            await _refuse(
                send, f"requests must be addressed to {self.host}, not {(hosts or ['(none)'])[0][:100]}"
            )
            return
        if len(origins) > 1 or (origins and origins[0].strip() != self.origin):
            await _refuse(send, f"requests from the web origin {origins[0][:100]} are not allowed")
            return
        path = scope["path"]
        if path == SIGNIN_PATH:
            await self._sign_in(scope, send)
            return
        if not self.sessions.valid(self.sessions.of(headers)):
            wants_page = scope["method"] == "GET" and "text/html" in dict(headers).get("accept", "")
            if wants_page:
                await _answer(send, 401, SIGN_IN_PAGE, "text/html; charset=utf-8")
            else:
                body = {"error": {"code": "unauthorized", "message": "Sign in first: stigmer server temporal-ui",
                                  "hint": ""}}  # fmt: skip
                await _answer(send, 401, json.dumps(body).encode(), "application/json")
            return
        if path.startswith(CODEC_PATH + "/"):
            await self._codec(scope, receive, send, path[len(CODEC_PATH) :])
            return
        await self._proxy(scope, receive, send, headers)

    async def _sign_in(self, scope: Scope, send: Send) -> None:
        from urllib.parse import parse_qs

        token = (parse_qs(scope["query_string"].decode("latin-1")).get("t") or [""])[0]
        session = self.sessions.redeem(token) if token else None
        if session is None:
            page = _page(
                "This sign-in link is no longer valid",
                "Each link works once, for 2 minutes. Run <code>stigmer server temporal-ui</code> again.",
            )
            await _answer(send, 403, page, "text/html; charset=utf-8")
            return
        cookie = self.sessions.set_cookie(session)
        await _answer(
            send, 303, b"", "text/plain", [(b"location", b"/"), (b"set-cookie", cookie.encode("latin-1"))]
        )

    async def _codec(self, scope: Scope, receive: Receive, send: Send, action: str) -> None:
        if scope["method"] == "OPTIONS":
            await _answer(send, 204, b"", "text/plain")
            return
        if action != "/decode" or scope["method"] != "POST":
            await _answer(
                send,
                404,
                b'{"error":{"code":"not_found","message":"Only /codec/decode."}}',
                "application/json",
            )
            return
        raw = await _body(receive)
        if raw is None:
            await _answer(
                send,
                413,
                b'{"error":{"code":"too_large","message":"Too many payloads."}}',
                "application/json",
            )
            return
        from stigmer.executions.codec import decode_json
        from stigmer.executions.payload_store import local

        try:
            out = await decode_json(self.key, json.loads(raw or b"{}"), local())
        except Exception as e:  # noqa: BLE001 - malformed input or another key: say so, never a 500 page
            body = json.dumps({"error": {"code": "invalid_input", "message": f"Cannot decode: {e}"}})
            await _answer(send, 400, body.encode(), "application/json")
            return
        await _answer(send, 200, json.dumps(out).encode(), "application/json")

    async def _proxy(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[str, str]]
    ) -> None:
        import httpx

        internal = self.internal_port()
        if not internal:
            page = _page("Temporal's UI is not running", "See: <code>stigmer server status</code>")
            await _answer(send, 503, page, "text/html; charset=utf-8")
            return
        body = await _body(receive)
        if body is None:
            await _answer(send, 413, b"request too large", "text/plain")
            return
        forward = [(k, v) for k, v in headers if k not in ("host", "content-length", "connection", "cookie")]
        # The UI's own cookies (its CSRF token) go through; ours stay here (every door's: cookies are
        # not separated by port, so the console's reaches this port too).
        ui_cookies = [
            p.strip()
            for k, v in headers
            if k == "cookie"
            for p in v.split(";")
            if p.strip() and not p.strip().startswith(STIGMER_COOKIES)
        ]
        if ui_cookies:
            forward.append(("cookie", "; ".join(ui_cookies)))
        target = scope["path"] + (
            ("?" + scope["query_string"].decode("latin-1")) if scope["query_string"] else ""
        )
        client = self._client_for(internal)
        try:
            request = client.build_request(scope["method"], target, headers=forward, content=body)
            response = await client.send(request, stream=True)
        except httpx.HTTPError as e:
            await _answer(send, 502, _page("Temporal's UI does not answer", html.escape(str(e))), "text/html")
            return
        try:
            out = [
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items()
                if k.lower().encode() not in _HOP and k.lower() != "content-length"
            ]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    def _client_for(self, internal: int) -> Any:
        """One pooled client per internal port (the UI loads ~150 files at its first page)."""
        import httpx

        if self._client is None or self._client_port != internal:
            self._client = httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{internal}", timeout=60, trust_env=False
            )
            self._client_port = internal
        return self._client


class ByPort:
    """One uvicorn, two listening sockets: the API's port goes to the API, the UI's to its guard."""

    def __init__(self, default: Any, by_port: dict[int, Any]) -> None:
        self.default = default
        self.by_port = by_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") or ("", 0)
        app = (
            self.by_port.get(int(server[1] or 0), self.default)
            if scope["type"] != "lifespan"
            else self.default
        )
        await app(scope, receive, send)


async def _body(receive: Receive, limit: int = MAX_CODEC_BODY) -> bytes | None:
    """The request body, or None once it passes `limit` (counted while it is read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _refuse(send: Send, why: str) -> None:
    from stigmer.net.guard import refusal_body

    await _answer(send, 403, refusal_body(why), "application/json")

"""The console's door: who may see its pages and who may change something through them.

- Every console path (`/`, `/ui/...`) needs the console's session cookie (HttpOnly, SameSite=Strict,
  12 h idle), set by a one-time sign-in link from `stigmer ui` (the same `Sessions` mechanism as the
  Temporal UI's door, with a cookie of its own). Without it a page shows only how to sign in.
- A request that changes something (POST, PUT, DELETE) must also carry the session's CSRF token and
  come from the console's own origin: `Origin` exactly `http://127.0.0.1:PORT` (or, without an
  Origin, `Sec-Fetch-Site: same-origin`). A page on another localhost port is the same *site*, so its
  requests carry a SameSite=Strict cookie: only the origin check and the token stop it.
- Every answer carries a Content-Security-Policy without inline script or eval, and is never framed.
- The API's own checks still run first (net.guard: the Host must be this machine's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from stigmer.server.api.temporal_ui import Sessions

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "/ui"
COOKIE = "stigmer_console"
SIGNIN_PATH = PREFIX + "/signin"
CSRF_HEADER = "x-csrf-token"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),  # no other origin may load our files, even as <img>
]
_OURS = frozenset(name for name, _ in HEADERS)


def is_console_path(path: str) -> bool:
    """The paths that authenticate by the console's cookie, not by the bearer token."""
    return path == "/" or path == PREFIX or path.startswith(PREFIX + "/")


def new_sessions() -> Sessions:
    return Sessions(cookie=COOKIE)


class Door:
    def __init__(self, sessions: Sessions, port: int) -> None:
        self.sessions = sessions
        self.origin = f"http://127.0.0.1:{port}"
        self.port = port

    def session(self, request: Request) -> str | None:
        """The request's session when it is valid (its idle time starts again), else None."""
        session = request.cookies.get(self.sessions.cookie)
        return session if session and self.sessions.valid(session) else None

    def write_refusal(self, request: Request, session: str, form_token: str | None = None) -> str | None:
        """Why a request that changes something must be refused, or None when it may go on."""
        origin = request.headers.get("origin")
        if origin is not None:
            if origin != self.origin:
                return f"requests from {origin[:100]} may not change anything here"
        elif request.headers.get("sec-fetch-site") != "same-origin":
            return "a change must come from the console's own pages"
        token = request.headers.get(CSRF_HEADER) or form_token
        if not self.sessions.csrf_ok(session, token):
            return "the page's security token is missing or out of date: reload the page"
        return None


class Secured:
    """Pure ASGI: the console's security headers on every answer (streams pass through), and pages asked
    for at localhost:PORT sent to 127.0.0.1:PORT, where the session cookie lives."""

    def __init__(self, app: App, *, port: int, static: bool = False) -> None:
        self.app = app
        self.port = port
        self.cache = b"no-cache" if static else b"no-store"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope.get("headers") or () if k == b"host"), b"").decode("latin-1")
        if host.strip().lower() == f"localhost:{self.port}" and scope["method"] in ("GET", "HEAD"):
            query = scope.get("query_string") or b""
            target = f"http://127.0.0.1:{self.port}{scope['path']}"
            target += ("?" + query.decode("latin-1")) if query else ""
            await send(
                {
                    "type": "http.response.start",
                    "status": 307,
                    "headers": [(b"location", target.encode("latin-1")), (b"content-length", b"0"), *HEADERS],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return

        async def secured(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", ())
                    if k.lower() not in _OURS and k.lower() != b"cache-control"
                ]
                message = {**message, "headers": [*headers, *HEADERS, (b"cache-control", self.cache)]}
            await send(message)

        await self.app(scope, receive, secured)

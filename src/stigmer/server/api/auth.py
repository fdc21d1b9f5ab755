"""Bearer-token check for every path but /health, as pure ASGI middleware (no buffering of streams).

Two credentials, two doors: the API token (the CLI, a person) opens everything but the worker routes;
the worker token opens only /v1/runner/ (claim an execution, post its events, read decisions)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from stigmer.errors import ErrorCode
from stigmer.server.token import same

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
WORKER_PREFIX = "/v1/runner/"


class BearerToken:
    def __init__(self, app: App, *, token: str, worker_token: str | None = None) -> None:
        self.app = app
        self.token = token
        self.worker_token = worker_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                scheme, _, rest = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    given = rest.strip()
        worker_path = scope["path"].startswith(WORKER_PREFIX)
        expected = self.worker_token if worker_path else self.token
        if given and expected and same(given, expected):
            await self.app(scope, receive, send)
            return
        if worker_path:
            message, hint = (
                "A valid worker token is required." if not given else "The worker token is not valid.",
                "A worker sends the server's $STIGMER_HOME/worker.token (STIGMER_WORKER_TOKEN).",
            )
        else:
            message, hint = (
                "A valid API token is required." if not given else "The API token is not valid.",
                "Send  Authorization: Bearer <token>  with the token in $STIGMER_HOME/api.token.",
            )
        await send_error(
            send, ErrorCode.UNAUTHORIZED, message, hint, headers=[(b"www-authenticate", b"Bearer")]
        )


async def send_error(
    send: Send,
    code: ErrorCode,
    message: str,
    hint: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": {"code": code.code, "message": message, "hint": hint}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": code.http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

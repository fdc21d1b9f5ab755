"""Bearer-token check for every path but /health, as pure ASGI middleware (no buffering of streams).

Two credentials, two doors: the API token (the CLI, a person) opens everything but the worker routes;
the worker token opens only /v1/runner/ (claim an execution, post its events, read decisions).

The OpenAI-compatible routes (/v1/models, /v1/chat/completions) authenticate themselves, in OpenAI's
error shape, with the API token or a scoped key (endpoint/routes.py). A scoped key also reads back, here,
the executions it started (GET /v1/executions/ID and its /events): a client that lost its stream
re-attaches with the key it has, and reaches nothing else."""

from __future__ import annotations

import json
import re
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


# GET /v1/executions/ID and /v1/executions/ID/events: what a scoped key may read of its own executions
_EXECUTION_READ = re.compile(r"/v1/executions/(?P<id>[^/]+)(?:/events)?")

KeyReader = Callable[[str, str], bool]  # (the key given, an execution id) -> did this key start it


class BearerToken:
    def __init__(
        self,
        app: App,
        *,
        token: str,
        worker_token: str | None = None,
        self_authenticated: Callable[[str], bool] = lambda _path: False,
        key_reader: KeyReader | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self.worker_token = worker_token
        self.self_authenticated = self_authenticated
        self.key_reader = key_reader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self.self_authenticated(scope["path"]):
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
        read = _EXECUTION_READ.fullmatch(scope["path"]) if scope["method"] == "GET" else None
        if given and read and self.key_reader is not None and self.key_reader(given, read["id"]):
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

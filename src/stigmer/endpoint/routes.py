"""The OpenAI-compatible routes on the API's port: GET /v1/models (and /v1/models/ID), POST
/v1/chat/completions. They authenticate themselves (the API's middleware lets them through), because an
OpenAI client expects OpenAI's error shape and because a scoped key may call them: the API token reaches
every model and agent; a key (`stigmer key create`) only its scopes."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from stigmer.config.store import Settings
from stigmer.endpoint import agent_turns, wire
from stigmer.endpoint.keys import Key, Keys
from stigmer.endpoint.upstream import Upstream
from stigmer.errors import StigmerError
from stigmer.server.executions import Executions
from stigmer.server.token import same

PATHS = ("/v1/models", "/v1/chat/completions")  # and /v1/models/ID: see is_endpoint_path
MAX_BODY = 10 * 1024 * 1024  # a long conversation with its tool results, not a document store
SESSION_HEADER = "X-Stigmer-Session"
EXECUTION_HEADER = "X-Stigmer-Execution"


def is_endpoint_path(path: str) -> bool:
    return path in PATHS or path.startswith("/v1/models/")


@dataclass(frozen=True)
class Caller:
    """Who is asking: the API token (key None: every scope) or a scoped key."""

    key: Key | None

    @property
    def name(self) -> str:
        return self.key.name if self.key else "admin"

    def check(self, model: str) -> None:
        if self.key is None:
            return
        missing = self.key.missing_scope(model)
        if missing:
            raise wire.OpenAIError(
                403,
                f"The key {self.key.name!r} has no scope for {model[:200]!r} (missing: {missing}). "
                f"Make a key that has it: stigmer key create NAME "
                + ("--models" if missing == "models" else "--agents AGENT"),
                code="insufficient_scope",
                param="model",
            )

    def may_see(self, model: str) -> bool:
        return self.key is None or self.key.missing_scope(model) is None


Handler = Callable[[Request], Awaitable[Response]]


def _openai_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except wire.OpenAIError as e:
            return e.response()
        except StigmerError as e:
            response = wire.from_stigmer(e).response()
            if e.code.http_status == 413:
                response.headers["Connection"] = "close"
            return response

    return wrapped


def routes(
    settings: Settings,
    token: str,
    ex: Callable[[], Executions],
    keys: Callable[[], Keys],
    upstream: Callable[[], Upstream],
) -> list[Route]:
    from stigmer.server.api.app import body_of

    def caller(request: Request) -> Caller:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        if not given:
            raise wire.OpenAIError(
                401,
                "An API key is required: Authorization: Bearer sk-stigmer-... (stigmer key create NAME), "
                "or the API token.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if same(given, token):
            return Caller(None)
        key = keys().verify(given)
        if key is None:
            raise wire.OpenAIError(
                401,
                "The API key is not valid, or it expired or was removed. See stigmer key list.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Caller(key)

    async def all_models(who: Caller) -> list[dict[str, Any]]:
        listed = await upstream().models() if who.key is None or who.key.models else []
        agents = [wire.model_object(agent_turns.PREFIX + a.name, "stigmer-agent") for a in ex().agents()]
        return [m for m in listed + agents if who.may_see(str(m["id"]))]

    @_openai_errors
    async def models(request: Request) -> Response:
        who = caller(request)
        return JSONResponse({"object": "list", "data": await all_models(who)})

    @_openai_errors
    async def model(request: Request) -> Response:
        who = caller(request)
        wanted = request.path_params["id"]
        for m in await all_models(who):
            if m["id"] == wanted:
                return JSONResponse(m)
        raise wire.model_not_found(wanted)

    @_openai_errors
    async def chat(request: Request) -> Response:
        who = caller(request)
        body = await body_of(request, MAX_BODY)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise wire.invalid("`model` is required: a model id from GET /v1/models.", "model")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise wire.invalid("`messages` must be a non-empty list.", "messages")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise wire.invalid("`stream` must be true or false.", "stream")
        who.check(model)
        name = agent_turns.agent_of(model)
        if name is None:
            return await upstream().complete(body, caller=who.name)
        return await agent_turn(request, who, model, name, body, stream)

    async def agent_turn(
        request: Request, who: Caller, model: str, name: str, body: dict[str, Any], stream: bool
    ) -> Response:
        try:
            ex().agent(name)
        except StigmerError:
            raise wire.model_not_found(model) from None
        for unsupported in ("tools", "functions", "n"):
            if body.get(unsupported) not in (None, [], 1):
                raise wire.invalid(
                    f"`{unsupported}` is not supported with an agent: {model} uses the tools of its agent "
                    "file; client-side tools are for plain models (GET /v1/models).",
                    unsupported,
                )
        history, message = agent_turns.turn_of(body["messages"])
        session = request.headers.get(SESSION_HEADER) or None
        record = await ex().create(
            name,
            message,
            session=session,
            history=None if session else history,
            via=who.key.name if who.key else None,
        )
        exec_id = record["id"]
        headers = {EXECUTION_HEADER: exec_id}
        if session:
            headers[SESSION_HEADER] = session
        if stream:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            chunks = agent_turns.stream(ex(), exec_id, model, include_usage=include_usage)
            return StreamingResponse(
                chunks, media_type="text/event-stream", headers={**wire.SSE_HEADERS, **headers}
            )
        try:
            done = await agent_turns.answer(ex(), exec_id, model, approval_wait=settings.server.approval_wait)
        except wire.OpenAIError as e:
            e.headers.update(headers)
            raise
        return JSONResponse(done, headers=headers)

    return [
        Route("/v1/models", models),
        Route("/v1/models/{id:path}", model),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]

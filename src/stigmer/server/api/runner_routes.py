"""The routes a worker uses, under /v1/runner/ and only with the worker token (server/keys.py): say hello
(the worker checks its URL, token and payload key before it polls), claim an execution, post its events,
read the decisions people made. Every request about an execution also shows that execution's ticket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stigmer import __version__
from stigmer.errors import ErrorCode, StigmerError
from stigmer.executions.messages import ClaimRequest, DecisionsRequest, EventBatch

PREFIX = "/v1/runner"
M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise StigmerError(f"Bad request: {where}: {first['msg']}.", code=ErrorCode.INVALID_INPUT) from None


def routes(ex: Callable[[], Any], key_id: str) -> list[Route]:
    from stigmer.server.api.app import body_of

    async def hello(_request: Request) -> JSONResponse:
        return JSONResponse({"version": __version__, "key_id": key_id})

    async def claim(request: Request) -> JSONResponse:
        body = await body_of(request)
        req = _parse(ClaimRequest, body)
        run_id = str(body.get("run_id") or "")[:100]
        spec = await ex().claim(request.path_params["id"], req, run_id)
        return JSONResponse(spec.model_dump())

    async def events(request: Request) -> JSONResponse:
        body = await body_of(request)
        batch = _parse(EventBatch, body)
        key = body.get("batch")
        taken = ex().ingest(
            request.path_params["id"], batch.ticket, batch.events, str(key) if key is not None else None
        )
        return JSONResponse({"accepted": taken})

    async def decisions(request: Request) -> JSONResponse:
        req = _parse(DecisionsRequest, await body_of(request))
        found = ex().decisions(request.path_params["id"], req.ticket, req.call_ids)
        return JSONResponse([d.model_dump() for d in found])

    return [
        Route(f"{PREFIX}/hello", hello),
        Route(f"{PREFIX}/executions/{{id}}/claim", claim, methods=["POST"]),
        Route(f"{PREFIX}/executions/{{id}}/events", events, methods=["POST"]),
        Route(f"{PREFIX}/executions/{{id}}/decisions", decisions, methods=["POST"]),
    ]

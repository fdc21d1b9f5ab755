"""The routes. Every answer is JSON (or server-sent events); every error is {"error": {"code", "message",
"hint"}} with the HTTP status of its ErrorCode. Requests whose Host is not this machine's, or that come
from another web origin, are refused before any route runs (net.guard); every path but /health needs
the bearer token."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stigmer import __version__
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.server.api.auth import BearerToken

MAX_BODY = 2 * 1024 * 1024


def error_response(e: StigmerError) -> JSONResponse:
    return JSONResponse({"error": e.to_dict()}, status_code=e.code.http_status)


async def body_of(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise StigmerError("The request body is too large.", code=ErrorCode.INVALID_INPUT)
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise StigmerError("The request body is not JSON.", code=ErrorCode.INVALID_INPUT) from None
    if not isinstance(data, dict):
        raise StigmerError("The request body must be a JSON object.", code=ErrorCode.INVALID_INPUT)
    return data


def create_app(settings: Settings, paths: Paths, *, token: str) -> Any:
    """The ASGI application: guard(auth(routes))."""
    from stigmer.agents.spec import from_dict, parse_yaml
    from stigmer.net.guard import LoopbackGuard
    from stigmer.server.db import Database
    from stigmer.server.executions import Executions

    state: dict[str, Executions] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        db = Database(paths.data_dir / "stigmer.db")
        state["x"] = Executions(db, settings)
        await state["x"].resume()
        yield
        db.close()

    def ex() -> Executions:
        return state["x"]

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    async def status(_request: Request) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        from stigmer.server.status import server_status

        return JSONResponse(await run_in_threadpool(server_status, settings, paths))

    # -- agents ----------------------------------------------------------------------------------------
    async def agents(request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse([a.to_dict() for a in ex().agents()])
        body = await body_of(request)
        spec = (
            parse_yaml(body["yaml"], str(body.get("source") or "agent file"))
            if "yaml" in body
            else from_dict(body)
        )
        created = ex().db.put_agent(spec.name, spec.to_dict())
        return JSONResponse(
            {"agent": spec.to_dict(), "created": created}, status_code=201 if created else 200
        )

    async def agent(request: Request) -> Response:
        name = request.path_params["name"]
        if request.method == "DELETE":
            if not ex().db.delete_agent(name):
                ex().agent(name)  # 404 for an unknown name
                raise StigmerError(
                    f"{name} is the built-in agent and cannot be removed.",
                    hint="Apply a file with name: default to change what it does.",
                    code=ErrorCode.UNSUPPORTED,
                )
            return JSONResponse({"removed": name})
        return JSONResponse(ex().agent(name).to_dict())

    # -- executions -----------------------------------------------------------------------------------
    async def executions(request: Request) -> JSONResponse:
        if request.method == "GET":
            q = request.query_params
            limit = (
                min(max(int(q.get("limit", "20") or 20), 1), 500)
                if (q.get("limit") or "20").isdigit()
                else 20
            )
            state_filter = (q.get("state") or "").upper() or None
            return JSONResponse(ex().records(state=state_filter, agent=q.get("agent") or None, limit=limit))
        body = await body_of(request)
        record = await ex().create(str(body.get("agent") or "default"), body.get("message", ""))
        return JSONResponse(record, status_code=201)

    async def execution(request: Request) -> JSONResponse:
        return JSONResponse(ex().record(request.path_params["id"]))

    async def cancel(request: Request) -> JSONResponse:
        return JSONResponse(await ex().cancel(request.path_params["id"]))

    async def approve(request: Request) -> JSONResponse:
        body = await body_of(request)
        verb = request.url.path.rsplit("/", 1)[-1]
        record = await ex().decide(
            request.path_params["id"],
            approve=verb == "approve",
            call_id=str(body["call_id"]) if body.get("call_id") else None,
            always=bool(body.get("always")),
        )
        return JSONResponse(record)

    async def events(request: Request) -> Response:
        exec_id = request.path_params["id"]
        if request.method == "POST":
            body = await body_of(request)
            batch = body.get("events")
            if not isinstance(batch, list):
                raise StigmerError("`events` must be a list.", code=ErrorCode.INVALID_INPUT)
            ex().ingest(exec_id, batch)
            return JSONResponse({"accepted": len(batch)})
        from sse_starlette.sse import EventSourceResponse

        last = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        after = int(last) if last.isdigit() else 0
        stream = ex().stream(exec_id, after)
        first = await anext(stream, None)  # an unknown id is a 404 before the stream starts

        async def sse() -> AsyncIterator[dict[str, str]]:
            if first is not None:
                yield _sse(*first)
            async for item in stream:
                yield _sse(*item)

        return EventSourceResponse(sse(), ping=None)

    async def on_stigmer_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StigmerError)
        return error_response(exc)

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.USAGE}.get(exc.status_code, ErrorCode.INVALID_INPUT)
        body = {"error": {"code": code.code, "message": str(exc.detail), "hint": ""}}
        return JSONResponse(body, status_code=exc.status_code)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/status", status),
            Route("/v1/agents", agents, methods=["GET", "POST", "PUT"]),
            Route("/v1/agents/{name}", agent, methods=["GET", "DELETE"]),
            Route("/v1/executions", executions, methods=["GET", "POST"]),
            Route("/v1/executions/{id}", execution),
            Route("/v1/executions/{id}/cancel", cancel, methods=["POST"]),
            Route("/v1/executions/{id}/approve", approve, methods=["POST"]),
            Route("/v1/executions/{id}/deny", approve, methods=["POST"]),
            Route("/v1/executions/{id}/events", events, methods=["GET", "POST"]),
        ],
        exception_handlers={StigmerError: on_stigmer_error, HTTPException: on_http_error},
        lifespan=lifespan,
    )
    return LoopbackGuard(BearerToken(app, token=token), allowed_origins=())


def _sse(seq: int, kind: str, data: dict[str, Any]) -> dict[str, str]:
    if kind == "ping":
        return {"comment": "ping"}
    return {"id": str(seq), "event": kind, "data": json.dumps(data)}

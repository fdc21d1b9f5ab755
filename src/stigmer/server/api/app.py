"""The routes. Every answer is JSON (or server-sent events); every error is {"error": {"code", "message",
"hint"}} with the HTTP status of its ErrorCode. Requests whose Host is not this machine's, or that come
from another web origin, are refused before any route runs (net.guard); every path but /health needs
the bearer token."""

from __future__ import annotations

import contextlib
import json
import logging
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
from stigmer.nesting import MAX_DEPTH, deeper_than
from stigmer.paths import Paths
from stigmer.server.api.auth import BearerToken

log = logging.getLogger(__name__)

MAX_BODY = 2 * 1024 * 1024


def error_response(e: StigmerError) -> JSONResponse:
    return JSONResponse({"error": e.to_dict()}, status_code=e.code.http_status)


def _too_large(limit: int = MAX_BODY) -> StigmerError:
    return StigmerError(
        f"The request body is larger than {limit // (1024 * 1024)} MB.", code=ErrorCode.TOO_LARGE
    )


def _too_deep() -> StigmerError:
    return StigmerError(
        f"The request body nests more than {MAX_DEPTH} levels deep.", code=ErrorCode.INVALID_INPUT
    )


async def body_of(request: Request, limit: int = MAX_BODY) -> dict[str, Any]:
    """The JSON object in the body. A body over `limit` is refused (413) by its Content-Length before
    any of it is read, or (chunked, without one) as soon as what was read passes the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise StigmerError("The request body is not JSON.", code=ErrorCode.INVALID_INPUT) from None
    except RecursionError:  # the C parser counts its depth against the recursion limit
        raise _too_deep() from None
    if deeper_than(data):
        raise _too_deep()
    if not isinstance(data, dict):
        raise StigmerError("The request body must be a JSON object.", code=ErrorCode.INVALID_INPUT)
    return data


def create_app(settings: Settings, paths: Paths, *, token: str, worker_token: str | None = None) -> Any:
    """The ASGI application: guard(auth(routes))."""
    from stigmer.agents.spec import from_dict, parse_yaml
    from stigmer.console import routes as console
    from stigmer.endpoint import routes as endpoint_routes
    from stigmer.endpoint.keys import Keys
    from stigmer.endpoint.upstream import Upstream
    from stigmer.net.guard import LoopbackGuard
    from stigmer.server.api import key_routes, runner_routes, trigger_routes
    from stigmer.server.api.temporal_ui import LINK_TTL, SIGNIN_PATH, ByPort, Sessions, TemporalUiGuard
    from stigmer.server.db import Database
    from stigmer.server.executions import Executions
    from stigmer.server.keys import key_id, payload_key

    state: dict[str, Any] = {}
    sessions = Sessions()
    ui = (
        TemporalUiGuard(
            port=settings.temporal.ui_port,
            internal_port=lambda: _ui_internal_port(paths),
            sessions=sessions,
            key=payload_key(paths),
        )
        if settings.temporal.managed and settings.temporal.ui_port
        else None
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        db = Database(paths.data_dir / "stigmer.db")
        state["x"] = Executions(db, settings, paths)
        state["keys"] = Keys(db)  # the endpoint's scoped keys (stigmer key create), on the same database
        state["upstream"] = Upstream(settings, paths)
        await state["x"].resume()
        yield
        await state["upstream"].aclose()
        db.close()

    def ex() -> Executions:
        return state["x"]  # type: ignore[no-any-return]

    def keys() -> Any:
        return state["keys"]

    def key_reader(given: str, exec_id: str) -> bool:
        """Did the key `given` start this execution (it may read it back)?"""
        key = keys().verify(given)
        row = ex().db.get_execution(exec_id) if key is not None else None
        return bool(row and key is not None and row.get("via") == key.name)

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    async def status(_request: Request) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        from stigmer.server.status import server_status

        data = await run_in_threadpool(server_status, settings, paths)
        data["schedules"] = await _schedules_summary(ex())
        return JSONResponse(data)

    # -- agents ----------------------------------------------------------------------------------------
    async def agents(request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse([a.to_dict() for a in ex().agents()])
        body = await body_of(request)
        if "yaml" in body and not isinstance(body["yaml"], str):
            raise StigmerError(
                "`yaml` must be the text of an agent file (a string).", code=ErrorCode.INVALID_INPUT
            )
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
                if (q.get("limit") or "20").isascii() and (q.get("limit") or "20").isdigit()
                else 20
            )
            state_filter = (q.get("state") or "").upper() or None
            return JSONResponse(ex().records(state=state_filter, agent=q.get("agent") or None, limit=limit))
        body = await body_of(request)
        session = body.get("session")
        if session is not None and not isinstance(session, str):
            raise StigmerError("`session` must be a session's name.", code=ErrorCode.INVALID_INPUT)
        record = await ex().create(
            str(body["agent"]) if body.get("agent") else None,
            body.get("message", ""),
            session=session,  # "" is refused with the naming rule, never taken as "no session"
            continue_last=body.get("continue") is True,
            limits=body.get("limits"),  # checked by create: known names, whole numbers within bounds
        )
        return JSONResponse(record, status_code=201)

    # -- sessions -------------------------------------------------------------------------------------
    async def session_list(request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse(ex().sessions(request.query_params.get("agent") or None))
        body = await body_of(request)
        made = ex().new_session(
            str(body.get("name") or ""), str(body["agent"]) if body.get("agent") else None
        )
        return JSONResponse(made, status_code=201)

    async def session(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if request.method == "DELETE":
            ex().remove_session(name)
            return JSONResponse({"removed": name})
        return JSONResponse(ex().session(name))

    async def fork(request: Request) -> JSONResponse:
        body = await body_of(request)
        at = body.get("at")
        if at is not None and (not isinstance(at, int) or isinstance(at, bool)):
            raise StigmerError("`at` must be a turn number.", code=ErrorCode.INVALID_INPUT)
        new = body.get("name")
        if new is not None and not isinstance(new, str):
            raise StigmerError("`name` must be a session name.", code=ErrorCode.INVALID_INPUT)
        return JSONResponse(ex().fork(request.path_params["name"], at, new), status_code=201)

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
        from sse_starlette.sse import EventSourceResponse

        last = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        after = int(last) if last.isascii() and last.isdigit() else 0
        ex().record(exec_id, messages=False)  # an unknown id is a 404 before the stream starts
        stream = ex().stream(exec_id, after)

        async def sse() -> AsyncIterator[dict[str, str]]:
            yield {"comment": "stream open"}  # the headers go out now, not with the first event
            async for item in stream:
                yield _sse(*item)

        return EventSourceResponse(sse(), ping=None)

    def temporal_link() -> dict[str, Any]:
        if ui is None:
            raise StigmerError(
                "Temporal's Web UI is off (temporal.ui_port is 0, or Temporal is not managed by Stigmer).",
                hint="Turn it on: stigmer config set temporal.ui_port 8233 && stigmer server restart",
                code=ErrorCode.UNSUPPORTED,
            )
        return {"url": f"{ui.origin}{SIGNIN_PATH}?t={sessions.link()}", "expires_in": int(LINK_TTL)}

    async def temporal_ui_link(_request: Request) -> JSONResponse:
        return JSONResponse(temporal_link())

    async def on_stigmer_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StigmerError)
        response = error_response(exc)
        if exc.code is ErrorCode.TOO_LARGE:
            response.headers["Connection"] = "close"  # the rest of the body is not read: end the connection
        return response

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, never the client's input: a JSON 500 in the error shape, not a bare text one. Starlette
        # raises it again after this answer, so uvicorn logs its traceback to the server's log.
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        internal = StigmerError(
            "The server failed unexpectedly (a bug).",
            hint="Its log has the details: stigmer server logs -c server",
            code=ErrorCode.INTERNAL,
        )
        return error_response(internal)

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
            Route("/v1/executions/{id}/events", events),
            Route("/v1/temporal-ui/signin", temporal_ui_link, methods=["POST"]),
            Route("/v1/sessions", session_list, methods=["GET", "POST"]),
            Route("/v1/sessions/{name}", session, methods=["GET", "DELETE"]),
            Route("/v1/sessions/{name}/fork", fork, methods=["POST"]),
            *runner_routes.routes(ex, key_id(payload_key(paths))),
            *key_routes.routes(keys),
            *trigger_routes.routes(ex, settings.server.port),  # schedules, webhooks (/hooks/: signed)
            *endpoint_routes.routes(settings, token, ex, keys, lambda: state["upstream"]),
            *console.routes(settings, paths, ex, temporal_link),  # the web console (its own door)
        ],
        exception_handlers={
            StigmerError: on_stigmer_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    authed = BearerToken(
        app,
        token=token,
        worker_token=worker_token,
        self_authenticated=lambda p: (
            endpoint_routes.is_endpoint_path(p)
            or console.is_console_path(p)
            or trigger_routes.is_hook_path(p)
        ),
        key_reader=key_reader,
    )
    # No CORS unless server.origins lists an origin (a browser client of the OpenAI endpoint); then
    # CORS without credentials: the bearer token or key travels in a header, never in a cookie.
    origins = settings.server.origins
    api = LoopbackGuard(authed, allowed_origins=origins, cors=bool(origins))
    if ui is None:
        return api
    return ByPort(api, {settings.temporal.ui_port: ui})


async def _schedules_summary(ex: Any) -> dict[str, Any]:
    """How many schedules, and the next fire of any (for `stigmer server status`)."""
    import asyncio

    from stigmer.server.triggers import Triggers

    try:
        found = await asyncio.wait_for(Triggers(ex).schedules(), 2)  # the rest of the status must not wait
    except Exception as e:  # noqa: BLE001 - the status shows the rest; say why this part is missing
        return {"count": None, "next": None, "error": str(e)[:200]}
    nexts = [s["next"][0] for s in found if s.get("next") and not s.get("paused")]
    return {
        "count": len(found),
        "paused": sum(1 for s in found if s.get("paused")),
        "next": min(nexts) if nexts else None,
        "next_name": min((s["next"][0], s["name"]) for s in found if s.get("next") and not s.get("paused"))[1]
        if nexts
        else None,
    }


def _sse(seq: int, kind: str, data: dict[str, Any]) -> dict[str, str]:
    if kind == "ping":
        return {"comment": "ping"}
    return {"id": str(seq), "event": kind, "data": json.dumps(data)}


def _ui_internal_port(paths: Paths) -> int:
    """Where the managed Temporal's UI listens now, from its service record."""
    from stigmer.server.specs import TEMPORAL
    from stigmer.services.manager import Services

    rec = Services(paths).record(TEMPORAL)
    return int(rec.info.get("ui_internal_port") or 0) if rec else 0

"""The routes. Every answer is JSON; every error is {"error": {"code", "message", "hint"}} with the HTTP
status of its ErrorCode. Requests whose Host is not this machine's, or that come from another web
origin, are refused before any route runs (net.guard); every path but /health needs the bearer token."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stigmer import __version__
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.server.api.auth import BearerToken


def error_response(e: StigmerError) -> JSONResponse:
    return JSONResponse({"error": e.to_dict()}, status_code=e.code.http_status)


def create_app(settings: Settings, paths: Paths, *, token: str) -> Any:
    """The ASGI application: guard(auth(routes))."""
    from stigmer.net.guard import LoopbackGuard

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    async def status(_request: Request) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        from stigmer.server.status import server_status

        return JSONResponse(await run_in_threadpool(server_status, settings, paths))

    async def on_stigmer_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StigmerError)
        return error_response(exc)

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.USAGE}.get(exc.status_code, ErrorCode.INVALID_INPUT)
        body = {"error": {"code": code.code, "message": str(exc.detail), "hint": ""}}
        return JSONResponse(body, status_code=exc.status_code)

    app = Starlette(
        routes=[Route("/health", health), Route("/v1/status", status)],
        exception_handlers={StigmerError: on_stigmer_error, HTTPException: on_http_error},
    )
    return LoopbackGuard(BearerToken(app, token=token), allowed_origins=())

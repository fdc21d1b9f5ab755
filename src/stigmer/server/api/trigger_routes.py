"""The routes of schedules and webhooks (server/triggers.py).

For the API token (admin):
- GET|POST /v1/schedules, GET|DELETE /v1/schedules/NAME, POST /v1/schedules/NAME/{pause,resume,run}
- GET|POST /v1/hooks (POST answers the secret, once), DELETE /v1/hooks/NAME, POST /v1/hooks/NAME/rotate

For the worker token (a schedule's fire workflow, runner/fire.py):
- POST /v1/runner/schedules/NAME/fire {"fire_id"}, .../executions/ID (its state), .../executions/ID/cancel

Authenticated by their own signature, never the bearer token (auth.py lets HOOK_PREFIX through):
- POST /hooks/NAME: X-Hub-Signature-256 = sha256=HMAC(secret, raw body); X-GitHub-Delivery runs once
  -> 202 {"execution_id"}; 401 for a missing or wrong signature; 413 over 1 MB.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stigmer.errors import ErrorCode, StigmerError
from stigmer.server.triggers import HOOK_PREFIX, MAX_HOOK_BODY, Triggers


def is_hook_path(path: str) -> bool:
    return path.startswith(HOOK_PREFIX)


DRAIN_LIMIT = 32 * 1024 * 1024  # a body over MAX_HOOK_BODY is read this far so that its sender gets the 413


def _too_large() -> StigmerError:
    return StigmerError("The webhook body is larger than 1 MB.", code=ErrorCode.TOO_LARGE)


def routes(ex: Callable[[], Any], port: int) -> list[Route]:
    from stigmer.server.api.app import body_of

    cache: dict[int, Triggers] = {}

    def tr() -> Triggers:
        x = ex()
        if id(x) not in cache:
            cache.clear()
            cache[id(x)] = Triggers(x)
        return cache[id(x)]

    def hook_url(name: str) -> str:
        return f"http://127.0.0.1:{port}{HOOK_PREFIX}{name}"

    # -- schedules -------------------------------------------------------------------------------------
    async def schedule_list(request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse(await tr().schedules())
        return JSONResponse(await tr().add_schedule(await body_of(request)), status_code=201)

    async def schedule(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if request.method == "DELETE":
            await tr().remove_schedule(name)
            return JSONResponse({"removed": name})
        return JSONResponse(await tr().schedule(name))

    async def schedule_verb(request: Request) -> JSONResponse:
        name, verb = request.path_params["name"], request.url.path.rsplit("/", 1)[-1]
        if verb == "run":
            return JSONResponse(await tr().run_now(name))
        return JSONResponse(await tr().pause(name, verb == "pause"))

    # -- the fire workflow's side (worker token) --------------------------------------------------------
    async def fire(request: Request) -> JSONResponse:
        body = await body_of(request)
        return JSONResponse(await tr().fire(request.path_params["name"], body.get("fire_id")))

    async def fired(request: Request) -> JSONResponse:
        name, exec_id = request.path_params["name"], request.path_params["id"]
        if request.url.path.endswith("/cancel"):
            await tr().cancel_fired(name, exec_id)
            return JSONResponse({"cancelled": exec_id})
        return JSONResponse({"state": tr().fired_state(name, exec_id)})

    # -- hooks ------------------------------------------------------------------------------------------
    async def hook_list(request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse([{**h, "url": hook_url(h["name"])} for h in tr().hooks()])
        made, secret = tr().add_hook(await body_of(request))
        return JSONResponse(
            {"hook": {**made, "url": hook_url(made["name"])}, "secret": secret},
            status_code=201,
            headers={"Cache-Control": "no-store"},
        )

    async def hook(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        tr().remove_hook(name)
        return JSONResponse({"removed": name})

    async def rotate(request: Request) -> JSONResponse:
        made, secret = tr().rotate(request.path_params["name"])
        return JSONResponse(
            {"hook": {**made, "url": hook_url(made["name"])}, "secret": secret},
            headers={"Cache-Control": "no-store"},
        )

    async def deliver(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > DRAIN_LIMIT:
            raise _too_large()  # not read at all: the connection closes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_LIMIT:
                raise _too_large()
            if size <= MAX_HOOK_BODY:
                chunks.append(chunk)
        if size > MAX_HOOK_BODY:
            # Read to its end (bounded), then refused: a sender still writing when the connection closed
            # would see a broken pipe instead of the 413 that says why (GitHub sends up to 25 MB).
            raise _too_large()
        body = b"".join(chunks)
        found = tr().verify(request.path_params["name"], body, request.headers.get("x-hub-signature-256"))
        if found is None:
            raise StigmerError(
                "A valid signature is required: X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body under "
                "the hook's secret>.",
                hint="Give the sender the secret `stigmer hook add` or `stigmer hook rotate` printed.",
                code=ErrorCode.UNAUTHORIZED,
            )
        done = await tr().deliver(found, body, request.headers.get("x-github-delivery") or None)
        return JSONResponse(done, status_code=202)

    return [
        Route("/v1/schedules", schedule_list, methods=["GET", "POST"]),
        Route("/v1/schedules/{name}", schedule, methods=["GET", "DELETE"]),
        Route("/v1/schedules/{name}/pause", schedule_verb, methods=["POST"]),
        Route("/v1/schedules/{name}/resume", schedule_verb, methods=["POST"]),
        Route("/v1/schedules/{name}/run", schedule_verb, methods=["POST"]),
        Route("/v1/runner/schedules/{name}/fire", fire, methods=["POST"]),
        Route("/v1/runner/schedules/{name}/executions/{id}", fired, methods=["POST"]),
        Route("/v1/runner/schedules/{name}/executions/{id}/cancel", fired, methods=["POST"]),
        Route("/v1/hooks", hook_list, methods=["GET", "POST"]),
        Route("/v1/hooks/{name}", hook, methods=["DELETE"]),
        Route("/v1/hooks/{name}/rotate", rotate, methods=["POST"]),
        Route(HOOK_PREFIX + "{name}", deliver, methods=["POST"]),
    ]

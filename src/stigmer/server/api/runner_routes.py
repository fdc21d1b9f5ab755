"""The routes a worker uses, under /v1/runner/ and only with the worker token (server/keys.py): say hello
(the worker checks its URL, token and payload key before it polls), claim an execution, post its events,
read the decisions people made, keep and fetch the payload codec's large payloads (sealed bytes by their
sha256). Every request about an execution also shows that execution's ticket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
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


def _payload_too_large() -> StigmerError:
    from stigmer.executions.payload_store import MAX_PAYLOAD

    return StigmerError(
        f"The payload is larger than {MAX_PAYLOAD // (1024 * 1024)} MB, the most Stigmer stores.",
        code=ErrorCode.TOO_LARGE,
    )


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

    async def transcript(request: Request) -> JSONResponse:
        body = await body_of(request)
        messages = ex().transcript(request.path_params["id"], str(body.get("ticket") or "")[:128])
        return JSONResponse({"messages": messages})

    async def put_payload(request: Request) -> JSONResponse:
        """The claim check's sealed bytes (octet-stream), kept under their sha256; ?ref= if given must be it."""
        import hashlib

        from stigmer.executions.payload_store import MAX_PAYLOAD, REF

        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > MAX_PAYLOAD:
            raise _payload_too_large()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_PAYLOAD:
                raise _payload_too_large()
            chunks.append(chunk)
        data = b"".join(chunks)
        ref = hashlib.sha256(data).hexdigest()
        given = request.query_params.get("ref")
        if given is not None and not REF.fullmatch(given):
            raise StigmerError(
                f"Bad request: ref {given[:80]!r} is not a sha256 (64 lowercase hex digits).",
                code=ErrorCode.INVALID_INPUT,
            )
        if given is not None and given != ref:
            raise StigmerError(
                f"Bad request: the body's sha256 is {ref}, not the ref given ({given}).",
                code=ErrorCode.INVALID_INPUT,
            )
        await asyncio.to_thread(ex().db.put_payload, ref, data)
        return JSONResponse({"ref": ref, "size": size}, status_code=201)

    async def get_payload(request: Request) -> Response:
        from stigmer.executions.payload_store import REF

        ref = request.path_params["ref"]
        if not REF.fullmatch(ref):
            raise StigmerError(
                f"Bad request: {ref[:80]!r} is not a payload ref (a sha256: 64 lowercase hex digits).",
                code=ErrorCode.INVALID_INPUT,
            )
        data = await asyncio.to_thread(ex().db.get_payload, ref)
        if data is None:
            raise StigmerError(f"No payload {ref}.", code=ErrorCode.NOT_FOUND)
        return Response(data, media_type="application/octet-stream")

    return [
        Route(f"{PREFIX}/hello", hello),
        Route(f"{PREFIX}/payloads", put_payload, methods=["POST"]),
        Route(f"{PREFIX}/payloads/{{ref}}", get_payload),
        Route(f"{PREFIX}/executions/{{id}}/transcript", transcript, methods=["POST"]),
        Route(f"{PREFIX}/executions/{{id}}/claim", claim, methods=["POST"]),
        Route(f"{PREFIX}/executions/{{id}}/events", events, methods=["POST"]),
        Route(f"{PREFIX}/executions/{{id}}/decisions", decisions, methods=["POST"]),
    ]

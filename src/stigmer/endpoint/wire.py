"""OpenAI's wire format, exactly as its clients parse it: model objects, completions, stream chunks, the
`[DONE]` end, and errors as {"error": {"message", "type", "param", "code"}} (never Stigmer's own error
shape on these paths: an OpenAI client reads `error.message`)."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from starlette.responses import JSONResponse

from stigmer.errors import ErrorCode, StigmerError

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# The `type` an OpenAI client sees for each status (its SDK raises by status; people read the type).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_stigmer(e: StigmerError) -> OpenAIError:
    """A Stigmer error in OpenAI's shape: the message with its hint, the same status, Stigmer's code."""
    message = f"{e.message} {e.hint}".strip() if e.hint else e.message
    return OpenAIError(e.code.http_status, message, code=e.code.code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model {model[:200]!r} does not exist here. GET /v1/models lists the models and agents served.",
        code="model_not_found",
        param="model",
    )


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, code=ErrorCode.INVALID_INPUT.code, param=param)


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


def model_object(model_id: str, owned_by: str, created: int = 0) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(
    cid: str,
    model: str,
    created: int,
    content: str | None,
    finish_reason: str,
    usage_: dict[str, int] | None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_ or usage(0, 0),
    }


def chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    *,
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One stream chunk. `delta=None` is the usage-only chunk (`stream_options.include_usage`): no choices."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    out["choices"] = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

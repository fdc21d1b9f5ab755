"""One chat request relayed to the LLM and its answer relayed back: the ASGI response `Exchange` (queue
turn, upstream request, answer or error), the two ways to send the request (`open_loopback`, `open_httpx`)
and the mapping of the LLM's errors to OpenAI's shape.

The answer goes on as it arrives, chunk by chunk, never parsed on the OpenAI-compatible path: a token's
chunk costs the event loop one read and one write. Only Anthropic's answers are parsed, to translate them.

The client's going away is watched from the start: while it waits its turn (it leaves the queue), while
the LLM reads the prompt (no answer head yet), and while the answer streams. In every case the upstream
connection is closed at once, which is what makes a local engine stop generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import SplitResult

from starlette.responses import Response

from stigmer.endpoint import anthropic_wire, wire
from stigmer.endpoint.queue import FairQueue, QueueFull, Slot
from stigmer.endpoint.wire import OpenAIError
from stigmer.net.guard import Receive, Scope, Send
from stigmer.net.loopback_http import (
    BackendError,
    connect,
    read_all,
    read_body,
    read_head,
    relay,
    request_head,
    wait_disconnect,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

ERROR_LIMIT = 64 * 1024  # of an error answer read to be shown
ANSWER_LIMIT = 32 * 1024 * 1024  # of a whole (not streamed) Anthropic answer, parsed to be translated
SSE_START = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    *((k.lower().encode(), v.encode()) for k, v in wire.SSE_HEADERS.items()),
]
# OpenAI's codes for an LLM's own error types that say the same (llama.cpp's for a prompt too long).
_CODES = {"exceed_context_size_error": "context_length_exceeded"}
# An LLM's error type passed on as it is when OpenAI has it; others get the type of their status.
_OPENAI_TYPES = frozenset({"invalid_request_error", "authentication_error", "permission_error"})


class Unreachable(Exception):
    """No answer from the LLM: `status` 503 (nothing listens), 502 (broken answer) or 504 (timeout)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass
class Answer:
    """The LLM's answer: its head read, its body to come."""

    status: int
    content_type: str
    length: int | None
    retry_after: str | None
    body: AsyncIterator[bytes]
    close: Callable[[], Awaitable[None]]


@dataclass
class Call:
    """One request to the LLM, ready to send."""

    open: Callable[[], Coroutine[Any, Any, Answer]]
    anthropic: bool  # the answer is Anthropic's, to translate
    stream: bool
    include_usage: bool
    model: str
    noun: str  # "the Local LLM (built-in engine)": who failed, in messages
    where: str  # its base URL without credentials
    local: bool
    secrets: tuple[str, ...] = field(default=(), repr=False)  # never shown, even if the LLM echoes them

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


# -- sending the request --------------------------------------------------------------------------------


async def open_loopback(url: SplitResult, headers: list[tuple[bytes, bytes]], payload: bytes) -> Answer:
    """POST on net.loopback_http: for the LLM servers on this machine (half of httpx's CPU per token)."""
    host, port = url.hostname or "127.0.0.1", url.port or 80
    try:
        reader, writer = await connect(host, port)
    except (OSError, TimeoutError) as e:
        raise Unreachable(503, _why(e)) from None
    try:
        writer.write(request_head(b"POST", url.path.encode(), host, port, headers, len(payload)) + payload)
        head = await read_head(reader)
    except (OSError, BackendError) as e:
        writer.close()
        raise Unreachable(502 if isinstance(e, BackendError) else 503, _why(e)) from None
    except BaseException:  # cancelled while the LLM read the prompt: close, so that it stops
        writer.close()
        raise

    async def close() -> None:
        writer.close()

    return Answer(
        head.status,
        (head.get(b"content-type") or b"").decode("latin-1"),
        head.length,
        _text(head.get(b"retry-after")),
        read_body(reader, "POST", head),
        close,
    )


async def open_httpx(client: Any, url: str, headers: dict[str, str], payload: bytes) -> Answer:
    """POST with httpx: remote endpoints (TLS, the environment's proxies)."""
    import httpx

    request = client.build_request("POST", url, content=payload, headers=headers)
    try:
        response = await client.send(request, stream=True)
    except httpx.ConnectTimeout as e:
        raise Unreachable(503, _why(e) or "connection timed out") from None
    except httpx.TimeoutException as e:
        raise Unreachable(504, _why(e) or "timed out") from None
    except httpx.ConnectError as e:
        raise Unreachable(503, _why(e)) from None
    except httpx.HTTPError as e:
        raise Unreachable(502, _why(e)) from None

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as e:
            raise BackendError(_why(e)) from e

    return Answer(
        response.status_code,
        response.headers.get("content-type", ""),
        None,  # decoded (gzip) bytes: the upstream's length is not theirs
        response.headers.get("retry-after"),
        body(),
        response.aclose,
    )


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


# -- the response ---------------------------------------------------------------------------------------


class _ClientGone(Exception):
    pass


async def _unless_gone(gone: asyncio.Future[None], work: Coroutine[Any, Any, T]) -> T:
    """The result of `work`, or _ClientGone (and `work` cancelled) when the client leaves first."""
    task = asyncio.ensure_future(work)
    await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled() and task.exception() is None:
        return task.result()  # it finished as it was cancelled: its result must be released
    raise _ClientGone


class Exchange(Response):
    """The ASGI answer to one chat request: waits its turn (local LLMs), sends the request, relays the
    answer or an error in OpenAI's shape. Whatever happens, the turn is released and the upstream
    connection closed when it ends."""

    def __init__(self, call: Call, *, queue: FairQueue | None, caller: str) -> None:
        super().__init__(media_type="text/event-stream" if call.stream else "application/json")
        self.call = call
        self.queue = queue
        self.caller = caller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone: asyncio.Future[None] = asyncio.ensure_future(wait_disconnect(receive))
        slot: Slot | None = None
        answer: Answer | None = None
        try:
            if self.queue is not None:
                slot = self.queue.try_acquire() or await _unless_gone(gone, self.queue.acquire(self.caller))
            answer = await _unless_gone(gone, self.call.open())
            if answer.status >= 300:  # redirects are not followed: an endpoint that moved is an error
                raw = await _unless_gone(gone, read_all(answer.body, ERROR_LIMIT))
                raise upstream_error(self.call, answer.status, raw, answer.retry_after)
            await self._deliver(answer, send, gone)
        except _ClientGone:
            pass
        except QueueFull as e:
            await _send_error(send, queue_full(e))
        except Unreachable as e:
            await _send_error(send, unreachable(self.call, e))
        except OpenAIError as e:
            await _send_error(send, e)
        finally:
            gone.cancel()
            if answer is not None:
                await answer.close()
            if slot is not None:
                slot.release()

    def _extra_headers(self) -> list[tuple[bytes, bytes]]:
        # headers routes.py may have set on this response (not the type and length: ours)
        return [(k, v) for k, v in self.raw_headers if k not in (b"content-type", b"content-length")]

    async def _deliver(self, answer: Answer, send: Send, gone: asyncio.Future[None]) -> None:
        call = self.call
        if call.anthropic and not call.stream:
            raw = await _unless_gone(gone, read_all(answer.body, ANSWER_LIMIT))
            try:
                message = json.loads(raw)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                raise Unreachable(502, "the answer is not a JSON message")
            whole = json.dumps(anthropic_wire.completion(message, call.model)).encode()
            await _send_whole(send, 200, whole, self._extra_headers())
            return
        sse = call.stream and (call.anthropic or answer.content_type.startswith("text/event-stream"))
        if sse:
            headers = SSE_START
        else:
            headers = [(b"content-type", (answer.content_type or "application/json").encode("latin-1"))]
            if answer.length is not None:
                headers.append((b"content-length", str(answer.length).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers + self._extra_headers()})
        body = _translated(answer.body, call) if call.anthropic else answer.body
        try:
            await relay(body, send, gone)
        except BackendError as e:
            if not sse:
                raise  # a JSON answer cut short: uvicorn breaks the connection, the client sees it
            # In a stream, as OpenAI reports an error mid-answer (its clients raise it).
            log.warning("the LLM's stream broke: %s", e)
            failure = OpenAIError(502, f"{call.noun} stopped answering mid-stream ({call.scrub(str(e))}).")
            await send({"type": "http.response.body", "body": wire.sse(failure.body()), "more_body": False})


async def _translated(body: AsyncIterator[bytes], call: Call) -> AsyncIterator[bytes]:
    """Anthropic's SSE events in, OpenAI's chunks out (an event's lines may span network chunks)."""
    translator = anthropic_wire.StreamTranslator(call.model, include_usage=call.include_usage)
    pending = b""
    async for data in body:
        pending += data
        *lines, pending = pending.split(b"\n")
        out = bytearray()
        for line in lines:
            if line.startswith(b"data:"):
                try:
                    event = json.loads(line[5:])
                except ValueError:
                    raise BackendError(f"not a JSON event: {line[:80]!r}") from None
                if isinstance(event, dict):
                    out += translator.event(event)
        if out:
            yield bytes(out)
        if translator.finished:
            return
    raise BackendError("the stream ended before its last event")


async def _send_whole(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, e: OpenAIError) -> None:
    body = json.dumps(e.body()).encode()
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers.items()]
    await _send_whole(send, e.status, body, extra)


# -- errors -----------------------------------------------------------------------------------------------


def queue_full(e: QueueFull) -> OpenAIError:
    return OpenAIError(
        429,
        f"The local LLM is busy: {e.waiting} requests are already waiting their turn. Try again in about "
        f"{e.retry_after} s (server.max_queue sets how many may wait).",
        code="queue_full",
        headers={"Retry-After": str(e.retry_after)},
    )


def unreachable(call: Call, e: Unreachable) -> OpenAIError:
    why = call.scrub(e.why)
    if e.status == 504:
        return OpenAIError(
            504, f"{call.noun} at {call.where} did not answer in time ({why}).", code="timeout"
        )
    if call.local and e.status == 503:
        message = (
            f"{call.noun} is not answering at {call.where} ({why}). "
            "See what it is doing: stigmer server llm status (start it: stigmer server)"
        )
    else:
        message = (
            f"{call.noun} at {call.where} could not be reached or gave no answer ({why}). "
            "Check the endpoint and this machine's connection: stigmer server llm status"
        )
    return OpenAIError(e.status, message, code="llm_unavailable")


def _fields(raw: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, code, param) of an error body in any of the shapes LLM servers answer with:
    OpenAI's, llama.cpp's (an integer code), Anthropic's, Ollama's ({"error": "text"}), or plain text."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:1000], None, None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, str):
        return err, None, None, None
    if not isinstance(err, dict):
        return json.dumps(data)[:1000], None, None, None

    def text(name: str) -> str | None:
        value = err.get(name)
        return value if isinstance(value, str) and value else None

    return text("message") or "no message", text("type"), text("code"), text("param")


def upstream_error(call: Call, status: int, raw: bytes, retry_after: str | None) -> OpenAIError:
    """The LLM's error answer in OpenAI's shape, with a status that tells the client whose it is."""
    message, kind, code, param = _fields(raw)
    message = call.scrub(message)
    if status < 400:
        return OpenAIError(502, f"{call.noun} answered HTTP {status} (is llm.base_url right?): {message}")
    later = {"Retry-After": retry_after} if retry_after and retry_after.strip().isdigit() else {}
    if status in (401, 403):
        # The LLM refused Stigmer's key for it: the client's own key was fine, the server is misconfigured.
        return OpenAIError(
            502,
            f"{call.noun} refused the API key the Stigmer server has for it (HTTP {status}: {message}). "
            "Set the right one on the server: stigmer config set llm.api_key KEY",
            code="llm_key_refused",
        )
    if status == 429:
        return OpenAIError(429, message, code=code or "rate_limit_exceeded", headers=later)
    if status in (503, 529):  # 529: Anthropic overloaded
        return OpenAIError(503, f"{call.noun} is unavailable: {message}", code=code, headers=later)
    if status >= 500:
        return OpenAIError(502, f"{call.noun} failed (HTTP {status}): {message}", code=code)
    if status == 408:
        return OpenAIError(504, f"{call.noun} timed out: {message}", code="timeout")
    code = _CODES.get(kind or "", code)
    return OpenAIError(status, message, code=code, param=param, type=kind if kind in _OPENAI_TYPES else None)

"""A conversation's earlier turns, given to the model inside the model-request activity.

When they do not all fit the model's context (the worker's estimate, ~4 characters a token, against the
window it knows), the oldest turns are left out, the instructions and the latest turns always kept; when
the window is not known or the estimate was short, a context-overflow answer from the model leaves out
half of what is left and asks again, so a turn never fails for it. Either way the stream gets a notice
and the record how many turns were left out.

The workflow of a turn knows only the turn's own messages; the transcript (the completed turns before it,
as the API stored them) is read from the API by the activity, with the execution's ticket, and put
before those messages. So nothing of the transcript crosses Temporal: a turn's history stays the size
of the turn, however long its session (the known failure of keeping a chat in workflow history: the
50 MB limit). Read once per execution and worker, then kept for the turn's other model requests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings

KEPT = 64  # executions whose transcript this worker keeps (a few turns in flight at most)
CHARS_PER_TOKEN = 3.5  # a cautious average for English and code
ANSWER_ROOM = 1024  # tokens kept free for the answer when the request does not say (max_tokens)
OVERFLOW = ("context", "too long", "maximum", "exceed", "n_ctx")  # what context errors say
_cache: OrderedDict[str, list[list[ModelMessage]]] = OrderedDict()
TRANSCRIPT_FAILED = "The conversation so far could not be read"
_told: set[str] = set()  # executions whose left-out turns were announced


def turns_of(messages: list[ModelMessage]) -> list[list[ModelMessage]]:
    """The transcript split into turns: each starts with the person's message."""
    turns: list[list[ModelMessage]] = []
    for m in messages:
        starts = isinstance(m, ModelRequest) and any(isinstance(p, UserPromptPart) for p in m.parts)
        if starts or not turns:
            turns.append([])
        turns[-1].append(m)
    return turns


def tokens(messages: list[ModelMessage]) -> int:
    size = 0
    for m in messages:
        for part in m.parts:
            size += len(str(getattr(part, "content", "") or "")) + len(str(getattr(part, "args", "") or ""))
    return int(size / CHARS_PER_TOKEN) + 4 * len(messages)


def fitting(turns: list[list[ModelMessage]], current: list[ModelMessage], context: int, answer: int) -> int:
    """How many of the latest turns fit in `context` beside the current messages and the answer."""
    if context <= 0:
        return len(turns)
    budget = context - answer - tokens(current)
    kept = 0
    for turn in reversed(turns):
        budget -= tokens(turn)
        if budget < 0:
            break
        kept += 1
    return kept


def is_overflow(e: BaseException) -> bool:
    """A model's answer that the request was larger than its context (HTTP 400 with such words)."""
    status = getattr(e, "status_code", None) or getattr(e, "status", None)
    text = f"{getattr(e, 'body', '')} {e}".lower()
    return status == 400 and any(word in text for word in OVERFLOW)


def to_model_messages(stored: list[dict[str, Any]]) -> list[ModelMessage]:
    """The record's messages (user, assistant with its tool calls, tool results) as pydantic-ai's."""
    out: list[ModelMessage] = []
    for m in stored:
        role, content, data = m.get("role"), str(m.get("content") or ""), m.get("data") or {}
        if role == "user":
            out.append(ModelRequest(parts=[UserPromptPart(content=content)]))
        elif role == "assistant":
            parts: list[Any] = [TextPart(content=content)] if content else []
            for call in data.get("tool_calls") or []:
                parts.append(
                    ToolCallPart(str(call.get("tool", "")), call.get("args") or {}, str(call.get("id", "")))
                )
            if parts:
                out.append(ModelResponse(parts=parts))
        elif role == "tool":
            part = ToolReturnPart(str(data.get("tool", "")), content, str(data.get("id", "")))
            out.append(ModelRequest(parts=[part]))
    return out


async def transcript(execution_id: str, ticket: str) -> list[list[ModelMessage]]:
    """The session's earlier turns, from the API (with the execution's ticket), once per execution."""
    if execution_id in _cache:
        _cache.move_to_end(execution_id)
        return _cache[execution_id]
    from temporalio.exceptions import ApplicationError

    from stigmer.runner.publish import Refused, call

    try:
        got = await call(f"/executions/{execution_id}/transcript", {"ticket": ticket})
    except Refused as e:  # a damaged transcript, a ticket refused: asking again will not help
        raise ApplicationError(f"{TRANSCRIPT_FAILED}: {e}", non_retryable=True) from None
    turns = turns_of(to_model_messages(list(got.get("messages") or [])))
    _cache[execution_id] = turns
    while len(_cache) > KEPT:
        _cache.popitem(last=False)
    return turns


class WithTranscript(WrapperModel):
    """The worker's model for a turn of a conversation: the transcript goes first in every request, as
    much of it as fits."""

    def __init__(self, wrapped: Any, execution_id: str, ticket: str, context: int = 0) -> None:
        super().__init__(wrapped)
        self.execution_id = execution_id
        self.ticket = ticket
        self.context = context

    async def _earlier(
        self, messages: list[ModelMessage], settings: ModelSettings | None, kept: int | None
    ) -> tuple[list[ModelMessage], int]:
        turns = await transcript(self.execution_id, self.ticket)
        answer = int((settings or {}).get("max_tokens") or min(ANSWER_ROOM, max(self.context // 4, 1)))
        fit = fitting(turns, messages, self.context, answer)
        kept = fit if kept is None else min(kept, fit)
        return [m for turn in turns[len(turns) - kept :] for m in turn] if kept else [], len(turns) - kept

    async def _tell(self, left_out: int) -> None:
        if not left_out or self.execution_id in _told:
            return
        _told.add(self.execution_id)
        from stigmer.runner.publish import post_events

        text = (
            f"The conversation is longer than the model's context: its {left_out} oldest "
            f"turn{'s' if left_out != 1 else ''} {'were' if left_out != 1 else 'was'} left out of what the model was sent."
        )
        await post_events(
            self.execution_id, self.ticket, [{"type": "notice", "text": text, "turns_left_out": left_out}]
        )

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        kept: int | None = None
        while True:
            earlier, left_out = await self._earlier(messages, model_settings, kept)
            try:
                response = await super().request(
                    [*earlier, *messages], model_settings, model_request_parameters
                )
            except Exception as e:
                if not earlier or not is_overflow(e):
                    raise
                kept = _fewer(earlier, kept)
                continue
            await self._tell(left_out)
            return response

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: Any = None,
    ) -> AsyncGenerator[StreamedResponse]:
        kept: int | None = None
        while True:
            earlier, left_out = await self._earlier(messages, model_settings, kept)
            opened = super().request_stream(
                [*earlier, *messages], model_settings, model_request_parameters, run_context
            )
            try:
                stream = await opened.__aenter__()
            except Exception as e:
                if not earlier or not is_overflow(e):
                    raise
                kept = _fewer(earlier, kept)
                continue
            break
        await self._tell(left_out)
        try:
            yield stream
        except BaseException as e:
            if not await opened.__aexit__(type(e), e, e.__traceback__):
                raise
        else:
            await opened.__aexit__(None, None, None)


def _fewer(earlier: list[ModelMessage], kept: int | None) -> int:
    """After an overflow: half of the turns that were sent (0 at the end)."""
    sent = len(turns_of(earlier)) if kept is None else kept
    return sent // 2

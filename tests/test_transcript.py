"""The conversation given to the model inside the activity (runner/transcript.py): the record's messages as
pydantic-ai's, turns kept newest first within the context, and a context overflow answered by leaving
out older turns and asking again (with a notice), never a failed turn. The model is pydantic-ai's own
FunctionModel standing in for a provider that refuses requests over its context."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.models.function import AgentInfo, FunctionModel

from stigmer.runner import transcript as tr

STORED = [
    {"role": "user", "content": "list the files"},
    {
        "role": "assistant",
        "content": "",
        "data": {"tool_calls": [{"tool": "list_files", "id": "c1", "args": {}}]},
    },
    {"role": "tool", "content": "a.txt", "data": {"tool": "list_files", "id": "c1"}},
    {"role": "assistant", "content": "There is a.txt."},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


def test_the_record_s_messages_become_the_model_s_turns() -> None:
    messages = tr.to_model_messages(STORED)
    kinds = [type(m).__name__ for m in messages]
    assert kinds == [
        "ModelRequest",
        "ModelResponse",
        "ModelRequest",
        "ModelResponse",
        "ModelRequest",
        "ModelResponse",
    ]
    call = messages[1].parts[0]
    assert isinstance(call, ToolCallPart) and call.tool_call_id == "c1" and call.tool_name == "list_files"
    assert [len(t) for t in tr.turns_of(messages)] == [4, 2]


def _turn(i: int, size: int) -> list[ModelMessage]:
    return [ModelRequest(parts=[UserPromptPart(content=f"turn {i} " + "x" * size)]),
            ModelResponse(parts=[TextPart(content=f"answer {i}")])]  # fmt: skip


def test_the_latest_turns_that_fit_are_kept() -> None:
    turns = [_turn(i, 700) for i in range(10)]  # ~200 tokens each
    current = [ModelRequest(parts=[UserPromptPart(content="now")])]
    assert tr.fitting(turns, current, 0, 100) == 10  # unknown window: everything
    kept = tr.fitting(turns, current, 1024, 256)
    assert 0 < kept < 10 and sum(tr.tokens(t) for t in turns[-kept:]) <= 1024 - 256


class _Small:
    """A provider with a context of `limit` characters: over it, the 400 that llama.cpp and OpenAI give."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: list[list[str]] = []

    def __call__(self, messages: list[ModelMessage], _info: AgentInfo) -> ModelResponse:
        users = [str(p.content) for m in messages for p in m.parts if isinstance(p, UserPromptPart)]
        self.seen.append(users)
        if sum(len(u) for u in users) > self.limit:
            raise ModelHTTPError(
                400, "small", body={"error": {"message": "the request exceeds the available context size"}}
            )
        return ModelResponse(parts=[TextPart(content="ok")])


@pytest.fixture
def told(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def post_events(_exec: str, _ticket: str, events: list[dict[str, Any]], **_: Any) -> bool:
        sent.extend(events)
        return True

    from stigmer.runner import publish

    monkeypatch.setattr(publish, "post_events", post_events)
    tr._cache.clear()
    tr._told.clear()
    return sent


def test_an_overflow_leaves_out_older_turns_and_says_so(
    told: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    turns = [_turn(i, 1000) for i in range(8)]
    tr._cache["ex-1"] = turns
    small = _Small(limit=3500)
    model = tr.WithTranscript(FunctionModel(small), "ex-1", "tk", context=0)  # window unknown: learn it
    current: list[ModelMessage] = [ModelRequest(parts=[UserPromptPart(content="and now?")])]
    response = asyncio.run(model.request(current, None, ModelRequestParameters()))
    assert response.parts[0].content == "ok"  # type: ignore[union-attr]
    last = small.seen[-1]
    assert last[-1] == "and now?" and last[-2].startswith("turn 7")  # the latest turns kept, in order
    assert len(small.seen) > 1 and not any(u.startswith("turn 0") for u in last)
    notice = [e for e in told if e["type"] == "notice"]
    assert len(notice) == 1 and notice[0]["turns_left_out"] == 8 - (len(last) - 1)


def test_a_known_window_trims_before_asking(told: list[dict[str, Any]]) -> None:
    tr._cache["ex-2"] = [_turn(i, 1000) for i in range(8)]
    small = _Small(limit=100_000)
    model = tr.WithTranscript(FunctionModel(small), "ex-2", "tk", context=1200)
    asyncio.run(
        model.request(
            [ModelRequest(parts=[UserPromptPart(content="q")])], {"max_tokens": 100}, ModelRequestParameters()
        )
    )
    assert len(small.seen) == 1 and 1 < len(small.seen[0]) < 9  # trimmed at once, no error needed
    assert told and told[0]["turns_left_out"] == 9 - len(small.seen[0])


def test_other_errors_are_not_taken_for_an_overflow(told: list[dict[str, Any]]) -> None:
    tr._cache["ex-3"] = [_turn(0, 10)]

    def broken(_m: list[ModelMessage], _i: AgentInfo) -> ModelResponse:
        raise ModelHTTPError(401, "m", body={"error": {"message": "bad key"}})

    model = tr.WithTranscript(FunctionModel(broken), "ex-3", "tk")
    with pytest.raises(ModelHTTPError):
        asyncio.run(
            model.request([ModelRequest(parts=[UserPromptPart(content="q")])], None, ModelRequestParameters())
        )
    assert not told

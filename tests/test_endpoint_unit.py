"""The OpenAI-compatible endpoint's pure parts: OpenAI messages as a turn of a conversation (the history
in the record's format, which the runner's transcript reads), the stream's notices, the wire shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stigmer.endpoint import wire
from stigmer.endpoint.agent_turns import MAX_MESSAGES, notice, turn_of
from stigmer.errors import ErrorCode, StigmerError
from stigmer.executions.contract import EventKind
from stigmer.runner.transcript import to_model_messages


def test_messages_become_history_and_the_turn_s_message() -> None:
    history, message = turn_of(
        [
            {"role": "system", "content": "client prompt"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "list "}, {"type": "text", "text": "files"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": '{"path": "."}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
            {"role": "assistant", "content": "There is a.txt."},
            {"role": "developer", "content": "ignored too"},
            {"role": "user", "content": "Read it."},
        ]
    )
    assert message == "Read it."
    assert history == [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": "", "data": {"tool_calls": [{"tool": "ls", "args": {"path": "."}, "id": "c1"}]}},
        {"role": "tool", "content": "a.txt", "data": {"tool": "ls", "id": "c1"}},
        {"role": "assistant", "content": "There is a.txt."},
    ]  # fmt: skip
    # the runner reads it as pydantic-ai messages: the tool call and its return pair up by id
    models = to_model_messages(history)
    call, ret = models[1].parts[0], models[2].parts[0]
    assert call.tool_call_id == ret.tool_call_id == "c1" and ret.tool_name == "ls"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "assistant", "content": "I spoke last"}],
        [{"role": "user", "content": "   "}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        [{"role": "wizard", "content": "x"}],
        [{"content": "no role"}],
        [{"role": "user", "content": 42}],
        [{"role": "assistant", "tool_calls": [{"id": "x"}]}, {"role": "user", "content": "y"}],
        [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1),
    ],
)
def test_what_is_not_a_turn_is_refused_with_the_param(messages: Any) -> None:
    with pytest.raises(wire.OpenAIError) as e:
        turn_of(messages)
    assert e.value.status == 400 and e.value.param == "messages"
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_arguments_that_are_not_json_are_kept_as_text() -> None:
    history, _ = turn_of(
        [
            {
                "role": "assistant",
                "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{oops"}}],
            },
            {"role": "user", "content": "go on"},
        ]
    )
    assert history[0]["data"]["tool_calls"][0]["args"] == {"arguments": "{oops"}


def test_notices_say_what_the_agent_does_and_how_to_answer_an_approval() -> None:
    call = notice(EventKind.TOOL_CALL, {"name": "run_command", "args": {"argv": ["ls"]}}, "ex-1")
    assert call is not None and '> Tool: run_command({"argv": ["ls"]})' in call
    result = notice(EventKind.TOOL_RESULT, {"content": "a\nb" + "x" * 1000}, "ex-1")
    assert result is not None and result.startswith("> -> a b") and len(result) < 320
    wait = notice(EventKind.APPROVAL_REQUIRED, {"name": "run_command", "args": {}}, "ex-1")
    assert wait is not None and "stigmer execution approve ex-1" in wait
    assert notice(EventKind.STARTED, {}, "ex-1") is None


def test_wire_shapes() -> None:
    err = wire.from_stigmer(StigmerError("No such thing.", hint="Try again.", code=ErrorCode.NOT_FOUND))
    assert err.status == 404 and err.body() == {
        "error": {"message": "No such thing. Try again.", "type": "invalid_request_error", "param": None, "code": "not_found"}
    }  # fmt: skip
    assert wire.OpenAIError(503, "down").type == "server_error"
    usage_only = wire.chunk("c", "m", 1, None, usage_=wire.usage(2, 3))
    assert usage_only["choices"] == [] and usage_only["usage"]["total_tokens"] == 5
    line = wire.sse(wire.chunk("c", "m", 1, {"content": "hi"}, None))
    assert line.startswith(b"data: {") and line.endswith(b"\n\n")
    assert json.loads(line[6:])["object"] == "chat.completion.chunk"

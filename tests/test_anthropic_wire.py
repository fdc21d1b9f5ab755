"""OpenAI's chat completions in Anthropic's Messages API and back (endpoint/anthropic_wire.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stigmer.endpoint import anthropic_wire as aw
from stigmer.endpoint.wire import OpenAIError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "clock"}},
]


def test_a_conversation_with_tool_calls_and_results() -> None:
    body = {
        "model": "local",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "12:00"}]},
            {"role": "user", "content": [{"type": "text", "text": "Thanks."}]},
        ],
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": "END",
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
    }  # fmt: skip
    out = aw.request(body, "claude-sonnet-4-5")
    assert out["model"] == "claude-sonnet-4-5" and out["system"] == "Be brief.\n\nUse tools."
    assert out["max_tokens"] == aw.DEFAULT_MAX_TOKENS and out["stop_sequences"] == ["END"]
    assert out["temperature"] == 0.2 and out["top_p"] == 0.9 and out["stream"] is True
    assert "seed" not in out and "stream_options" not in out  # no Anthropic counterpart
    assert out["metadata"] == {"user_id": "u-1"}
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["tools"] == [
        {
            "name": "weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "description": "The weather in a city.",
        },
        {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and the time?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "c2", "name": "clock", "input": {}},
            ],
        },
        {
            "role": "user",  # both results and the next user turn in one message, results first
            "content": [
                {"type": "tool_result", "tool_use_id": "c1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "c2", "content": "12:00"},
                {"type": "text", "text": "Thanks."},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "want"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "clock"}}, {"type": "tool", "name": "clock"}),
    ],
)
def test_tool_choice(choice: Any, want: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": choice}
    assert aw.request(body, "m")["tool_choice"] == want


def test_max_tokens_images_and_an_empty_assistant_turn() -> None:
    body = {
        "max_completion_tokens": 99,
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
            ]},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Well?"},
        ],
    }  # fmt: skip
    out = aw.request(body, "m")
    assert out["max_tokens"] == 99
    assert out["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                {"type": "text", "text": "Well?"},
            ],
        }
    ]


def test_response_format_becomes_an_instruction() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = {
        "messages": [{"role": "system", "content": "Count."}, {"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    }
    system = aw.request(body, "m")["system"]
    assert system.startswith("Count.\n\n" + aw.JSON_ONLY)
    assert json.dumps(schema, separators=(",", ":")) in system
    assert aw.request({**body, "response_format": {"type": "json_object"}}, "m")["system"].endswith(
        aw.JSON_ONLY
    )
    assert "system" not in aw.request(
        {"messages": body["messages"][1:], "response_format": {"type": "text"}}, "m"
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [
                {"id": "c", "function": {"name": "f", "arguments": "{not json"}}]}]},
            "messages",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "grammar"}}, "response_format"),
    ],
)  # fmt: skip
def test_requests_anthropic_cannot_take_are_refused_with_400(body: dict[str, Any], param: str | None) -> None:
    with pytest.raises(OpenAIError) as refused:
        aw.request(body, "m")
    assert refused.value.status == 400 and refused.value.param == param


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "content_filter"), ("something_new", "stop")],
)  # fmt: skip
def test_finish_reasons(stop: str, finish: str) -> None:
    assert aw.finish_reason(stop) == finish


def test_an_answer_with_text_and_a_tool_call() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [
            {"type": "thinking", "thinking": "hmm"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 7},
    }
    out = aw.completion(message, "claude-sonnet-4-5")
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == "claude-sonnet-4-5-20250929"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look."
    assert choice["message"]["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert out["usage"] == {"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32}
    only_call = aw.completion({**message, "content": message["content"][2:]}, "m")
    assert only_call["choices"][0]["message"]["content"] is None


def _events() -> list[dict[str, Any]]:
    return [
        {"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "there."}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "toolu_9", "name": "clock", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"tz":'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '"UTC"}'}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]  # fmt: skip


def _chunks(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for event in raw.decode().split("\n\n"):
        if event.startswith("data: "):
            data = event[6:]
            out.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return out


def test_a_stream_with_text_a_tool_call_and_usage() -> None:
    t = aw.StreamTranslator("claude", include_usage=True)
    chunks = _chunks(b"".join(t.event(e) for e in _events()))
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 9,
        "total_tokens": 21,
    }
    body = chunks[:-2]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "claude-x" for c in body)
    assert len({c["id"] for c in chunks[:-1]}) == 1 and all(c["usage"] is None for c in body)
    deltas = [c["choices"][0]["delta"] for c in body]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1:3] == [{"content": "Hi "}, {"content": "there."}]
    assert deltas[3] == {
        "tool_calls": [
            {"index": 0, "id": "toolu_9", "type": "function", "function": {"name": "clock", "arguments": ""}}
        ]
    }
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas[4:6]] == ['{"tz":', '"UTC"}']
    assert body[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}
    assert t.finished and t.end() == b""  # [DONE] once


def test_a_stream_without_usage_and_an_error_mid_stream() -> None:
    t = aw.StreamTranslator("claude", include_usage=False)
    raw = b"".join(t.event(e) for e in _events()[:5])
    assert all("usage" not in c for c in _chunks(raw))
    error = _chunks(
        t.event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )
    assert error == [
        {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}
    ]
    assert t.finished and t.end() == b""

"""OpenAI's chat completions in Anthropic's Messages API and back: the request (`request`), the answer
(`completion`), the stream (`StreamTranslator`) and errors (`error_fields`). Pure functions on dicts.

What does not map one to one:
- System (and developer) messages become the top-level `system`, wherever they stood.
- Consecutive messages of one Anthropic role are merged (the results of parallel tool calls must reach
  Anthropic as one user message of tool_result blocks).
- `max_tokens` is required by Anthropic: DEFAULT_MAX_TOKENS when the client sets none (nor
  `max_completion_tokens`).
- `response_format` json_object / json_schema becomes an instruction in `system` (answer with JSON only,
  matching the schema). Anthropic has no JSON mode for every model: its structured outputs are a beta of
  some models, and the other way (a forced tool) would take the place of the client's own tools and
  answer through tool_use. Claude follows the instruction reliably; a guarantee it is not.
- `seed`, `presence_penalty`, `frequency_penalty`, `logit_bias` have no Anthropic counterpart and are
  left out; `n` above 1 and `logprobs` are refused (400): the answer could not have their shape.
- `temperature` and `top_p` pass as they are (Anthropic takes temperature 0-1 and says so above 1).
"""

from __future__ import annotations

import json
from typing import Any

from stigmer.endpoint import wire
from stigmer.endpoint.wire import OpenAIError

DEFAULT_MAX_TOKENS = 4096  # every current Claude model can write this much in one answer
VERSION = "2023-06-01"  # the anthropic-version header

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
JSON_ONLY = "Answer with a single JSON value only: no prose before or after it, no code fence."


def _invalid(message: str, param: str | None = None) -> OpenAIError:
    return wire.invalid(message, param)


# -- the request ------------------------------------------------------------------------------------------


def request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat completions body (already resolved to `model`)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("`messages` must be a non-empty list of messages.", "messages")
    if body.get("n") not in (None, 1):
        raise _invalid("`n` above 1 is not supported with the Anthropic provider.", "n")
    if body.get("logprobs"):
        raise _invalid("`logprobs` is not supported with the Anthropic provider.", "logprobs")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{i}] must be an object.", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_only(message.get("content"), f"messages[{i}].content")
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), i)
            anthropic_role = "user"
        elif role == "assistant":
            blocks = _assistant_blocks(message, i)
            anthropic_role = "assistant"
        elif role == "tool":
            blocks = [_tool_result(message, i)]
            anthropic_role = "user"
        else:
            raise _invalid(
                f"messages[{i}].role {str(role)[:40]!r} is not one of system, user, assistant, tool."
            )
        if not blocks:
            continue  # Anthropic refuses empty messages (an assistant turn with no text and no call)
        if turns and turns[-1]["role"] == anthropic_role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": anthropic_role, "content": blocks})
    out: dict[str, Any] = {"model": model, "messages": turns, "max_tokens": _max_tokens(body)}
    instruction = _format_instruction(body.get("response_format"))
    if instruction:
        system.append(instruction)
    if system:
        out["system"] = "\n\n".join(system)
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = [str(s) for s in stop]
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(t, i) for i, t in enumerate(tools if isinstance(tools, list) else [None])]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and tools:  # Anthropic takes a tool_choice only with tools
        out["tool_choice"] = choice
    if isinstance(body.get("user"), str) and body["user"]:
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream") is True:
        out["stream"] = True
    return out


def _max_tokens(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _invalid(f"`{name}` must be a positive integer.", name)
            return value
    return DEFAULT_MAX_TOKENS


def _format_instruction(fmt: Any) -> str:
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return ""
    if fmt.get("type") == "json_object":
        return JSON_ONLY
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _invalid("`response_format.json_schema.schema` must be a JSON schema.", "response_format")
        return f"{JSON_ONLY} It must match this JSON schema:\n{json.dumps(schema, separators=(',', ':'))}"
    raise _invalid(
        f"`response_format.type` {str(fmt.get('type'))[:40]!r} is not supported.", "response_format"
    )


def _text_only(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _invalid(f"{where} may hold only text parts here.", "messages")
            parts.append(str(part.get("text") or ""))
        return "".join(parts)
    raise _invalid(f"{where} must be a string or a list of content parts.", "messages")


def _user_blocks(content: Any, i: int) -> list[dict[str, Any]]:
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _invalid(f"messages[{i}].content must be a string or a list of content parts.", "messages")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": str(part["text"])})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), i))
        else:
            raise _invalid(f"messages[{i}].content: a {str(kind)[:40]!r} part is not supported.", "messages")
    return blocks


def _image(spec: Any, i: int) -> dict[str, Any]:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise _invalid(f"messages[{i}]: an image_url part needs a url.", "messages")
    if url.startswith("data:"):
        meta, comma, data = url[5:].partition(",")
        media_type, _, encoding = meta.partition(";")
        if not comma or encoding != "base64" or not media_type:
            raise _invalid(f"messages[{i}]: an image data URL must be data:TYPE;base64,DATA.", "messages")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _assistant_blocks(message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    text = _text_only(message.get("content"), f"messages[{i}].content")
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _invalid(f"messages[{i}].tool_calls must be a list.", "messages")
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name") or not call.get("id"):
            raise _invalid(f"messages[{i}].tool_calls: each needs an id and a function name.", "messages")
        raw = fn.get("arguments") or "{}"
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            raise _invalid(f"messages[{i}].tool_calls: arguments are not JSON.", "messages") from None
        if not isinstance(arguments, dict):
            raise _invalid(f"messages[{i}].tool_calls: arguments must be a JSON object.", "messages")
        blocks.append(
            {"type": "tool_use", "id": str(call["id"]), "name": str(fn["name"]), "input": arguments}
        )
    return blocks


def _tool_result(message: dict[str, Any], i: int) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"messages[{i}] (a tool result) needs its tool_call_id.", "messages")
    return {
        "type": "tool_result",
        "tool_use_id": call_id,
        "content": _text_only(message.get("content"), f"messages[{i}].content"),
    }


def _tool(tool: Any, i: int) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _invalid(f"tools[{i}] must be a function tool with a name.", "tools")
    out: dict[str, Any] = {
        "name": fn["name"],
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        out["description"] = str(fn["description"])
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": str(choice["function"].get("name") or "")}
    else:
        raise _invalid("`tool_choice` must be auto, none, required or a function.", "tool_choice")
    if out is not None and parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


# -- the answer ---------------------------------------------------------------------------------------------


def _usage(raw: Any) -> dict[str, int]:
    u = raw if isinstance(raw, dict) else {}
    prompt = sum(
        int(u.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    return wire.usage(prompt, int(u.get("output_tokens") or 0))


def finish_reason(stop_reason: Any) -> str:
    return FINISH.get(str(stop_reason), "stop")


def completion(message: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat.completion for a Messages API answer."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id") or ""),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name") or ""),
                        "arguments": json.dumps(block.get("input") or {}, separators=(",", ":")),
                    },
                }
            )
    return wire.completion(
        wire.completion_id(),
        str(message.get("model") or model),
        wire.now(),
        "".join(text) if text or not calls else None,
        finish_reason(message.get("stop_reason")),
        _usage(message.get("usage")),
        tool_calls=calls or None,
    )


class StreamTranslator:
    """Anthropic's stream events in, OpenAI's chat.completion.chunk SSE lines out (`event` per event,
    `end` when the upstream stream ends)."""

    def __init__(self, model: str, *, include_usage: bool) -> None:
        self.id = wire.completion_id()
        self.created = wire.now()
        self.model = model
        self.include_usage = include_usage
        self.usage: dict[str, Any] = {}
        self.finished = False
        self._tools: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool call index

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
        data = wire.chunk(self.id, self.model, self.created, delta, finish, **extra)
        if self.include_usage and "usage" not in data:
            data["usage"] = None  # as OpenAI streams it: null on every chunk but the last
        return wire.sse(data)

    def event(self, event: dict[str, Any]) -> bytes:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.model = str(message.get("model") or self.model)
            self.usage.update(message.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tools[int(event.get("index") or 0)] = len(self._tools)
                call = {
                    "index": index,
                    "id": str(block.get("id") or ""),
                    "type": "function",
                    "function": {"name": str(block.get("name") or ""), "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": str(block["text"])})
            return b""
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._chunk({"content": str(delta.get("text") or "")})
            if delta.get("type") == "input_json_delta":
                at = self._tools.get(int(event.get("index") or 0))
                if at is None:
                    return b""
                fn = {"arguments": str(delta.get("partial_json") or "")}
                return self._chunk({"tool_calls": [{"index": at, "function": fn}]})
            return b""  # thinking, signatures, citations: no OpenAI counterpart
        if kind == "message_delta":
            self.usage.update(event.get("usage") or {})
            stop = (event.get("delta") or {}).get("stop_reason")
            return self._chunk({}, finish_reason(stop)) if stop else b""
        if kind == "message_stop":
            return self.end()
        if kind == "error":  # mid-stream (overloaded): as OpenAI reports one, which its clients raise
            self.finished = True
            err = event.get("error") or {}
            message = str(err.get("message") or "the Anthropic API failed mid-answer")
            return wire.sse(OpenAIError(502, message, type=str(err.get("type") or "api_error")).body())
        return b""  # ping, content_block_stop

    def end(self) -> bytes:
        """The usage chunk (when asked for) and [DONE], once."""
        if self.finished:
            return b""
        self.finished = True
        tail = self._chunk(None, usage_=_usage(self.usage)) if self.include_usage else b""
        return tail + wire.DONE

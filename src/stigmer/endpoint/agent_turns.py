"""`agent/NAME` as a chat model: the request's last message is a turn of a conversation run as a durable
execution (its earlier messages are the transcript, or `X-Stigmer-Session` names a stored session), and
the execution's events are the answer, in OpenAI's shape.

The stream carries the model's text as it comes, and what the agent does meanwhile as short text notices
(tool calls and results, a retried model call, a wait for approval with the command that answers it), so
any chat client shows them. A client that goes away does not stop the execution: it runs on, and can be
read back at /v1/executions/ID (or re-attached at /events) with the id the response carried in
`X-Stigmer-Execution`. Without streaming the answer is the recorded output only, once the execution ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from stigmer.endpoint import wire
from stigmer.errors import ErrorCode
from stigmer.executions.answer import rest_of
from stigmer.executions.contract import END_EVENTS, EventKind
from stigmer.server.executions import Executions

PREFIX = "agent/"
MAX_MESSAGES = 10_000  # in one request's history: a conversation, not a corpus
NOTICE_ARGS = 200  # characters of a tool call's arguments shown in a notice
NOTICE_RESULT = 300  # characters of a tool's result shown


def agent_of(model: str) -> str | None:
    return model[len(PREFIX) :] if model.startswith(PREFIX) else None


def _text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or OpenAI's list of parts (text parts only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise wire.invalid(f"{where}: an agent takes text only (parts of type text).", "messages")
            out.append(part["text"])
        return "".join(out)
    raise wire.invalid(f"{where}: content must be a string or a list of text parts.", "messages")


def _args(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(raw) if isinstance(raw, str) and raw else {}
    except ValueError:
        return {"arguments": raw}
    return parsed if isinstance(parsed, dict) else {"arguments": parsed}


def turn_of(messages: Any) -> tuple[list[dict[str, Any]], str]:
    """The history (the record's message format: runner/transcript.py reads it) and the turn's message.

    The last message is the person's; system and developer messages are left out, since an agent's
    instructions come from its own file (a chat client sends its own system prompt with every request)."""
    if not isinstance(messages, list) or not messages:
        raise wire.invalid("`messages` must be a non-empty list.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise wire.invalid(f"At most {MAX_MESSAGES:,} messages in a request.", "messages")
    history: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> tool name, for the tool messages answering them
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise wire.invalid(f"{where} must be an object with a role.", "messages")
        role = m["role"]
        if role in ("system", "developer"):
            continue
        if role == "user":
            history.append({"role": "user", "content": _text(m.get("content"), where)})
        elif role == "assistant":
            calls = []
            for call in m.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise wire.invalid(f"{where}: a tool call needs a function name.", "messages")
                cid = str(call.get("id") or "")
                names[cid] = fn["name"]
                calls.append({"tool": fn["name"], "args": _args(fn.get("arguments")), "id": cid})
            entry: dict[str, Any] = {"role": "assistant", "content": _text(m.get("content"), where)}
            if calls:
                entry["data"] = {"tool_calls": calls}
            history.append(entry)
        elif role == "tool":
            cid = str(m.get("tool_call_id") or "")
            data = {"tool": names.get(cid, ""), "id": cid}
            history.append({"role": "tool", "content": _text(m.get("content"), where), "data": data})
        else:
            raise wire.invalid(f"{where}: unknown role {role[:40]!r}.", "messages")
    if not history or history[-1]["role"] != "user" or not history[-1]["content"].strip():
        raise wire.invalid(
            "The last message must be the user's, with text: it is the agent's turn.", "messages"
        )
    return history[:-1], history[-1]["content"]


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def notice(kind: str, data: dict[str, Any], exec_id: str) -> str | None:
    """A stream event that is not the model's text, as a line of text for a chat client (None: nothing)."""
    if kind == EventKind.TOOL_CALL:
        args = json.dumps(data.get("args") or {}, ensure_ascii=False)
        return f"\n\n> Tool: {data.get('name')}({_short(args, NOTICE_ARGS)})\n"
    if kind == EventKind.TOOL_RESULT:
        result = " ".join(str(data.get("content", "")).split())
        return f"> -> {_short(result, NOTICE_RESULT)}\n\n"
    if kind == EventKind.RETRY:
        return f"\n\n> The model call is being retried (attempt {data.get('attempt')}); its answer starts over:\n\n"
    if kind == EventKind.APPROVAL_REQUIRED:
        args = json.dumps(data.get("args") or {}, ensure_ascii=False)
        return (
            f"\n\n> Waiting for approval: {data.get('name')}({_short(args, NOTICE_ARGS)}).\n"
            f"> Answer it: `stigmer execution approve {exec_id}` (or `deny`), or in `stigmer run` / "
            "`stigmer chat`.\n\n"
        )
    if kind == EventKind.APPROVAL:
        verdict = "allowed" if data.get("approved") else "denied"
        return f"> {data.get('name', 'tool')} {verdict}\n\n"
    if kind == EventKind.NOTICE:
        return f"\n\n> {data.get('text', '')}\n\n"
    return None


def _usage(record: dict[str, Any]) -> dict[str, int]:
    u = record.get("usage") or {}
    return wire.usage(int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0))


def failure(record: dict[str, Any]) -> wire.OpenAIError:
    exec_id = record.get("id", "")
    if record.get("state") == "CANCELLED":
        return wire.OpenAIError(
            409, f"The execution {exec_id} was cancelled.", code=ErrorCode.EXECUTION_CANCELLED.code
        )
    why = record.get("error") or "it failed"
    return wire.OpenAIError(
        500,
        f"The execution {exec_id} failed: {why} (stigmer execution get {exec_id})",
        code=ErrorCode.EXECUTION_FAILED.code,
    )


async def stream(ex: Executions, exec_id: str, model: str, *, include_usage: bool) -> AsyncIterator[bytes]:
    """The execution's events as chat.completion.chunk SSE, then [DONE]."""
    cid, created = wire.completion_id(), wire.now()
    yield wire.sse(wire.chunk(cid, model, created, {"role": "assistant", "content": ""}))
    answer = ""  # the model's text since its last tool call or retry (compared with the record at the end)
    async for _seq, kind, data in ex.stream(exec_id, 0):
        if kind == EventKind.DELTA:
            text = str(data.get("text", ""))
            answer += text
            if text:
                yield wire.sse(wire.chunk(cid, model, created, {"content": text}))
            continue
        if kind in END_EVENTS:
            record = data.get("record") or ex.record(exec_id, messages=False)
            if record.get("state") != "COMPLETED":
                yield wire.sse(failure(record).body())
                yield wire.DONE
                return
            output = record.get("output")
            if isinstance(output, dict):  # an agent with an output schema: its answer is the object's JSON
                output = json.dumps(output, ensure_ascii=False)
            rest = rest_of(answer, output) if isinstance(output, str) else ""
            if rest is None:  # the stream lost part of the answer: say so, then the answer as recorded
                rest = f"\n\n> Part of the streamed answer was lost on the way; the answer as recorded:\n\n{output}"
            if rest:
                yield wire.sse(wire.chunk(cid, model, created, {"content": rest}))
            yield wire.sse(wire.chunk(cid, model, created, {}, "stop"))
            if include_usage:
                yield wire.sse(wire.chunk(cid, model, created, None, usage_=_usage(record)))
            yield wire.DONE
            return
        if kind in (EventKind.TOOL_CALL, EventKind.TOOL_RESULT, EventKind.RETRY):
            answer = ""
        said = notice(kind, data, exec_id)
        if said:
            yield wire.sse(wire.chunk(cid, model, created, {"content": said}))


async def answer(ex: Executions, exec_id: str, model: str, *, approval_wait: float) -> dict[str, Any]:
    """The chat.completion once the execution ends; a wait for approval longer than `approval_wait`
    seconds is a 409 naming the execution (it goes on; it is answered, then read, by id)."""
    waiting_since: float | None = None
    loop = asyncio.get_running_loop()
    events = ex.stream(exec_id, 0)
    try:
        while True:
            timeout = None if waiting_since is None else max(0.0, waiting_since + approval_wait - loop.time())
            try:
                _seq, kind, data = await asyncio.wait_for(anext(events), timeout)
            except TimeoutError:
                raise wire.OpenAIError(
                    409,
                    f"The execution {exec_id} is waiting for approval of a tool call. Answer it "
                    f"(stigmer execution approve {exec_id}, or deny), then read its answer: "
                    f"GET /v1/executions/{exec_id}",
                    code="approval_required",
                    headers={"X-Stigmer-Execution": exec_id},
                ) from None
            if kind == EventKind.APPROVAL_REQUIRED and waiting_since is None:
                waiting_since = loop.time()
            elif kind == EventKind.APPROVAL:
                waiting_since = None if not ex.db.pending_approvals(exec_id) else waiting_since
            elif kind in END_EVENTS:
                record = data.get("record") or ex.record(exec_id, messages=False)
                if record.get("state") != "COMPLETED":
                    raise failure(record)
                output = record.get("output")
                text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
                return wire.completion(wire.completion_id(), model, wire.now(), text, "stop", _usage(record))
    finally:
        await events.aclose()  # type: ignore[attr-defined]

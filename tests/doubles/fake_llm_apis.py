"""Stand-ins for remote LLM APIs, speaking their real protocols on 127.0.0.1.

FakeOpenAI: OpenAI's `GET /v1/models` and `POST /v1/chat/completions` (plain and SSE streaming with
`stream_options.include_usage`), `Authorization: Bearer KEY`, 401 with OpenAI's error body for a wrong key.
It answers from a script when one is given (a list of replies, each text and/or tool calls), else it
echoes the last user message; `requests` records every body received.

FakeAnthropic: Anthropic's `GET /v1/models` and `POST /v1/messages` (plain and the SSE event sequence
message_start / content_block_start / content_block_delta / content_block_stop / message_delta /
message_stop), `x-api-key` and `anthropic-version` headers, 401 `authentication_error` for a wrong key.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

# {"content": str} and/or {"tool_calls": [{"name": str, "arguments": dict}]}; streamed, a reply may also
# set "delay" (seconds between its chunks, instead of the fake's own) and "error" (a message: the stream
# breaks off with OpenAI's error event after the content, as a server failing mid-answer does).
Reply = dict[str, Any]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Base:
    models: list[str]

    def __init__(self, *, key: str = "sk-test", models: list[str] | None = None, delay: float = 0.0) -> None:
        self.key = key
        self.models = models or self.default_models()
        self.delay = delay  # seconds between streamed chunks
        self.script: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []  # of each request, in order (what a client sent us)
        self.cut = 0  # streams the client closed before their end (a cancelled request)
        self._lock = threading.Lock()
        self._httpd: _Server | None = None

    def default_models(self) -> list[str]:
        return []

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            if self.script:
                return self.script.pop(0)
        text = ""
        for message in reversed(body.get("messages") or []):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
                    content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
                text = content if isinstance(content, str) else json.dumps(content)
                break
        return {"content": f"echo: {text}"}

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def __enter__(self) -> _Base:
        self._httpd = _Server(("127.0.0.1", 0), self.handler())
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: _Base

    def log_message(self, *_args: Any) -> None:
        pass

    def send_json(self, status: int, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_json(self) -> dict[str, Any]:
        self.fake.headers.append(dict(self.headers.items()))
        length = int(self.headers.get("Content-Length") or 0)
        data = json.loads(self.rfile.read(length) or b"{}")
        return data if isinstance(data, dict) else {}

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def sse(self, data: str, event: str | None = None) -> None:
        if event:
            self.wfile.write(f"event: {event}\n".encode())
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()
        delay = getattr(self, "delay", None)
        delay = self.fake.delay if delay is None else delay
        if delay:
            time.sleep(delay)


def _pieces(text: str) -> Iterator[str]:
    """Text cut into small pieces, as a model streams it."""
    word = ""
    for ch in text:
        word += ch
        if ch == " ":
            yield word
            word = ""
    if word:
        yield word


# -- OpenAI -----------------------------------------------------------------------------------------------
class FakeOpenAI(_Base):
    def default_models(self) -> list[str]:
        return ["gpt-4o-mini", "gpt-4o"]

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class H(_Handler):
            pass

        H.fake = fake

        class OpenAIHandler(H):
            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {fake.key}" or not fake.key:
                    return True
                self.send_json(
                    401,
                    {
                        "error": {
                            "message": "Incorrect API key provided. You can find your API key at "
                            "https://platform.openai.com/account/api-keys.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                )
                return False

            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                    return
                if self._authorized():
                    data = [
                        {"id": m, "object": "model", "created": 0, "owned_by": "openai"} for m in fake.models
                    ]
                    self.send_json(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                    return
                if not self._authorized():
                    return
                body = self.read_json()
                reply = fake.next_reply(body)
                model = body.get("model", "")
                if body.get("stream"):
                    self._stream(reply, model, bool((body.get("stream_options") or {}).get("include_usage")))
                else:
                    self.send_json(200, _completion(reply, model))

            def _stream(self, reply: Reply, model: str, usage: bool) -> None:
                self.delay = reply.get("delay")
                try:
                    self._chunks(reply, model, usage)
                except (BrokenPipeError, ConnectionResetError):
                    with fake._lock:
                        fake.cut += 1

            def _chunks(self, reply: Reply, model: str, usage: bool) -> None:
                self.start_sse()
                base = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                }

                def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
                    data = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    self.sse(json.dumps(data))

                chunk({"role": "assistant", "content": ""})
                for piece in _pieces(reply.get("content") or ""):
                    chunk({"content": piece})
                if reply.get("error"):
                    self.sse(json.dumps({"error": {"message": reply["error"], "type": "server_error"}}))
                    return
                for i, call in enumerate(reply.get("tool_calls") or []):
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": i,
                                    "id": call.get("id", f"call_{i}"),
                                    "type": "function",
                                    "function": {
                                        "name": call["name"],
                                        "arguments": json.dumps(call["arguments"]),
                                    },
                                }
                            ]
                        }
                    )
                chunk({}, "tool_calls" if reply.get("tool_calls") else "stop")
                if usage:
                    self.sse(json.dumps({**base, "choices": [], "usage": _usage(reply)}))
                self.sse("[DONE]")

        return OpenAIHandler


def _usage(reply: Reply) -> dict[str, int]:
    out = len((reply.get("content") or "").split()) + 3 * len(reply.get("tool_calls") or [])
    return {"prompt_tokens": 10, "completion_tokens": out, "total_tokens": 10 + out}


def _completion(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
    if reply.get("tool_calls"):
        message["tool_calls"] = [
            {
                "id": call.get("id", f"call_{i}"),
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
            }
            for i, call in enumerate(reply["tool_calls"])
        ]
    finish = "tool_calls" if reply.get("tool_calls") else "stop"
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": _usage(reply),
    }


# -- Anthropic --------------------------------------------------------------------------------------------
class FakeAnthropic(_Base):
    def default_models(self) -> list[str]:
        return ["claude-sonnet-4-5", "claude-haiku-4-5"]

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class H(_Handler):
            pass

        H.fake = fake

        class AnthropicHandler(H):
            def _authorized(self) -> bool:
                # The official SDK (2.x) sends the key as a bearer token; the documented header is x-api-key.
                given = self.headers.get("x-api-key") or self.headers.get("Authorization", "").removeprefix(
                    "Bearer "
                )
                if given == fake.key and self.headers.get("anthropic-version"):
                    return True
                self.send_json(
                    401,
                    {
                        "type": "error",
                        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
                    },
                )
                return False

            def do_GET(self) -> None:
                if self.path.split("?")[0].rstrip("/") != "/v1/models":
                    self.send_json(
                        404, {"type": "error", "error": {"type": "not_found_error", "message": "no"}}
                    )
                    return
                if self._authorized():
                    data = [
                        {"type": "model", "id": m, "display_name": m, "created_at": ""} for m in fake.models
                    ]
                    self.send_json(200, {"data": data, "has_more": False, "first_id": None, "last_id": None})

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/messages":
                    self.send_json(
                        404, {"type": "error", "error": {"type": "not_found_error", "message": "no"}}
                    )
                    return
                if not self._authorized():
                    return
                body = self.read_json()
                reply = fake.next_reply(body)
                text = reply.get("content") or ""
                usage = {"input_tokens": 10, "output_tokens": len(text.split())}
                message = {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model", ""),
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                }
                if not body.get("stream"):
                    self.send_json(200, message)
                    return
                self.start_sse()
                start = {
                    **message,
                    "content": [],
                    "stop_reason": None,
                    "usage": {**usage, "output_tokens": 0},
                }
                self.sse(json.dumps({"type": "message_start", "message": start}), "message_start")
                block = {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
                self.sse(json.dumps(block), "content_block_start")
                for piece in _pieces(text):
                    delta = {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece},
                    }
                    self.sse(json.dumps(delta), "content_block_delta")
                self.sse(json.dumps({"type": "content_block_stop", "index": 0}), "content_block_stop")
                end = {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                }
                self.sse(json.dumps(end), "message_delta")
                self.sse(json.dumps({"type": "message_stop"}), "message_stop")

        return AnthropicHandler

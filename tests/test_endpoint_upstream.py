"""The models half of the OpenAI-compatible endpoint (endpoint/upstream.py, relay.py, queue.py): an
Upstream served by uvicorn on a free port, called with the `openai` package or raw HTTP, in front of the
OpenAI and Anthropic stand-ins (which check their own key), small scripted LLM servers, and the real
built-in engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stigmer.config import store
from stigmer.endpoint.queue import FairQueue, QueueFull
from stigmer.endpoint.upstream import BUILTIN_ENGINE_SLOTS, Upstream, engine_slots
from stigmer.paths import Paths
from tests.doubles.archives import free_port
from tests.doubles.fake_llm_apis import FakeAnthropic, FakeOpenAI

PROVIDER_KEY = "sk-provider-7f3a9c"
CLIENT_KEY = "sk-client-should-never-travel"


# -- serving an Upstream -----------------------------------------------------------------------------------


class Served:
    def __init__(self, upstream: Upstream, url: str) -> None:
        self.upstream = upstream
        self.url = url

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)

    def post(self, body: dict[str, Any], *, caller: str = "admin") -> httpx.Response:
        return httpx.post(
            self.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {CLIENT_KEY}", "X-Caller": caller},
            timeout=30,
        )


@contextlib.contextmanager
def serve(paths: Paths) -> Iterator[Served]:
    """An Upstream for the settings in force (environment, config.yaml) behind uvicorn, as the API has
    it: POST /v1/chat/completions -> complete(), GET /v1/models -> models(). Stopped on the way out."""
    upstream = Upstream(store.load(paths), paths)

    async def chat(request: Request) -> Response:
        return await upstream.complete(await request.json(), caller=request.headers.get("x-caller", "admin"))

    async def models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": await upstream.models()})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)],
        lifespan=lifespan,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Served(upstream, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(10)


def _provider(monkeypatch: pytest.MonkeyPatch, provider: str, base_url: str, **extra: str) -> None:
    monkeypatch.setenv("STIGMER_LLM_PROVIDER", provider)
    monkeypatch.setenv("STIGMER_LLM_BASE_URL", base_url)
    for name, value in extra.items():
        monkeypatch.setenv(f"STIGMER_{name.upper()}", value)


def _headers_clean(headers: dict[str, str]) -> None:
    assert CLIENT_KEY not in json.dumps(headers)


# -- scripted LLM servers: a canned answer, a slow stream that notices its client leaving ---------------------


class Scripted:
    """An HTTP/1.1 server on 127.0.0.1 answering every request with `answer` (raw bytes), or with an
    endless SSE stream (`stream=True`, a chunk every 50 ms) that records when its client goes away."""

    def __init__(self, answer: bytes = b"", *, stream: bool = False) -> None:
        self.answer = answer
        self.stream = stream
        self.requests: list[bytes] = []
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._handlers: list[tuple[socket.socket, threading.Thread]] = []

    def __enter__(self) -> Scripted:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn, handler in self._handlers:  # a stream still going: end it, and its thread with it
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            handler.join(5)

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            handler = threading.Thread(target=self._one, args=(conn,), daemon=True)
            self._handlers.append((conn, handler))
            handler.start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head + b"\r\n\r\n" + body)
            if not self.stream:
                conn.sendall(self.answer)
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            self.connected.set()
            chunk = {"choices": [{"index": 0, "delta": {"content": "tick "}, "finish_reason": None}]}
            try:
                for _ in range(400):  # 20 s at most
                    conn.sendall(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    time.sleep(0.05)
            except OSError:
                self.closed.set()


def _answer(status: int, body: dict[str, Any], headers: str = "") -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n{headers}"
        "Connection: close\r\n\r\n"
    ).encode() + raw


# -- OpenAI-compatible providers ------------------------------------------------------------------------------


def test_openai_answer_with_the_provider_key_and_every_parameter(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAI(key=PROVIDER_KEY) as fake:
        _provider(monkeypatch, "openai", fake.url + "/v1", llm_api_key=PROVIDER_KEY)
        with serve(isolated_home) as served:
            tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
            params: dict[str, Any] = {
                "temperature": 0.3,
                "max_tokens": 17,
                "stop": ["END"],
                "seed": 7,
                "tools": tools,
                "tool_choice": "auto",
                "response_format": {"type": "json_object"},
            }
            answer = served.client().chat.completions.create(
                model="local", messages=[{"role": "user", "content": "hi there"}], **params
            )
    assert answer.choices[0].message.content == "echo: hi there"
    assert answer.model == "gpt-4o-mini" and answer.usage is not None
    sent = fake.requests[-1]
    assert sent["model"] == "gpt-4o-mini"  # `local` is the configured model
    assert {k: sent[k] for k in params} == params  # passed on as they are
    assert fake.headers[-1]["Authorization"] == f"Bearer {PROVIDER_KEY}"
    _headers_clean(fake.headers[-1])


def test_openai_stream_with_usage_is_relayed_chunk_by_chunk(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAI(key=PROVIDER_KEY) as fake:
        _provider(monkeypatch, "openai", fake.url + "/v1", llm_api_key=PROVIDER_KEY)
        with serve(isolated_home) as served:
            stream = served.client().chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "one two three"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            raw = served.post(
                {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True}
            )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 4  # not one lump
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert fake.requests[0]["model"] == "gpt-4o" and fake.requests[0]["stream_options"] == {
        "include_usage": True
    }
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n")
    _headers_clean(fake.headers[0])


def test_models_list_the_configured_model_local_and_the_remote_list(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAI(key=PROVIDER_KEY, models=["gpt-4o-mini", "gpt-4o", "o3"]) as fake:
        _provider(monkeypatch, "openai", fake.url + "/v1", llm_api_key=PROVIDER_KEY)
        with serve(isolated_home) as served:
            ids = [m.id for m in served.client().models.list()]
            with pytest.raises(openai.NotFoundError) as missing:
                served.client().chat.completions.create(
                    model="nope", messages=[{"role": "user", "content": "x"}]
                )
    assert ids == ["gpt-4o-mini", "local", "gpt-4o", "o3"]
    assert missing.value.code == "model_not_found" and missing.value.status_code == 404
    assert not fake.requests  # refused here, never sent


def test_a_remote_that_does_not_answer_still_lists_the_configured_model(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    _provider(monkeypatch, "openai", dead, llm_api_key=PROVIDER_KEY, llm_model="gpt-4o")
    with serve(isolated_home) as served:
        ids = [m.id for m in served.client().models.list()]
        r = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}]})
    assert ids == ["gpt-4o", "local"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "llm_unavailable"
    assert "could not be reached" in r.json()["error"]["message"]
    assert "stigmer server llm status" in r.json()["error"]["message"]


def test_provider_errors_come_back_in_openai_shape_without_the_key(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAI(key="sk-the-right-one") as fake:
        _provider(monkeypatch, "openai", fake.url + "/v1", llm_api_key=PROVIDER_KEY)
        with serve(isolated_home) as served:
            r = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}]})
    err = r.json()["error"]
    assert r.status_code == 502 and err["code"] == "llm_key_refused"  # not a 401: the client's key was fine
    assert "Incorrect API key" in err["message"] and "stigmer config set llm.api_key" in err["message"]
    assert PROVIDER_KEY not in r.text and set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("status", "body", "headers", "want_status", "want_code"),
    [
        (400, {"error": {"code": 400, "message": "too long", "type": "exceed_context_size_error"}}, "", 400,
         "context_length_exceeded"),
        (429, {"error": {"message": "slow down", "type": "rate_limit_error"}}, "Retry-After: 7\r\n", 429,
         "rate_limit_exceeded"),
        (500, {"error": "it broke"}, "", 502, None),
        (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, "", 503, None),
    ],
)  # fmt: skip
def test_upstream_errors_are_mapped(
    isolated_home: Paths,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: dict[str, Any],
    headers: str,
    want_status: int,
    want_code: str | None,
) -> None:
    with Scripted(_answer(status, body, headers)) as llm:
        _provider(monkeypatch, "llamacpp", llm.url)
        with serve(isolated_home) as served:
            r = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == want_status
    err = r.json()["error"]
    assert err["code"] == want_code and set(err) == {"message", "type", "param", "code"}
    assert "Retry-After: 7" not in headers or r.headers["retry-after"] == "7"
    if status == 503:
        assert "Loading model" in err["message"]


def test_a_stream_that_breaks_ends_with_an_error_event(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
    cut = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(event):x}\r\n".encode()
        + event
        + b"\r\n"
    )  # and the connection closes before the last chunk: the engine died
    with Scripted(cut) as llm:
        _provider(monkeypatch, "llamacpp", llm.url)
        with serve(isolated_home) as served:
            r = served.post(
                {"model": "local", "messages": [{"role": "user", "content": "x"}], "stream": True}
            )
            with pytest.raises(openai.APIError) as broke:
                list(
                    served.client().chat.completions.create(
                        model="local", messages=[{"role": "user", "content": "x"}], stream=True
                    )
                )
    assert r.status_code == 200 and r.text.startswith(event.decode())
    last = json.loads(r.text.strip().rsplit("\n\n", 1)[-1].removeprefix("data: "))
    assert "stopped answering mid-stream" in last["error"]["message"]
    assert "stopped answering mid-stream" in str(broke.value)


def test_a_local_llm_that_is_not_running_answers_503_with_the_command_to_run(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    _provider(monkeypatch, "llamacpp", f"http://127.0.0.1:{free_port()}")
    with serve(isolated_home) as served:
        r = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "llm_unavailable"
    assert "stigmer server llm status" in r.json()["error"]["message"]


def test_the_client_authorization_never_reaches_a_local_llm(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = {"id": "x", "object": "chat.completion", "choices": [], "usage": {}}
    with Scripted(_answer(200, ok)) as llm:
        _provider(monkeypatch, "llamacpp", llm.url)
        with serve(isolated_home) as served:
            r = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}], "top_k": 3})
    assert r.status_code == 200 and r.json() == ok
    sent = llm.requests[0]
    assert CLIENT_KEY.encode() not in sent
    assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert json.loads(sent.split(b"\r\n\r\n", 1)[1]) == {
        "model": "smollm2:135m",
        "messages": [{"role": "user", "content": "x"}],
        "top_k": 3,
    }


def test_settings_changes_are_followed(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI(key=PROVIDER_KEY, models=["gpt-4o-mini", "gpt-4o"]) as fake:
        _provider(monkeypatch, "openai", fake.url + "/v1", llm_api_key=PROVIDER_KEY)
        with serve(isolated_home) as served:
            client = served.client()
            client.chat.completions.create(model="local", messages=[{"role": "user", "content": "a"}])
            store.set_value(isolated_home, "llm.model", "gpt-4o")
            client.chat.completions.create(model="local", messages=[{"role": "user", "content": "b"}])
            first = client.models.list().data[0].id
    assert [r["model"] for r in fake.requests] == ["gpt-4o-mini", "gpt-4o"]
    assert first == "gpt-4o"


# -- the built-in engine's models --------------------------------------------------------------------------------


def test_a_downloaded_model_the_engine_does_not_serve_is_refused_clearly(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stigmer.llm.provider import ModelInfo

    downloaded = [ModelInfo("smollm2:135m", 1, ""), ModelInfo("qwen2.5:0.5b", 1, "2026-01-02T03:04:05Z")]
    monkeypatch.setattr(
        "stigmer.llm.llamacpp.provider.LlamaCppProvider.list_models", lambda _self: downloaded
    )
    with Scripted(_answer(200, {})) as llm:
        _provider(monkeypatch, "llamacpp", llm.url)
        with serve(isolated_home) as served:
            models = served.client().models.list().data
            other = served.post({"model": "qwen2.5:0.5b", "messages": [{"role": "user", "content": "x"}]})
            unknown = served.post({"model": "llama3:8b", "messages": [{"role": "user", "content": "x"}]})
    assert [(m.id, m.owned_by) for m in models] == [
        ("smollm2:135m", "llamacpp"),
        ("local", "stigmer"),
        ("qwen2.5:0.5b", "llamacpp"),
    ]
    assert models[2].created == int(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    assert other.status_code == 400 and other.json()["error"]["code"] == "model_not_served"
    assert "stigmer config set llm.model qwen2.5:0.5b && stigmer server" in other.json()["error"]["message"]
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert not llm.requests


def test_local_is_what_the_engine_serves_until_the_server_applies_a_new_model(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    running = SimpleNamespace(
        info={"model": "qwen2.5:0.5b"}, pid=1
    )  # its pid record, as `stigmer server` wrote it
    monkeypatch.setattr(
        "stigmer.llm.llamacpp.provider.LlamaCppProvider.managed_record", lambda _self: running
    )
    ok = {"id": "x", "object": "chat.completion", "choices": [], "usage": {}}
    with Scripted(_answer(200, ok)) as llm:
        _provider(monkeypatch, "llamacpp", llm.url)  # llm.model: smollm2:135m, not applied yet
        with serve(isolated_home) as served:
            r = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}]})
            configured = served.post(
                {"model": "smollm2:135m", "messages": [{"role": "user", "content": "x"}]}
            )
    assert r.status_code == 200
    assert json.loads(llm.requests[0].split(b"\r\n\r\n", 1)[1])["model"] == "qwen2.5:0.5b"
    assert configured.status_code == 400 and configured.json()["error"]["code"] == "model_not_served"
    assert "has not applied the change yet" in configured.json()["error"]["message"]
    assert len(llm.requests) == 1


def test_unusable_llm_settings_are_the_server_s_error(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai-compatible")
    monkeypatch.setenv("STIGMER_LLM_MODEL", "m")
    with serve(isolated_home) as served:
        r = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "stigmer config set llm.base_url" in r.json()["error"]["message"]


def test_builtin_engine_slots_match_xllamacpp() -> None:
    xllamacpp = pytest.importorskip("xllamacpp")
    assert xllamacpp.CommonParams().n_parallel == BUILTIN_ENGINE_SLOTS


def test_ollama_slots_follow_its_setting(isolated_home: Paths) -> None:
    from stigmer.llm.provider import get_provider

    ollama = get_provider(store.load(isolated_home), isolated_home, name="ollama", model="m:1")
    assert engine_slots(ollama, {}) == 1
    assert engine_slots(ollama, {"OLLAMA_NUM_PARALLEL": "4"}) == 4


# -- a client that goes away ---------------------------------------------------------------------------------------


def test_a_client_leaving_mid_stream_closes_the_upstream_request(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Scripted(stream=True) as llm:
        _provider(monkeypatch, "llamacpp", llm.url)
        with serve(isolated_home) as served:
            body = {"model": "local", "messages": [{"role": "user", "content": "x"}], "stream": True}
            with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=10) as r:
                first = next(r.iter_lines())
            assert first.startswith("data: ")
            assert llm.closed.wait(3), "the upstream request was still open after the client left"
            deadline = time.monotonic() + 3
            while served.upstream.queue.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert served.upstream.queue.active == 0  # its turn was given back


# -- the queue in front of a local LLM -------------------------------------------------------------------------------


def test_past_max_queue_a_request_gets_429_with_retry_after(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Scripted(stream=True) as llm:
        _provider(monkeypatch, "llamacpp", llm.url, server_max_queue="1")
        with serve(isolated_home) as served:
            body = {"model": "local", "messages": [{"role": "user", "content": "x"}], "stream": True}

            async def scenario() -> tuple[int, dict[str, Any], str, int]:
                async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
                    holding = asyncio.ensure_future(_first_line(client, body))
                    await _until(lambda: served.upstream.queue.active == 1)
                    waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
                    await _until(lambda: served.upstream.queue.waiting == 1)
                    refused = await client.post("/v1/chat/completions", json=body)
                    waiting.cancel()  # the waiter's client goes away: it leaves the queue
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiting
                    await _until(lambda: served.upstream.queue.waiting == 0)
                    holding.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await holding
                    return (
                        refused.status_code,
                        refused.json(),
                        refused.headers["retry-after"],
                        len(llm.requests),
                    )

            status, err, retry_after, sent = asyncio.run(scenario())
    assert status == 429 and err["error"]["code"] == "queue_full"
    assert err["error"]["type"] == "rate_limit_error" and int(retry_after) >= 1
    assert sent == 1  # neither the refused nor the departed waiter reached the engine


async def _first_line(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for _line in r.aiter_lines():
            await asyncio.sleep(30)  # hold the engine until cancelled


async def _until(check: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_turns_go_round_robin_between_callers_fifo_within_one() -> None:
    async def scenario() -> list[str]:
        queue = FairQueue(slots=1, max_waiting=10)
        order: list[str] = []
        held = await queue.acquire("a")

        async def one(caller: str, name: str) -> None:
            slot = await queue.acquire(caller)
            order.append(name)
            await asyncio.sleep(0)
            slot.release()

        tasks = []
        for caller, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("b", "b2"), ("c", "c1")]:
            tasks.append(asyncio.ensure_future(one(caller, name)))
            await asyncio.sleep(0)
        assert queue.waiting == 6
        held.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_a_full_queue_refuses_and_a_departed_waiter_leaves() -> None:
    async def scenario() -> None:
        queue = FairQueue(slots=1, max_waiting=2)
        held = await queue.acquire("a")
        first = asyncio.ensure_future(queue.acquire("b"))
        second = asyncio.ensure_future(queue.acquire("c"))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as full:
            await queue.acquire("d")
        assert full.value.retry_after >= 1 and full.value.waiting == 2
        first.cancel()
        await asyncio.sleep(0)
        assert queue.waiting == 1
        third = asyncio.ensure_future(queue.acquire("d"))  # room again
        await asyncio.sleep(0)
        held.release()
        (await second).release()
        (await third).release()
        assert queue.active == 0 and queue.waiting == 0

    asyncio.run(scenario())


def test_a_turn_granted_as_its_client_leaves_goes_to_the_next() -> None:
    async def scenario() -> None:
        queue = FairQueue(slots=1, max_waiting=5)
        held = await queue.acquire("a")
        leaving = asyncio.ensure_future(queue.acquire("b"))
        staying = asyncio.ensure_future(queue.acquire("c"))
        await asyncio.sleep(0)
        held.release()  # b's turn is granted ...
        leaving.cancel()  # ... and its client leaves before it runs
        await asyncio.sleep(0)
        slot = await asyncio.wait_for(staying, 1)
        assert queue.active == 1
        slot.release()
        slot.release()  # a second release changes nothing
        assert queue.active == 0

    asyncio.run(scenario())


def test_retry_after_follows_how_long_requests_hold_the_engine() -> None:
    queue = FairQueue(slots=2, max_waiting=1)
    queue.hold = 30.0
    assert queue.retry_after() == 15
    queue.hold = 0.01
    assert queue.retry_after() == 1


# -- Anthropic ----------------------------------------------------------------------------------------------------


def test_anthropic_answer_and_stream_are_translated(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeAnthropic(key=PROVIDER_KEY) as fake:
        _provider(monkeypatch, "anthropic", fake.url, llm_api_key=PROVIDER_KEY)
        with serve(isolated_home) as served:
            client = served.client()
            messages = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello you"},
            ]
            answer = client.chat.completions.create(model="local", messages=messages, stop="END")
            chunks = list(
                client.chat.completions.create(
                    model="claude-haiku-4-5",
                    messages=messages,
                    max_tokens=50,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            ids = [m.id for m in client.models.list()]
    assert answer.choices[0].message.content == "echo: hello you"
    assert answer.choices[0].finish_reason == "stop" and answer.usage is not None
    assert answer.usage.prompt_tokens == 10 and answer.usage.completion_tokens == 3
    first = fake.requests[0]
    assert first["model"] == "claude-sonnet-4-5" and first["system"] == "Be brief."
    assert first["max_tokens"] == 4096 and first["stop_sequences"] == ["END"]
    assert first["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello you"}]}]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello you"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert (
        chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    )
    assert fake.requests[1]["model"] == "claude-haiku-4-5" and fake.requests[1]["max_tokens"] == 50
    assert ids == ["claude-sonnet-4-5", "local", "claude-haiku-4-5"]
    for headers in fake.headers:
        assert headers["x-api-key"] == PROVIDER_KEY and "Authorization" not in headers
        _headers_clean(headers)


def test_anthropic_errors_are_mapped(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with Scripted(_answer(529, overloaded)) as llm:
        _provider(monkeypatch, "anthropic", llm.url, llm_api_key=PROVIDER_KEY)
        with serve(isolated_home) as served:
            r = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}]})
            bad = served.post({"model": "local", "messages": [{"role": "user", "content": "x"}], "n": 2})
    assert r.status_code == 503 and "Overloaded" in r.json()["error"]["message"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    assert len(llm.requests) == 1


# -- the real built-in engine ------------------------------------------------------------------------------------------


def test_the_real_engine_through_the_relay(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from tests.doubles.engine import spawn_engine, wait_ready

    engine = spawn_engine(tmp_path, ctx=1024)
    try:
        wait_ready(engine)
        _provider(monkeypatch, "llamacpp", f"http://127.0.0.1:{engine.port}")
        with serve(isolated_home) as served:
            client = served.client()
            messages = [{"role": "user", "content": "Say hello."}]
            whole = client.chat.completions.create(
                model="local", messages=messages, max_tokens=8, temperature=0, seed=1
            )
            chunks = list(
                client.chat.completions.create(
                    model="smollm2:135m",
                    messages=messages,
                    max_tokens=8,
                    temperature=0,
                    seed=1,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
    finally:
        engine.proc.terminate()
        engine.proc.wait(10)
    assert whole.model == "smollm2:135m" and whole.usage is not None and whole.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # same greedy answer, token by token
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

"""The built-in engine's guard: what a web page could send is refused before llama.cpp sees it, while
programs on this machine (curl, the openai package) need no key. Pure functions first, then the real
engine with the starter model, each started as the product starts it (engine_argv) on free ports."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from stigmer.llm.llamacpp.engine import MAX_CTX, engine_argv, memory_problem
from stigmer.net.guard import LoopbackGuard, is_loopback_host_header, origin_allowed, refusal
from tests.doubles.archives import free_port
from tests.doubles.engine import ALIAS, STARTUP_DEADLINE, Engine, health, spawn_engine, starter, wait_ready

CTX = 1024
ALLOWED = ("https://app.example.com", "http://*.lan:*")
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and fork")


# --- pure functions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("localhost", True),
        ("localhost:11435", True),
        ("LOCALHOST:11435", True),
        ("localhost.", True),  # the fully qualified spelling of the same name
        ("localhost.:8080", True),
        ("localhost:", True),  # an empty port is allowed by RFC 9110
        ("127.0.0.1", True),
        ("127.0.0.1:8080", True),
        ("127.1.2.3:80", True),  # all of 127.0.0.0/8 is loopback
        ("[::1]", True),
        ("[::1]:11435", True),
        ("[0:0:0:0:0:0:0:1]:80", True),
        ("::1", True),  # bare IPv6, not valid in a Host header but unambiguous
        (" localhost:80 ", True),
        ("", False),
        ("evil.example", False),
        ("evil.example:11435", False),
        ("localhost.evil.com", False),
        ("localhost.evil.com:11435", False),
        ("127.0.0.1.nip.io", False),
        ("127.0.0.1.nip.io:11435", False),
        ("0x7f.1", False),
        ("0x7f000001", False),
        ("2130706433", False),
        ("127.1", False),
        ("127.0.0.1.", False),
        ("0.0.0.0", False),
        ("[::]:80", False),
        ("[::ffff:127.0.0.1]:80", False),  # IPv4-mapped: not what a browser sends for loopback
        ("[::1", False),
        ("[::1]x", False),
        ("[::1]:99999", False),
        ("localhost:abc", False),
        ("localhost:80:80", False),
        ("localhost:-1", False),
        ("user@localhost", False),
        ("[localhost]", False),
        ("local host", False),
    ],
)
def test_is_loopback_host_header(value: str, ok: bool) -> None:
    assert is_loopback_host_header(value) is ok


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        # this machine's pages: always allowed
        ("http://localhost", True),
        ("http://localhost:3000", True),
        ("https://localhost:8443", True),
        ("HTTP://LOCALHOST:3000", True),
        ("http://127.0.0.1:5173", True),
        ("http://127.9.9.9", True),
        ("http://[::1]:8080", True),
        ("http://localhost.:3000", True),
        # allowed by a pattern
        ("https://app.example.com", True),
        ("HTTPS://APP.EXAMPLE.COM", True),
        ("http://printer.lan:8080", True),
        ("http://a.b.lan:1", True),
        # everything else
        ("https://evil.example", False),
        ("https://app.example.com:8443", False),  # the pattern names no port
        ("http://app.example.com", False),  # nor another scheme
        ("https://app.example.com.evil.example", False),
        ("https://evilapp.example.com", False),
        ("http://printer.lan", False),  # the pattern wants a port
        ("http://localhost.evil.com", False),
        ("http://127.0.0.1.nip.io:3000", False),
        ("http://0x7f.1", False),
        ("http://0.0.0.0:3000", False),
        ("null", False),  # sandboxed frames, file:// pages
        ("", False),
        ("http://localhost:3000/", False),  # browsers never send a path
        ("http://localhost:3000/path", False),
        ("http://localhost:3000?x", False),
        ("http://evil.example#.lan:1", False),
        ("http://user@localhost", False),
        ("http://localhost:99999", False),
        ("file://", False),
        ("chrome-extension://abcdef", False),  # app schemes Ollama allows by default are not ours
        ("ftp://localhost", False),
        ("localhost:3000", False),
    ],
)
def test_origin_allowed(origin: str, ok: bool) -> None:
    assert origin_allowed(origin, ALLOWED) is ok


def test_origin_patterns() -> None:
    assert origin_allowed("https://anything.example", ["*"])
    assert not origin_allowed("null", ["*"])  # `*` means any web origin, not an opaque one
    assert origin_allowed("http://[fe80::1]:80", ["http://[fe80::1]:*"])  # `[` is literal, not a class
    assert not origin_allowed("http://f:80", ["http://[fe80::1]:*"])
    assert not origin_allowed("https://a.example", ["", "  "])
    assert origin_allowed("https://a.example", [" HTTPS://A.EXAMPLE "])


def test_refusal_reasons() -> None:
    ok = [("host", "localhost:1")]
    assert refusal(ok, ()) is None
    assert refusal([], ()) is not None  # no Host at all
    assert refusal([("host", "localhost"), ("host", "evil.example")], ()) is not None  # two Hosts
    assert "evil.example" in (refusal([("host", "evil.example")], ()) or "")
    assert refusal([*ok, ("origin", "http://localhost:3000")], ()) is None
    assert "https://evil.example" in (refusal([*ok, ("origin", "https://evil.example")], ()) or "")
    two = [*ok, ("origin", "http://localhost:3000"), ("origin", "https://evil.example")]
    assert refusal(two, ()) is not None


# --- the middleware, driven as an ASGI server would -----------------------------------------------


class Inner:
    """The wrapped app: records that it ran and answers 200 with a CORS header of its own."""

    def __init__(self) -> None:
        self.ran = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.ran += 1
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"text/plain"), (b"access-control-allow-credentials", b"true")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


def _call(guard: LoopbackGuard, inner: Inner, scope: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """(messages sent, whether the wrapped app ran)."""
    sent: list[dict[str, Any]] = []
    ran_before = inner.ran

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    asyncio.run(guard(scope, receive, send))
    return sent, inner.ran > ran_before


def _scope(method: str = "GET", **headers: str) -> dict[str, Any]:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": method, "path": "/", "headers": raw}


def _headers(message: dict[str, Any]) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in message["headers"]}


def test_guard_refuses_before_the_app() -> None:
    inner = Inner()
    guard = LoopbackGuard(inner, allowed_origins=ALLOWED, cors=True)
    for scope in (
        _scope(host="evil.example"),
        _scope("POST", host="127.0.0.1:1", origin="https://evil.example", content_type="text/plain"),
        _scope("OPTIONS", host="localhost", origin="null", access_control_request_method="POST"),
    ):
        sent, ran = _call(guard, inner, scope)
        assert not ran and sent[0]["status"] == 403
        assert json.loads(sent[1]["body"])["error"]["code"] == "access_denied"
        assert not any(k.startswith("access-control-") for k in _headers(sent[0]))


def test_guard_preflight_and_cors_never_carry_credentials() -> None:
    inner = Inner()
    guard = LoopbackGuard(inner, allowed_origins=ALLOWED, cors=True)
    sent, ran = _call(
        guard,
        inner,
        _scope(
            "OPTIONS",
            host="localhost",
            origin="https://app.example.com",
            access_control_request_method="POST",
            access_control_request_headers="content-type, authorization",
        ),
    )
    assert not ran and sent[0]["status"] == 204
    h = _headers(sent[0])
    assert h["access-control-allow-origin"] == "https://app.example.com"
    assert h["access-control-allow-headers"] == "content-type, authorization"
    assert "access-control-allow-credentials" not in h

    sent, ran = _call(guard, inner, _scope("POST", host="localhost", origin="https://app.example.com"))
    h = _headers(sent[0])
    assert ran and sent[0]["status"] == 200
    assert h["access-control-allow-origin"] == "https://app.example.com" and h["vary"] == "Origin"
    assert "access-control-allow-credentials" not in h  # the app's own CORS headers are dropped

    sent, ran = _call(guard, inner, _scope(host="localhost"))  # no Origin: no CORS header at all
    assert ran and not any(k.startswith("access-control-") for k in _headers(sent[0]))


def test_guard_without_cors_and_other_scopes() -> None:
    inner = Inner()
    guard = LoopbackGuard(inner)  # the Stigmer API: loopback-only, no CORS
    sent, ran = _call(guard, inner, _scope(host="localhost", origin="http://localhost:3000"))
    assert ran and "access-control-allow-origin" not in _headers(sent[0])
    sent, ran = _call(guard, inner, {"type": "lifespan"})
    assert ran and sent == []
    ws = {"type": "websocket", "path": "/", "headers": [(b"host", b"evil.example")]}
    sent, ran = _call(guard, inner, ws)
    assert not ran and sent == [{"type": "websocket.close", "code": 1008}]


# --- the proxy against a scripted internal server: framing and errors llama.cpp rarely shows -------


def _proxy_once(
    answer: bytes | None,
    scope_extra: dict[str, Any] | None = None,
    *,
    body: bytes = b"{}",
    method: str = "POST",
) -> tuple[bytes, list[dict[str, Any]]]:
    """Run one request through EngineProxy to a backend that reads the request head and writes `answer`
    (None: no backend listening). (what the backend received, ASGI messages sent to the client)."""
    from stigmer.llm.llamacpp.proxy import EngineProxy

    async def main() -> tuple[bytes, list[dict[str, Any]]]:
        received = bytearray()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.extend(await reader.readuntil(b"\r\n\r\n"))
            length = int(received.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            received.extend(await reader.readexactly(length))
            writer.write(answer or b"")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(backend, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        if answer is None:
            server.close()
            await server.wait_closed()
        proxy = EngineProxy(f"http://127.0.0.1:{port}", "the-key")
        scope = {
            "type": "http",
            "method": method,
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"a=1",
            "headers": [
                (b"host", b"localhost:1"),
                (b"authorization", b"Bearer sk-client"),
                (b"x-api-key", b"client"),
                (b"accept-encoding", b"gzip"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            **(scope_extra or {}),
        }
        sent: list[dict[str, Any]] = []
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await asyncio.sleep(3600)  # the client stays
            raise AssertionError

        async def send(message: Any) -> None:
            sent.append(dict(message))

        try:
            await proxy(scope, receive, send)
        except Exception as e:  # what uvicorn would see: it then aborts the client's connection
            sent.append({"type": "raised", "error": e})
        server.close()
        return bytes(received), sent

    return asyncio.run(main())


def _body_of(sent: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_proxy_request_carries_the_internal_key_only() -> None:
    received, sent = _proxy_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", body=b'{"x":1}')
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?a=1 HTTP/1.1"
    assert b"Authorization: Bearer the-key" in lines
    assert not any(b"sk-client" in line or line.lower().startswith(b"x-api-key") for line in lines)
    assert b"Accept-Encoding: identity" in lines and b"accept-encoding: gzip" not in lines
    assert b"Connection: close" in lines and b"Content-Length: 7" in lines and body == b'{"x":1}'
    assert [line for line in lines if line.lower().startswith(b"host:")] == [lines[1]]  # the internal one
    assert sent[0]["status"] == 200 and _body_of(sent) == b"ok"


def test_proxy_relays_chunks_as_they_are_and_drops_hop_by_hop_headers() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nAccess-Control-Allow-Origin: *\r\n"
        b"Access-Control-Allow-Credentials: true\r\nServer: llama.cpp\r\n\r\n"
        b"6\r\ndata: \r\n3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    _received, sent = _proxy_once(answer)
    headers = dict(sent[0]["headers"])
    assert headers == {b"content-type": b"text/event-stream", b"server": b"llama.cpp"}
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert bodies == [b"data: ", b"abc", b"0123456789abcdef", b""]  # one message per chunk
    assert sent[-1]["more_body"] is False


def test_proxy_bodies_by_length_by_close_and_none() -> None:
    _r, sent = _proxy_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!")
    assert sent[0]["status"] == 404 and _body_of(sent) == b"nope!"
    assert dict(sent[0]["headers"])[b"content-length"] == b"5"
    _r, sent = _proxy_once(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
    assert _body_of(sent) == b"until the end" and sent[-1]["more_body"] is False
    _r, sent = _proxy_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method="HEAD")
    assert _body_of(sent) == b"" and sent[-1]["more_body"] is False


@pytest.mark.parametrize(
    "answer",
    [
        None,  # nothing listening
        b"",  # closed at once
        b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ],
)
def test_proxy_answers_502_when_the_internal_server_fails(answer: bytes | None) -> None:
    _r, sent = _proxy_once(answer)
    assert sent[0]["status"] == 502 and json.loads(_body_of(sent))["error"]["code"] == 502


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    ],
)
def test_proxy_aborts_a_response_cut_short(answer: bytes) -> None:
    # Headers are already out: the client must see a broken response, never a short one that ends well.
    _r, sent = _proxy_once(answer)
    assert sent[0]["status"] == 200
    assert sent[-1]["type"] == "raised"
    assert not any(m.get("more_body") is False for m in sent if m["type"] == "http.response.body")


def test_proxy_reads_response_heads_up_to_their_limit() -> None:
    # The limit in force was 16 KiB, a second HEAD_LIMIT (the loading responder's) having replaced it.
    from stigmer.llm.llamacpp.proxy import RESPONSE_HEAD_LIMIT

    assert RESPONSE_HEAD_LIMIT == 64 * 1024
    big = b"X-Big: " + b"a" * 40_000 + b"\r\n"
    _r, sent = _proxy_once(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 2\r\n\r\nok")
    assert sent[0]["status"] == 200 and _body_of(sent) == b"ok"
    assert (b"x-big", b"a" * 40_000) in sent[0]["headers"]
    too_big = b"X-Big: " + b"a" * RESPONSE_HEAD_LIMIT + b"\r\n"
    _r, sent = _proxy_once(b"HTTP/1.1 200 OK\r\n" + too_big + b"Content-Length: 2\r\n\r\nok")
    assert sent[0]["status"] == 502


def test_proxy_refuses_an_absolute_target() -> None:
    _r, sent = _proxy_once(b"", {"raw_path": b"http://evil.example/v1/models"})
    assert sent[0]["status"] == 400


def test_engine_argv_carries_the_origins() -> None:
    argv = engine_argv(
        "py",
        model_path=Path("/m.gguf"),
        alias="a:b",
        host="127.0.0.1",
        port=1,
        ctx_size=2,
        threads=3,
        origins=("https://app.example.com", "http://*.lan:*"),
    )
    assert argv[-4:] == ["--allow-origin", "https://app.example.com", "--allow-origin", "http://*.lan:*"]


def test_memory_problem_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    model = starter()
    assert memory_problem(model, 16384) is None  # ~480 MB: fits this machine

    class Tight:
        # 90% of it: 630 MB. Weights 96.6 MB + 256 MiB + activations 14.2 MB = 379.2 MB, then 24,064 B
        # a token (KV 23,040 + mask 1,024): 10240 tokens (246 MB) fit, 16384 (394 MB, 773.4 MB in all) not.
        available = 700_000_000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    assert memory_problem(model, 10240) is None
    assert memory_problem(model, 8192) is None  # not even checked: small contexts cost no header read
    why = memory_problem(model, 16384) or ""
    assert "a context of 16384 tokens needs about 773.4 MB of memory" in why and "(700.0 MB available)" in why
    assert "use a smaller --ctx-size (at most about 10240 here" in why
    assert "trained for 8192 tokens" in why
    assert memory_problem(Path("/nonexistent.gguf"), 16384) is None  # left to the file check


# --- the real engine ----------------------------------------------------------------------------------


def _spawn(
    tmp: Path,
    *,
    port: int | None = None,
    origins: tuple[str, ...] = (),
    ctx: int = CTX,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    load_gate: Path | None = None,
) -> Engine:
    return spawn_engine(tmp, port=port, ctx=ctx, origins=origins, env=env, extra=extra, load_gate=load_gate)


def _stop_and_check_gone(engine: Engine) -> None:
    """Stop the engine (and whatever it forked), then check that nothing of it is left."""
    family = []
    try:
        parent = psutil.Process(engine.proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    if engine.proc.poll() is None:
        engine.proc.terminate()
        try:
            engine.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            engine.proc.kill()
            engine.proc.wait(timeout=10)
    _gone, alive = psutil.wait_procs(family, timeout=5)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == [], "engine processes left behind"
    with socket.socket() as s:  # and the public port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", engine.port))


def _request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _chat(max_tokens: int, **extra: Any) -> bytes:
    body = {
        "model": ALIAS,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": max_tokens,
        **extra,
    }
    return json.dumps(body).encode()


def _streaming(port: int) -> http.client.HTTPConnection:
    """A long streamed completion, read until its first three events: tokens are flowing."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=_chat(900, stream=True, ignore_eos=True),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    events = 0
    for raw in resp:
        events += raw.startswith(b"data:")
        if events >= 3:
            break
    return conn


def _metrics(port: int) -> dict[str, float]:
    """llama.cpp's counters (/metrics), read through the guard like any local client."""
    status, _h, body = _request(port, "GET", "/metrics")
    assert status == 200, body
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


INFERENCE = ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:n_decode_total")


def _inference_counts(port: int) -> tuple[float, ...]:
    m = _metrics(port)
    return tuple(m[k] for k in INFERENCE)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = _spawn(tmp_path_factory.mktemp("engine-guard"), origins=ALLOWED)
    try:
        wait_ready(eng)
        yield eng
    finally:
        _stop_and_check_gone(eng)


def test_health_and_models_through_the_guard(engine: Engine) -> None:
    status, _h, body = _request(engine.port, "GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, headers, body = _request(engine.port, "GET", "/v1/models")
    assert status == 200 and headers["content-type"].startswith("application/json")
    first = json.loads(body)["data"][0]
    assert first["id"] == ALIAS and first["owned_by"] == "llamacpp"  # what the product's status reads


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:{port}", "localhost.evil.com:{port}", "127.0.0.1.nip.io:{port}", "0x7f.1"],
)
def test_foreign_host_is_refused_before_inference(engine: Engine, host: str) -> None:
    before = _inference_counts(engine.port)
    headers = {"Host": host.format(port=engine.port), "Content-Type": "application/json"}
    status, h, body = _request(engine.port, "POST", "/v1/chat/completions", body=_chat(8), headers=headers)
    assert status == 403 and h["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "access_denied"
    assert _request(engine.port, "GET", "/health", headers={"Host": headers["Host"]})[0] == 403
    assert _inference_counts(engine.port) == before


@pytest.mark.parametrize(
    "host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST", "localhost"]
)
def test_loopback_hosts_are_served(engine: Engine, host: str) -> None:
    status, _h, body = _request(
        engine.port, "GET", "/v1/models", headers={"Host": host.format(port=engine.port)}
    )
    assert status == 200 and json.loads(body)["data"][0]["id"] == ALIAS


def test_simple_cross_origin_post_is_refused_before_inference(engine: Engine) -> None:
    # What a page on evil.example can send without a preflight: POST, Content-Type text/plain.
    before = _inference_counts(engine.port)
    for origin in ("https://evil.example", "null", "http://localhost.evil.com"):
        headers = {"Origin": origin, "Content-Type": "text/plain"}
        status, h, body = _request(
            engine.port, "POST", "/v1/chat/completions", body=_chat(8), headers=headers
        )
        assert status == 403, (origin, body)
        assert not any(k.startswith("access-control-") for k in h)
    assert _inference_counts(engine.port) == before


def test_preflight_from_a_foreign_origin_is_refused(engine: Engine) -> None:
    status, h, _body = _request(
        engine.port,
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert status == 403
    assert not any(k.startswith("access-control-") for k in h)


def test_no_credentials_anywhere(engine: Engine) -> None:
    # llama.cpp answers preflights with Allow-Credentials: true; none of it may come through.
    cases = [
        {"Access-Control-Request-Method": "POST"},  # no Origin: forwarded to llama.cpp
        {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
        {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
        {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    ]
    for headers in cases:
        _status, h, _body = _request(engine.port, "OPTIONS", "/v1/chat/completions", headers=headers)
        assert "access-control-allow-credentials" not in h, headers


@pytest.mark.parametrize(
    "origin", ["https://app.example.com", "http://printer.lan:8080", "http://localhost:5173"]
)
def test_allowed_origin_gets_cors_without_credentials(engine: Engine, origin: str) -> None:
    status, h, _body = _request(
        engine.port,
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert status == 204
    assert h["access-control-allow-origin"] == origin
    assert "POST" in h["access-control-allow-methods"] and h["access-control-allow-headers"] == "content-type"
    assert "access-control-allow-credentials" not in h

    headers = {"Origin": origin, "Content-Type": "application/json"}
    status, h, body = _request(engine.port, "POST", "/v1/chat/completions", body=_chat(4), headers=headers)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
    assert h["access-control-allow-origin"] == origin
    assert "access-control-allow-credentials" not in h


def test_curl_like_client_streams_chunk_by_chunk_without_a_key(engine: Engine) -> None:
    before = _inference_counts(engine.port)
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=60)
    try:
        sent = time.monotonic()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=_chat(48, stream=True, ignore_eos=True),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert (resp.getheader("Content-Type") or "").startswith("text/event-stream")
        arrivals = []
        for raw in resp:
            line = raw.strip()
            if line == b"data: [DONE]":
                break
            if line.startswith(b"data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                arrivals.append(time.monotonic())
    finally:
        conn.close()
    assert len(arrivals) >= 40
    # Relayed as generated, not buffered until the end: the first token comes well before the last.
    first, last = arrivals[0] - sent, arrivals[-1] - sent
    assert first < 0.5 * last, (first, last)
    assert _inference_counts(engine.port) != before  # this one did reach llama.cpp


def test_openai_package_works_without_a_key(engine: Engine) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{engine.port}/v1", api_key="not-needed", max_retries=0)
    models = client.models.list().data
    assert models[0].id == ALIAS and models[0].owned_by == "llamacpp"
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    answer = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=16, temperature=0)
    assert answer.choices[0].message.content
    pieces = [
        chunk.choices[0].delta.content
        for chunk in client.chat.completions.create(
            model=ALIAS, messages=messages, max_tokens=16, temperature=0, stream=True
        )
        if chunk.choices and chunk.choices[0].delta.content
    ]
    assert len(pieces) > 3
    assert "".join(pieces) == answer.choices[0].message.content  # same greedy answer, piece by piece


def test_keys_sent_by_clients_do_not_matter(engine: Engine) -> None:
    for headers in ({"Authorization": "Bearer sk-anything"}, {"X-Api-Key": "wrong"}, {"Authorization": "x"}):
        status, _h, body = _request(engine.port, "GET", "/v1/models", headers=headers)
        assert status == 200, (headers, body)


def test_only_paths_reach_the_internal_server(engine: Engine) -> None:
    # An absolute-form target must not steer the forwarded request to another host.
    with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as s:
        s.sendall(
            b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    # Refused (h11) or reduced to its path (httptools): either way it is this engine that answers.
    assert answer.startswith(b"HTTP/1.1 400 ") or (
        answer.startswith(b"HTTP/1.1 200 ")
        and b"server: llama.cpp" in answer.lower()
        and b"smollm2" in answer
    ), answer[:200]
    status, _h, _b = _request(engine.port, "GET", "//evil.example/v1/models")  # only a path, llama.cpp's 404
    assert status == 404


def _internal_port(engine: Engine) -> int:
    listening = {
        c.laddr.port
        for c in psutil.Process(engine.proc.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }
    others = listening - {engine.port}
    assert len(others) == 1, listening
    return others.pop()


def test_internal_port_needs_the_key(engine: Engine) -> None:
    internal = _internal_port(engine)
    assert _request(internal, "GET", "/health")[0] == 200  # readiness stays open, says nothing else
    before = _inference_counts(engine.port)
    for headers in ({}, {"Authorization": "Bearer guessed"}):
        assert _request(internal, "GET", "/v1/models", headers=headers)[0] == 401
        status, _h, _b = _request(
            internal,
            "POST",
            "/v1/chat/completions",
            body=_chat(8),
            headers={**headers, "Content-Type": "text/plain"},
        )
        assert status == 401
    assert _inference_counts(engine.port) == before


def test_a_client_that_goes_away_stops_the_generation(engine: Engine) -> None:
    conn = _streaming(engine.port)
    assert _metrics(engine.port)["llamacpp:requests_processing"] == 1
    conn.close()  # mid-stream, as a closed browser tab or a killed script does
    deadline = time.monotonic() + 5
    while _metrics(engine.port)["llamacpp:requests_processing"] != 0:
        assert time.monotonic() < deadline, "the generation kept running for a client that left"
        time.sleep(0.05)


# --- start, readiness, stop -----------------------------------------------------------------------------


def _wait_loading(eng: Engine) -> list[int | None]:
    """Poll /health until the loading responder answers 503 (the load waits at its gate meanwhile)."""
    seen: list[int | None] = []
    deadline = time.monotonic() + STARTUP_DEADLINE
    while not seen or seen[-1] != 503:
        assert time.monotonic() < deadline and eng.proc.poll() is None, eng.log_text()[-3000:]
        seen.append(health(eng.port))
        assert seen[-1] != 200, "served before the load was let start"
        time.sleep(0.005)
    return seen


@posix_only
def test_readiness_is_503_then_200_and_the_loader_goes_away(tmp_path: Path) -> None:
    env = {**os.environ, "STIGMER_LLM_ORIGINS": "https://env.example, http://*.corp:*"}
    gate = tmp_path / "load"
    eng = _spawn(tmp_path, env=env, load_gate=gate)
    try:
        seen = _wait_loading(eng)  # bound early and answering while the model loads
        refused_while_loading = _request(eng.port, "GET", "/health", headers={"Host": "evil.example"})[0]
        gate.touch()  # now the model loads, and the loading responder hands over to the guard
        deadline = time.monotonic() + STARTUP_DEADLINE
        while seen[-1] != 200:
            assert time.monotonic() < deadline and eng.proc.poll() is None, eng.log_text()[-3000:]
            seen.append(health(eng.port))
            time.sleep(0.005)
        statuses = [s for s in seen if s is not None]
        assert 503 in statuses, seen  # bound early and answering while the model loads
        assert set(statuses) == {503, 200} and statuses.index(200) == len(statuses) - 1
        # once it answered, it never stopped answering (no refused or hanging connection)
        assert None not in seen[seen.index(statuses[0]) :]
        assert refused_while_loading == 403  # the guard's rules hold while loading too
        assert psutil.Process(eng.proc.pid).children() == []  # the loading responder is gone

        # origins from the environment when no --allow-origin is given
        preflight = {"Origin": "https://env.example", "Access-Control-Request-Method": "POST"}
        assert _request(eng.port, "OPTIONS", "/v1/models", headers=preflight)[0] == 204
        preflight["Origin"] = "http://build.corp:8080"
        assert _request(eng.port, "OPTIONS", "/v1/models", headers=preflight)[0] == 204
        preflight["Origin"] = "https://app.example.com"
        assert _request(eng.port, "OPTIONS", "/v1/models", headers=preflight)[0] == 403
    finally:
        _stop_and_check_gone(eng)


@posix_only
def test_sigterm_while_loading_leaves_nothing_behind(tmp_path: Path) -> None:
    eng = _spawn(tmp_path, load_gate=tmp_path / "never")  # loading until it is stopped
    try:
        _wait_loading(eng)  # the loading responder answers
        loader = psutil.Process(eng.proc.pid).children()
        assert len(loader) == 1
        started = time.monotonic()
        eng.proc.send_signal(signal.SIGTERM)
        code = eng.proc.wait(timeout=10)
        assert time.monotonic() - started < 2.0
        assert code in (0, -signal.SIGTERM)  # default disposition while the constructor holds the GIL
        # the responder sees its parent go and leaves, so the port is not held by an orphan
        _gone, alive = psutil.wait_procs(loader, timeout=2)
        assert alive == []
    finally:
        _stop_and_check_gone(eng)


@posix_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_streamed_request_exits_quickly(tmp_path: Path, sig: signal.Signals) -> None:
    eng = _spawn(tmp_path)
    try:
        wait_ready(eng)
        conn = _streaming(eng.port)  # tokens are flowing through the guard
        started = time.monotonic()
        eng.proc.send_signal(sig)
        code = eng.proc.wait(timeout=10)
        elapsed = time.monotonic() - started
        conn.close()
        assert elapsed < 2.0, f"took {elapsed:.2f} s to exit"
        assert code == 0
        assert f"engine stopping ({sig.name})" in eng.log_text()
    finally:
        _stop_and_check_gone(eng)


def test_busy_public_port_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        eng = _spawn(tmp_path, port=port)
        started = time.monotonic()
        try:
            code = eng.proc.wait(timeout=STARTUP_DEADLINE)
        finally:
            if eng.proc.poll() is None:
                eng.proc.kill()
        elapsed = time.monotonic() - started
    log = eng.log_text()
    assert code == 1
    assert log.strip() == f"error: port {port} is already in use"  # before any model loading
    assert elapsed < 5.0, elapsed  # Python start-up and imports; ~0.15 s on a quiet machine


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--threads", "0", "--threads 0 is out of range 1-1024"),
        ("--threads", "1025", "--threads 1025 is out of range 1-1024"),
        ("--ctx-size", "0", f"--ctx-size 0 is out of range 1-{MAX_CTX}"),
        ("--ctx-size", "99999999", f"--ctx-size 99999999 is out of range 1-{MAX_CTX}"),
        ("--ctx-size", "-5", f"--ctx-size -5 is out of range 1-{MAX_CTX}"),
    ],
)
def test_bounds_are_usage_errors(tmp_path: Path, flag: str, value: str, message: str) -> None:
    eng = _spawn(tmp_path, extra=(flag, value))  # argparse keeps the last of a repeated option
    assert eng.proc.wait(timeout=30) == 2
    log = eng.log_text()
    assert message in log and "Traceback" not in log


def test_a_context_beyond_memory_is_one_line_not_an_oom_kill(tmp_path: Path) -> None:
    # 4 GiB available, whatever this machine has free now: 2^20 tokens of the starter model need ~24 GB.
    eng = spawn_engine(tmp_path, ctx=MAX_CTX, available=4 << 30)
    assert eng.proc.wait(timeout=30) == 1
    lines = eng.log_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: a context of 1048576 tokens needs about"), lines


def test_an_engine_init_failure_is_one_line(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"  # right magic and header, so llama.cpp itself has to fail
    with starter().open("rb") as f:
        truncated.write_bytes(f.read(4_000_000))
    argv = engine_argv(
        sys.executable,
        model_path=truncated,
        alias=ALIAS,
        host="127.0.0.1",
        port=free_port(),
        ctx_size=CTX,
        threads=1,
    )
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the engine failed to start" in errors[0]
    assert "Traceback" not in run.stderr + run.stdout

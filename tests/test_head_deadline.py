"""The request-head deadline of our uvicorn servers (net.head_deadline): a connection that does not
send its whole request head in time is closed, with either of uvicorn's HTTP parsers; a request whose
head has come is left alone. Then the built-in engine's public port, as the product runs it. (The
API's own port is tested in test_api_hostile.py.)"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stigmer.net import head_deadline
from tests.doubles.archives import free_port
from tests.doubles.engine import spawn_engine, wait_ready

DEADLINE = 0.5


async def _slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, then answers after a while (longer than the head deadline)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(3 * DEADLINE)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=["h11", "httptools"])
def port(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    import uvicorn
    import uvicorn.protocols.http.auto as auto

    if request.param == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        monkeypatch.setattr(auto, "AutoHTTPProtocol", H11Protocol)
    else:
        pytest.importorskip("httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        monkeypatch.setattr(auto, "AutoHTTPProtocol", HttpToolsProtocol)
    number = free_port()
    config = uvicorn.Config(
        _slow_app, host="127.0.0.1", port=number, lifespan="off", log_level="warning",
        http=head_deadline.with_head_deadline(DEADLINE),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    yield number
    server.should_exit = True
    thread.join(timeout=10)


def _closed_after(sock: socket.socket, limit: float) -> float:
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        pytest.fail(f"still open after {limit} s")
    except ConnectionResetError:
        data = b""
    assert data == b""
    return time.monotonic() - started


@pytest.mark.parametrize("sent", [b"", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Len"])
def test_no_whole_head_in_time_closes_the_connection(port: int, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        assert DEADLINE * 0.5 <= _closed_after(sock, 20 * DEADLINE) < 10 * DEADLINE


def test_a_slow_answer_and_a_slow_body_are_not_cut_off(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(2 * DEADLINE)  # the rest of the body comes late: the head was in time
        sock.sendall(b"cd")
        answer = b""
        while not answer.endswith(b"ok"):
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")


def test_the_next_request_on_a_kept_alive_connection_has_its_own_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok"):
            answer += sock.recv(4096)
        sock.sendall(b"GET / HTTP/1.1\r\n")  # and no more: uvicorn's keep-alive timer stops at a byte
        assert _closed_after(sock, 20 * DEADLINE) < 4.0  # uvicorn's keep-alive timeout is 5 s


def test_the_deadline_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(head_deadline.ENV, raising=False)
    assert head_deadline.head_timeout() == head_deadline.HEAD_TIMEOUT == 15.0
    for value, expected in (("2.5", 2.5), ("0", 15.0), ("-1", 15.0), ("nan", 15.0), ("x", 15.0)):
        monkeypatch.setenv(head_deadline.ENV, value)
        assert head_deadline.head_timeout() == expected


@pytest.mark.skipif(os.name == "nt", reason="the engine's loading responder forks")
def test_the_engine_closes_a_connection_that_sends_no_request(tmp_path: Path) -> None:
    env = {**os.environ, head_deadline.ENV: str(DEADLINE)}
    eng = spawn_engine(tmp_path, ctx=1024, env=env)
    try:
        wait_ready(eng)  # the guard serves (the loading responder has its own 1 s bound)
        for sent in (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
            with socket.create_connection(("127.0.0.1", eng.port)) as sock:
                sock.sendall(sent)
                assert _closed_after(sock, 20 * DEADLINE) < 10 * DEADLINE
    finally:
        eng.proc.terminate()
        try:
            eng.proc.wait(timeout=10)
        except Exception:
            eng.proc.kill()
            eng.proc.wait(timeout=10)

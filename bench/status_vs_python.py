"""Benchmark: wall time of `stigmer server llm status` against `python -c pass`, in the same run.

Both run N times (after 2 warm-ups each) as subprocesses, alternating, with STIGMER_HOME in a temp dir
holding a config file (provider llamacpp on a free loopback port) and bytecode cached in the temp dir
(PYTHONPYCACHEPREFIX), as a pip install has it. Cases:
  (a) nothing running: the status probe meets a closed port;
  (a') the same without a bytecode cache, when PYTHONDONTWRITEBYTECODE is set here (as in this sandbox);
  (c) nothing running, the Local LLM runtime (the default provider) with llm.model not set: the model
      this machine's start chose, read from data/default-model.json (issue 14's case);
  (b) a Local LLM running: the built-in engine, started through the product (`stigmer server`), stopped
      at the end with `stigmer server stop`.
Prints median / p90 of both and the difference (target: status under 100 ms here), the command's phases
timed in-process, and the top 10 imports by cumulative (and by own) time from
`python -X importtime -m stigmer server llm status`.

    python bench/status_vs_python.py [-n 20] [--skip-running]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/_common.py: `python bench/NAME.py` puts bench/ first on sys.path
from _common import (
    CpuWatch,
    free_port,
    isolated_env,
    machine_line,
    nosite_argv,
    start_engine,
    stigmer_exe,
    stop_engine,
)

from stigmer.config import store
from stigmer.paths import Paths

TARGET_MS = 100.0
STATUS = ["server", "llm", "status"]


def uncached_env(env: dict[str, str]) -> dict[str, str]:
    """`isolated_env`'s, but as this environment runs it: PYTHONDONTWRITEBYTECODE as inherited, no prefix."""
    out = {k: v for k, v in env.items() if k != "PYTHONPYCACHEPREFIX"}
    if "PYTHONDONTWRITEBYTECODE" in os.environ:
        out["PYTHONDONTWRITEBYTECODE"] = os.environ["PYTHONDONTWRITEBYTECODE"]
    return out


def write_config(home: Path, port: int) -> None:
    """A real config file, as `stigmer server` and `stigmer config set` would leave it."""
    paths = Paths(home)
    paths.home.mkdir(parents=True, exist_ok=True)
    store.ensure_file(paths)
    store.set_value(paths, "llm.provider", "llamacpp")
    store.set_value(paths, "llm.base_url", f"http://127.0.0.1:{port}")
    store.set_value(paths, "llm.context_size", "1024")


def runtime_env(env: dict[str, str], tmp: Path) -> dict[str, str]:
    """Case (c): another home with the default config file and this machine's default model chosen
    (as `stigmer server` leaves them), the runtime provider on a free port where nothing listens."""
    from stigmer.llm.ollama.provider import default_choice

    home = tmp / "home-runtime"
    paths = Paths(home)
    paths.home.mkdir(parents=True)
    store.ensure_file(paths)
    default_choice(paths, refresh=True)
    out = {k: v for k, v in env.items() if k not in ("STIGMER_LLM_PROVIDER", "STIGMER_LLM_CONTEXT_SIZE")}
    return {**out, "STIGMER_HOME": str(home), "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}"}


def run_once(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{argv} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
    return elapsed


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1]


def compare(label: str, env: dict[str, str], n: int, *, nosite: bool = False) -> dict[str, float]:
    """`nosite`: both under `python -S` (sys.path set by hand), without what site's .pth files import."""
    status = nosite_argv(STATUS) if nosite else [*stigmer_exe(), *STATUS]
    python = nosite_argv(None) if nosite else [sys.executable, "-c", "pass"]
    for _ in range(2):  # warm-ups: page cache, .pyc files
        run_once(status, env)
        run_once(python, env)
    s: list[float] = []
    p: list[float] = []
    for i in range(n):
        if i % 2 == 0:
            s.append(run_once(status, env))
            p.append(run_once(python, env))
        else:
            p.append(run_once(python, env))
            s.append(run_once(status, env))
    res = {
        "status_median": statistics.median(s) * 1000,
        "status_p90": p90(s) * 1000,
        "python_median": statistics.median(p) * 1000,
        "python_p90": p90(p) * 1000,
    }
    diff = res["status_median"] - res["python_median"]
    verdict = "OK" if res["status_median"] < TARGET_MS else "ABOVE TARGET"
    print(
        f"({label}) N={n}: status median {res['status_median']:.1f} ms, p90 {res['status_p90']:.1f} ms | "
        f"python{' -S' if nosite else ''} -c pass median {res['python_median']:.1f} ms, p90 {res['python_p90']:.1f} ms | "
        f"difference {diff:.1f} ms | target status < {TARGET_MS:.0f} ms: {verdict}",
        flush=True,
    )
    return res


def check_output(env: dict[str, str], want: str) -> None:
    r = subprocess.run([*stigmer_exe(), *STATUS], env=env, capture_output=True, text=True, timeout=60)
    if want not in r.stdout:
        raise SystemExit(f"status does not say {want!r}:\n{r.stdout}{r.stderr}")


def importtime(env: dict[str, str], runs: int = 5) -> None:
    """Median over a few runs of each module's self and cumulative import time (one run is noisy)."""
    samples: dict[str, list[tuple[int, int]]] = {}
    depth: dict[str, int] = {}
    totals: list[int] = []
    for _ in range(runs):
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "stigmer", *STATUS],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
        total = 0
        for line in r.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if m:
                name = m.group(4)
                samples.setdefault(name, []).append((int(m.group(1)), int(m.group(2))))
                depth[name] = (len(m.group(3)) - 1) // 2
                total += int(m.group(1))
        totals.append(total)
    rows = [
        (statistics.median(s for s, _ in v), statistics.median(c for _, c in v), k)
        for k, v in samples.items()
    ]
    print(
        f"\npython -X importtime -m stigmer server llm status ({runs} runs, per-module medians): "
        f"{len(rows)} modules, {statistics.median(totals) / 1000:.1f} ms of imports in all "
        "(importtime itself adds overhead)"
    )
    print("top 10 by cumulative time (us; depth 0 = imported by the command itself, not by a module):")
    for self_us, cum_us, name in sorted(rows, key=lambda r: r[1], reverse=True)[:10]:
        print(f"  {cum_us:8.0f} cumulative {self_us:7.0f} self  depth {depth[name]}  {name}")
    print("top 10 by own (self) time:")
    for self_us, cum_us, name in sorted(rows, key=lambda r: r[0], reverse=True)[:10]:
        print(f"  {self_us:8.0f} self {cum_us:8.0f} cumulative  {name}")


# Runs in a child with the benchmark's environment: the status command's phases, timed one by one. It
# uses the CLI's internals (cli.main._parser, cli.common.context, llm.active.status, render.Out): if those
# change, the breakdown says so and the benchmark goes on.
_PHASES = r"""
import json, os, sys, time
t0 = time.perf_counter()
from stigmer.cli import main as m
t1 = time.perf_counter()
args = m._parser().parse_args(["server", "llm", "status"])
t2 = time.perf_counter()
from stigmer.cli import llm_cmd
from stigmer.llm.status import LlmStatus
from stigmer.paths import Paths
paths = Paths.from_env()
st = None
if llm_cmd._server_may_run(paths):
    from stigmer.server import control
    daemon = control.fetch_status(paths)
    if daemon is not None and isinstance(daemon.get("llm"), dict):
        st = LlmStatus.from_dict(daemon["llm"])
t3 = time.perf_counter()
if st is None:
    from stigmer.llm.quick_status import quick_status
    st = quick_status(paths)
t4 = time.perf_counter()
if st is None:
    from stigmer.cli.common import context
    from stigmer.llm import active
    paths, settings = context()
    st = active.status(settings, paths)
t5 = time.perf_counter()
real, sys.stdout = sys.stdout, open(os.devnull, "w")
from stigmer.cli.render import Out
Out().llm_block(st)
sys.stdout.flush()
t6 = time.perf_counter()
real.write(json.dumps([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5]))
"""
_PHASE_NAMES = [
    "import stigmer.cli.main (argparse, errors)",
    "build the parser",
    "a pid record? then ask the daemon (control.fetch_status: its API over HTTP, else the records)",
    "nothing runs: quick_status (3 settings, one refused connect, default-model.json or the store)",
    "the provider's status when quick_status is unsure (settings, provider, HTTP probe)",
    "render the block",
]


def breakdown(label: str, env: dict[str, str], runs: int = 10) -> None:
    """Where the status command's own time goes, phase by phase."""
    phases: list[list[float]] = []
    for _ in range(runs):
        r = subprocess.run(
            [sys.executable, "-c", _PHASES], env=env, capture_output=True, text=True, timeout=60
        )
        if r.returncode != 0:
            print(f"\nphase breakdown unavailable (the CLI's internals changed?): {r.stderr.strip()[-300:]}")
            return
        phases.append(json.loads(r.stdout))
    print(
        f"\n({label}) phases of the status command, in-process (median of {runs} runs, ms; python "
        "start-up not included):"
    )
    total = 0.0
    for i, name in enumerate(_PHASE_NAMES):
        ms = statistics.median(p[i] for p in phases) * 1000
        total += ms
        print(f"  {ms:6.1f}  {name}")
    print(f"  {total:6.1f}  total")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="timed runs of each command per case; default 20")
    ap.add_argument("--skip-running", action="store_true", help="only case (a), nothing running")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-status-"))
    port = free_port()
    env = isolated_env(tmp, port)
    home = Path(env["STIGMER_HOME"])
    started = False
    watch = CpuWatch()
    try:
        write_config(home, port)
        machine_line()
        print(f"stigmer: {' '.join(stigmer_exe())}")
        check_output(env, "Not Running")
        compare("a: nothing running", env, args.n)
        # This sandbox's site-packages holds a .pth that imports certifi at every start (~30 ms that
        # users do not pay): the same without site.
        compare("a', python -S: nothing running", env, args.n, nosite=True)
        breakdown("a", env)
        runtime = runtime_env(env, tmp)
        check_output(runtime, "Chosen for this machine")
        compare("c: the runtime's default model, nothing running", runtime, args.n)
        compare("c', python -S: the runtime's default model, nothing running", runtime, args.n, nosite=True)
        breakdown("c", runtime)
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            compare("a, no bytecode cache: PYTHONDONTWRITEBYTECODE=1 as inherited", uncached_env(env), args.n)
        if not args.skip_running:
            t = time.perf_counter()
            started = True  # from here on, stop whatever `stigmer server` may have started
            start_engine(env)
            print(f"(stigmer server started the built-in engine in {time.perf_counter() - t:.2f} s)")
            check_output(env, "✓ Running")
            compare("b: built-in engine running", env, args.n)
            compare("b', python -S: built-in engine running", env, args.n, nosite=True)
            breakdown("b", env)
        importtime(env)
    finally:
        if started:
            stop_engine(env, watch)
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    main()

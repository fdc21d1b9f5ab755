"""Benchmark: wall time of `stigmer server llm status` against `python -c pass`, in the same run.

Both run N times (after 2 warm-ups each) as subprocesses, alternating, with STIGMER_HOME in a temp dir
holding a config file (provider llamacpp on a free loopback port). Two cases:
  (a) nothing running: the status probe meets a closed port;
  (b) a Local LLM running: the built-in engine, started through the product (`stigmer server`), stopped
      at the end with `stigmer server stop`.
Prints median / p90 of both and the difference (target: status under 100 ms here), then the top 10
imports by cumulative time from `python -X importtime -m stigmer server llm status`.

    python bench/status_vs_python.py [-n 20] [--skip-running]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from stigmer.config import store
from stigmer.paths import Paths
from stigmer.proc import record as records

TARGET_MS = 100.0
STATUS = ["server", "llm", "status"]


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in (11434, 11435):
            return port


def stigmer_exe() -> list[str]:
    exe = Path(sys.executable).with_name("stigmer")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("stigmer")
    return [found] if found else [sys.executable, "-m", "stigmer"]


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of the machine's CPU time spent busy over `seconds` (Linux); None where unknown."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


class CpuWatch:
    """How much CPU other programs used while the benchmark ran (Linux; approximate): the machine's busy
    time from /proc/stat minus this process's and its waited-for children's, minus `extra` (seconds used
    by detached processes we started, such as the engine). Shared machines make figures noisy; this says
    how much."""

    def __init__(self) -> None:
        self.extra = 0.0
        self._start = (self._machine(), self._own(), time.monotonic())

    @staticmethod
    def _machine() -> float | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user + nice + system + steal; irq/softirq left out: loopback traffic lands there, not in our rusage
        busy = vals[0] + vals[1] + vals[2] + vals[7]
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def add_process(self, pid: int) -> None:
        """Count a detached process's CPU time as ours (call just before stopping it)."""
        try:
            t = psutil.Process(pid).cpu_times()
            self.extra += t.user + t.system
        except psutil.Error:
            pass

    def report(self) -> str:
        machine0, own0, wall0 = self._start
        machine1 = self._machine()
        if machine0 is None or machine1 is None:
            return "CPU used by other programs during the run: unknown (no /proc/stat)"
        wall = time.monotonic() - wall0
        other = max(0.0, (machine1 - machine0) - (self._own() - own0) - self.extra)
        share = other / (wall * (os.cpu_count() or 1))
        text = f"CPU used by other programs during the run: {share:.0%} of the machine ({other:.1f} cpu-s)"
        return text + (" -- WARNING: figures disturbed by other load" if share > 0.10 else "")


def machine_line() -> None:
    busy = cpu_busy()
    text = f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}"
    if busy is not None:
        text += f", {busy:.0%} CPU busy before the run"
        if busy > 0.15:
            text += " -- WARNING: something else is running; figures will be noisy"
    print(text, flush=True)


def isolated_env(tmp: Path, port: int) -> dict[str, str]:
    """Our environment minus STIGMER_* and proxies, with every product path inside tmp.

    Bytecode is cached in tmp/pycache (PYTHONPYCACHEPREFIX) as a pip install would have it: an editable
    install run with PYTHONDONTWRITEBYTECODE=1 (as in this sandbox) recompiles stigmer's sources at
    every start, which is not what users get. `uncached_env` measures that case separately."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STIGMER_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    user_home = tmp / "user-home"
    user_home.mkdir(exist_ok=True)
    env.update(
        {
            "PYTHONPYCACHEPREFIX": str(tmp / "pycache"),
            "STIGMER_HOME": str(tmp / "stigmer-home"),
            "HOME": str(user_home),
            "OLLAMA_MODELS": str(user_home / ".ollama" / "models"),
            "NO_COLOR": "1",
            "STIGMER_LLM_PROVIDER": "llamacpp",
            "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{port}",
            "STIGMER_LLM_CONTEXT_SIZE": "1024",
        }
    )
    return env


def uncached_env(env: dict[str, str]) -> dict[str, str]:
    """The same, but as this environment runs it: PYTHONDONTWRITEBYTECODE as inherited, no prefix."""
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


def run_once(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{argv} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
    return elapsed


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1]


def compare(label: str, env: dict[str, str], n: int) -> dict[str, float]:
    status = [*stigmer_exe(), *STATUS]
    python = [sys.executable, "-c", "pass"]
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
        f"python -c pass median {res['python_median']:.1f} ms, p90 {res['python_p90']:.1f} ms | "
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
from stigmer.cli.common import context
paths, settings = context()
t3 = time.perf_counter()
from stigmer.llm import active
t4 = time.perf_counter()
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
    "import stigmer.cli.main (argparse, logging, errors)",
    "build the parser (imports config_cmd, llm_cmd, server_cmd)",
    "context(): read config.yaml (ruamel.yaml)",
    "import stigmer.llm.active",
    "active.status(): pid record (psutil), provider import, HTTP probe, model store",
    "render the block",
]
CANDIDATES = [
    "psutil",
    "ruamel.yaml",
    "importlib.metadata",
    "urllib.request",
    "http.client",
    "hashlib",
    "logging",
    "argparse",
]


def breakdown(label: str, env: dict[str, str], runs: int = 10, *, imports: bool = True) -> None:
    """Where the status command's own time goes, and what its heaviest imports cost alone."""
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
    if not imports:
        return
    base = statistics.median(run_once([sys.executable, "-c", "pass"], env) for _ in range(runs))
    print(
        f"cost of importing one module alone (python -c 'import X' minus python -c pass, median of {runs}, "
        "ms; shared dependencies are counted in each):"
    )
    for mod in CANDIDATES:
        t = statistics.median(run_once([sys.executable, "-c", f"import {mod}"], env) for _ in range(runs))
        print(f"  {(t - base) * 1000:6.1f}  {mod}")


def stop_engine(env: dict[str, str], home: Path, watch: CpuWatch) -> None:
    rec = records.read(Paths(home).llm_pid)
    if rec is not None:
        watch.add_process(rec.pid)
    subprocess.run(
        [*stigmer_exe(), "server", "stop"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    if Paths(home).llm_pid.exists():  # the CLI failed: stop it with the product's own code
        from stigmer.llm.provider import stop_managed

        stop_managed(Paths(home))


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
        breakdown("a", env, imports=False)
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            compare("a, no bytecode cache: PYTHONDONTWRITEBYTECODE=1 as inherited", uncached_env(env), args.n)
        if not args.skip_running:
            t = time.perf_counter()
            r = subprocess.run(
                [*stigmer_exe(), "server"], env=env, capture_output=True, text=True, timeout=120
            )
            started = True
            if r.returncode != 0:
                raise SystemExit(f"stigmer server failed:\n{r.stdout}{r.stderr}")
            print(f"(stigmer server started the built-in engine in {time.perf_counter() - t:.2f} s)")
            check_output(env, "✓ Running")
            compare("b: built-in engine running", env, args.n)
            breakdown("b", env)
        importtime(env)
    finally:
        if started:
            stop_engine(env, home, watch)
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    main()

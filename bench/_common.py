"""Helpers shared by the benchmark scripts in this directory.

The scripts run as `python bench/NAME.py`, so this directory is on sys.path and they import this module as
`_common`. Everything here is used by more than one script; what one script alone needs stays in it.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from stigmer.paths import Paths

MB = 1_000_000  # 10^6 bytes: the unit the download figures are printed in


# -- the machine: how busy it was before and during the run -------------------------------------------


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
    """Print the machine and how busy it is before the run, so a noisy figure can be told apart."""
    busy = cpu_busy()
    text = f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}"
    if busy is not None:
        text += f", {busy:.0%} CPU busy before the run"
        if busy > 0.15:
            text += " -- WARNING: something else is running; figures will be noisy"
    print(text, flush=True)


# -- processes -------------------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback port, never Ollama's 11434/11435, so a real Ollama on this machine is left alone."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in (11434, 11435):
            return port


def stop_process(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate a child we started, and kill it if it does not exit within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the product: `stigmer` in an isolated home, the built-in engine started and stopped through it ------


def stigmer_exe() -> list[str]:
    """The venv's `stigmer` console script (what users run), else one on PATH, else `python -m stigmer`."""
    exe = Path(sys.executable).with_name("stigmer")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("stigmer")
    return [found] if found else [sys.executable, "-m", "stigmer"]


def isolated_env(tmp: Path, port: int, *, ctx: int = 1024, threads: int | None = None) -> dict[str, str]:
    """Our environment minus STIGMER_* and proxies, with every product path inside tmp; provider llamacpp
    on `port` with context size `ctx` (and `threads` engine threads when given).

    Bytecode is cached in tmp/pycache (PYTHONPYCACHEPREFIX) as a pip install would have it: an editable
    install run with PYTHONDONTWRITEBYTECODE=1 (as in this sandbox) recompiles stigmer's sources at
    every start, which is not what users get."""
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
            "STIGMER_LLM_CONTEXT_SIZE": str(ctx),
        }
    )
    if threads is not None:
        env["STIGMER_LLM_THREADS"] = str(threads)
    return env


def start_engine(env: dict[str, str]) -> None:
    """`stigmer server`: start the built-in engine as users do; it returns once the engine is ready."""
    r = subprocess.run([*stigmer_exe(), "server"], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"stigmer server failed:\n{r.stdout}{r.stderr}")


def stop_engine(env: dict[str, str], watch: CpuWatch | None = None) -> None:
    """`stigmer server stop`, falling back to the product's own code if the CLI fails, so that nothing
    `start_engine` started outlives the benchmark. `stigmer server` now starts the whole server (the
    engine, Temporal, the API, the agent worker, under a daemon), so this is `stop_server`. With `watch`,
    their CPU time is counted as ours first: they are detached, so not in our children's rusage."""
    stop_server(env, watch)


# -- downloads: the test file, and curl as the baseline ---------------------------------------------------


def make_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path` (incompressible, so no layer can cheat); return their sha256."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(16 * 1024 * 1024, left))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def settle() -> None:
    """Flush dirty pages left by the previous run so that its writeback does not slow the next one."""
    os.sync()


def time_curl(curl: str, url: str, dest: str | Path, size: int | None, *, follow: bool = False) -> float:
    """Seconds for `curl -s [-L] -o DEST URL`. With `size`, the output's size is checked and the file
    removed (None for /dev/null). `follow` (-L) for URLs that redirect, as registry blobs do."""
    settle()
    t = time.perf_counter()
    subprocess.run([curl, "-s", *(["-L"] if follow else []), "-o", str(dest), url], check=True, timeout=300)
    elapsed = time.perf_counter() - t
    if size is not None:
        out = Path(dest)
        if out.stat().st_size != size:
            raise SystemExit("curl fetched the wrong size")
        out.unlink()
    return elapsed


# -- the server: `stigmer server` (daemon, built-in engine, Temporal, API, agent runner) in a temp home -----

SERVER_SERVICES = ("daemon", "llm", "temporal", "server", "agent-runner")  # the pid records it writes
_SEEN: dict[int, float] = {}  # pid -> create time of every server process server_pids() has seen


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so that a benchmark killed that way still runs its clean-up
    (`finally:`) as on Ctrl-C."""
    import signal

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all bound at once while they are picked, so none repeats)."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            if int(sock.getsockname()[1]) in (11434, 11435):
                sock.close()
                continue
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def server_env(tmp: Path, home: Path | None = None, *, ctx: int = 2048) -> dict[str, str]:
    """`isolated_env` plus every port the server uses on a free loopback port: the engine, the API,
    Temporal's frontend and its Web UI (on, as by default). `home`: a STIGMER_HOME other than
    tmp/stigmer-home (a fresh one per cold start); bytecode stays cached in tmp/pycache across homes."""
    llm, api, temporal, ui = free_ports(4)
    env = isolated_env(tmp, llm, ctx=ctx)
    if home is not None:
        env["STIGMER_HOME"] = str(home)
    env.update(
        {
            "STIGMER_SERVER_PORT": str(api),
            "STIGMER_TEMPORAL_ADDRESS": f"127.0.0.1:{temporal}",
            "STIGMER_TEMPORAL_UI_PORT": str(ui),
        }
    )
    return env


def server_pids(env: dict[str, str]) -> dict[str, int]:
    """The live processes of the server in env's STIGMER_HOME, by service, from their pid records."""
    from stigmer.services.manager import Services

    services = Services(Paths(Path(env["STIGMER_HOME"])))
    out: dict[str, int] = {}
    for name in SERVER_SERVICES:
        rec = services.record(name)
        if rec is not None:
            out[name] = rec.pid
            _SEEN[rec.pid] = rec.create_time
    return out


def start_server(
    env: dict[str, str], *, timeout: float = 180, meta: dict[str, float] | None = None
) -> tuple[float, list[tuple[float, str]]]:
    """`stigmer server` until it returns: (seconds, its stderr lines each with the second it arrived,
    counted from the spawn). The progress lines ("Starting: Temporal", "Ready: agent runner") make a
    timeline of the start. Fails with the command's output if it fails. `meta` receives "wall0" (epoch
    seconds at the spawn, for log timestamps) and "create_time" (the command's own process create time
    as psutil reports it: compare pid records' create times with this one, not with the clock, as
    psutil's boot time is rounded to the second)."""
    import threading

    lines: list[tuple[float, str]] = []
    wall0 = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*stigmer_exe(), "server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if meta is not None:
        meta["wall0"] = wall0
        try:
            meta["create_time"] = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            meta["create_time"] = wall0

    def read_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    chunks: list[str] = []

    def read_out() -> None:
        assert proc.stdout is not None
        chunks.append(proc.stdout.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_err, read_out)]
    for r in readers:
        r.start()
    try:
        proc.wait(timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    elapsed = time.perf_counter() - t0
    for r in readers:
        r.join(5)
    out = "".join(chunks)
    if proc.returncode != 0 or "Ready!" not in out:
        err = "\n".join(text for _, text in lines)
        raise SystemExit(f"stigmer server failed ({proc.returncode}):\n{out}{err}")
    return elapsed, lines


def stop_server(env: dict[str, str], watch: CpuWatch | None = None) -> float:
    """`stigmer server stop` (its wall time is returned), then the product's own code for anything the
    CLI left. With `watch`, the services' CPU time is counted as ours first: they are detached, so they
    are not in our children's rusage."""
    pids = server_pids(env)
    if watch is not None:
        for pid in pids.values():
            watch.add_process(pid)
    t = time.perf_counter()
    try:
        subprocess.run(
            [*stigmer_exe(), "server", "stop"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pass
    elapsed = time.perf_counter() - t
    if server_pids(env):  # the CLI failed: stop them with the product's own code
        from stigmer.server import control

        control.stop(Paths(Path(env["STIGMER_HOME"])))
    return elapsed


def leftovers(tmp: Path) -> list[psutil.Process]:
    """Live processes (not zombies) that name `tmp` in their command line or STIGMER_HOME, or that
    server_pids() saw (same pid and create time: the engine's command line names no path of ours):
    ours, left running. A benchmark's temp dir is unique, so nothing else matches."""
    mark = str(tmp)
    me = os.getpid()
    found = []
    for pid, created in _SEEN.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.05 and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    seen = {p.pid for p in found}
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.pid in (me, *seen) or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            home = p.environ().get("STIGMER_HOME", "") if mark not in cmd else mark
        except (psutil.Error, OSError):
            continue
        if mark in cmd or home.startswith(mark):
            found.append(p)
    return found


def reap_leftovers(tmp: Path) -> list[str]:
    """Terminate (then kill) whatever `leftovers` finds; what was found, for the report (it should be
    nothing: `stigmer server stop` is meant to leave nothing behind)."""
    found = leftovers(tmp)
    names = []
    for p in found:
        try:
            names.append(f"pid {p.pid}: {' '.join(p.cmdline())[:120]}")
            p.terminate()
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(found, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return names


def clean_up(tmp: Path, env: dict[str, str] | None, watch: CpuWatch) -> None:
    """The end of a server benchmark: stop the server, kill and report what it left behind, remove tmp,
    print how busy the rest of the machine was."""
    left: list[str] = []
    try:
        if env is not None:
            stop_server(env, watch)
    finally:
        left = reap_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    if left:
        print("WARNING: processes still running after `stigmer server stop` (killed now):")
        for line in left:
            print(f"  {line}")
    print(watch.report())


def wait_http_200(url: str, proc: subprocess.Popen[bytes], deadline: float, interval: float = 0.01) -> None:
    """Poll `url` every `interval` s until it answers 200 (as the product's readiness probes do)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    while True:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=2)
        try:
            conn.request("GET", parts.path or "/")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited ({proc.returncode}) before {url} answered")
        if time.perf_counter() > deadline:
            raise SystemExit(f"{url} did not answer 200 in time")
        time.sleep(interval)


def median_ms(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) * 1000


def p90(xs: list[float]) -> float:
    import statistics

    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=10, method="inclusive")[-1]


def site_pth_imports() -> list[str]:
    """Modules that site's .pth files import at every interpreter start (besides `os`): when there are
    any (this sandbox's certifi hook, say), every Python process here starts slower than a user's."""
    import site

    found: list[str] = []
    for folder in site.getsitepackages():
        for pth in sorted(Path(folder).glob("*.pth")):
            try:
                text = pth.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("import ") and "__import__('_distutils_hack')" not in line:
                    found += sorted(set(re.findall(r"\bimport (\w+)", line)) - {"os"}) or [pth.name]
    return found


def nosite_argv(args: list[str] | None) -> list[str]:
    """`stigmer ARGS` run as `python -S` with this interpreter's sys.path set by hand: the command without
    what site's .pth files import at start-up (see _common.site_pth_imports); None: `python -S -c pass`."""
    if args is None:
        return [sys.executable, "-S", "-c", "pass"]
    here = str(Path(__file__).resolve().parent)
    paths = [p for p in sys.path if p and Path(p).is_dir() and str(Path(p).resolve()) != here]
    code = f"import sys; sys.path[:] = {paths!r}; from stigmer.cli.main import main; sys.exit(main({args!r}))"
    return [sys.executable, "-S", "-c", code]


def raw_chat_stream(
    host: str, port: int, body: dict[str, object], *, key: str | None = None
) -> tuple[int, float, float, float | None]:
    """A streamed chat completion with bare http.client, the baseline client of the token benchmarks:
    (content deltas, seconds to the last one, seconds to the first one, the engine's own tok/s)."""
    import http.client
    import json

    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    n = 0
    first: float | None = None
    engine_tps: float | None = None
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        t0 = time.perf_counter()
        last = t0
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise SystemExit(f"{host}:{port} answered HTTP {resp.status}: {resp.read()[:200]!r}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    n += 1
                    last = time.perf_counter()
                    first = last if first is None else first
            timings = chunk.get("timings")
            if isinstance(timings, dict) and "predicted_per_second" in timings:
                engine_tps = float(timings["predicted_per_second"])
    finally:
        conn.close()
    return n, last - t0, (first or last) - t0, engine_tps

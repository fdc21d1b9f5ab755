"""Helpers shared by the benchmark scripts in this directory.

The scripts run as `python bench/NAME.py`, so this directory is on sys.path and they import this module as
`_common`. Everything here is used by more than one script; what one script alone needs stays in it.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from stigmer.paths import Paths
from stigmer.services import record as records

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
    """`stigmer server stop`, falling back to the product's own code if the CLI fails, so that no engine
    outlives the benchmark. With `watch`, the engine's CPU time is counted as ours first: it is detached,
    so it is not in our children's rusage."""
    paths = Paths(Path(env["STIGMER_HOME"]))
    if watch is not None:
        rec = records.read(paths.llm_pid)
        if rec is not None:
            watch.add_process(rec.pid)
    subprocess.run(
        [*stigmer_exe(), "server", "stop"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    if paths.llm_pid.exists():  # the CLI failed: stop it with the product's own code
        from stigmer.llm.provider import stop_managed

        stop_managed(paths)


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

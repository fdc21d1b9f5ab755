"""Benchmark: generation speed through the product's client against a raw request to the same engine.

The built-in engine is started once through the product (`stigmer server`, provider llamacpp, starter
model smollm2:135m, ctx 1024, threads 2, free loopback port). Both sides stream the same 128-token chat
completion (max_tokens 128, ignore_eos, temperature 0) from its /v1/chat/completions and count content
chunks (one per token):
  product:  stigmer.llm.endpoint.OpenAICompatible(base_url + "/v1", "smollm2:135m").stream(...)
  baseline: a minimal http.client POST on a fresh connection, SSE lines parsed by hand.
tok/s = tokens / (request sent -> last token). One warm-up each, then 5 runs each, alternating; medians
and the ratio (target >= 0.95). The engine's own figure (timings.predicted_per_second, read by the raw
client from the last chunk) is printed to show what the engine itself did. The engine is stopped at the
end with `stigmer server stop`.

    python bench/tokens_per_second.py [--repeat 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/_common.py: `python bench/NAME.py` puts bench/ first on sys.path
from _common import (
    CpuWatch,
    free_port,
    isolated_env,
    machine_line,
    raw_chat_stream,
    start_engine,
    stop_engine,
)

from stigmer.llm.endpoint import OpenAICompatible
from stigmer.llm.models.starter import STARTER_MODEL

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TARGET = 0.95


def options(tokens: int) -> dict[str, Any]:
    return {"max_tokens": tokens, "ignore_eos": True, "temperature": 0}


def via_product(base_url: str, tokens: int) -> tuple[int, float]:
    """(tokens, seconds from the request to the last token) through OpenAICompatible.stream."""
    n = 0
    t0 = time.perf_counter()
    last = t0
    for _text in OpenAICompatible(base_url + "/v1", STARTER_MODEL).stream(MESSAGES, **options(tokens)):
        n += 1
        last = time.perf_counter()
    return n, last - t0


def via_raw(port: int, tokens: int) -> tuple[int, float, float | None]:
    """(tokens, seconds from the request to the last token, engine's own tok/s) with bare http.client."""
    body = {"model": STARTER_MODEL, "messages": MESSAGES, "stream": True, **options(tokens)}
    n, total, _first, engine_tps = raw_chat_stream("127.0.0.1", port, body)
    return n, total, engine_tps


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each; default 5")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens per completion; default 128")
    args = ap.parse_args()
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-tps-"))
    port = free_port()
    env = isolated_env(tmp, port, threads=2)
    base = env["STIGMER_LLM_BASE_URL"]
    watch = CpuWatch()
    try:
        start_engine(env)
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
            f"OpenAICompatible.stream {p:.1f} tok/s, raw http.client {b:.1f} tok/s, ratio {ratio:.3f} "
            f"(target >= {TARGET}) {'OK' if ratio >= TARGET else 'BELOW TARGET'}"
        )
        if engine:
            print(
                f"engine's own decode speed (timings.predicted_per_second, raw runs): "
                f"median {statistics.median(engine):.1f} tok/s"
            )
    finally:
        stop_engine(env, watch)
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())


if __name__ == "__main__":
    main()

"""Benchmark: the OpenAI-compatible endpoint's agents and its load (issue 16), on the real server with the
built-in engine and the real starter model.

(a) first token of `agent/NAME`: a streamed POST /v1/chat/completions for `agent/default`, until its first
    content chunk, against what `stigmer run` waits for: POST /v1/executions and its SSE stream until the
    first `delta`. The same message, --repeat pairs, interleaved, after a warm-up; medians. Target: the
    endpoint adds nothing over the execution's own stream (< +10 ms).
(b) load: --clients streaming clients (32) for --seconds (60), each asking `local` again and again (a
    short answer, max_tokens 8): every request must end with [DONE] and none may be lost; the API's RSS
    (the `server` service's process) sampled every 0.5 s must stay under 120 MB. Requests past
    server.max_queue would get 429: the default (64) is above 32, so none is expected.

    python bench/endpoint_load.py [--repeat 10] [--clients 32] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from _common import (
    CpuWatch,
    clean_up,
    interrupt_on_sigterm,
    machine_line,
    server_env,
    server_pids,
    start_server,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stigmer.paths import Paths  # noqa: E402
from stigmer.server.token import read_token  # noqa: E402

MESSAGE = "Say hello in one short sentence."
RSS_LIMIT_MB = 120.0


def first_token_endpoint(root: str, token: str) -> float:
    body = {"model": "agent/default", "messages": [{"role": "user", "content": MESSAGE}], "stream": True}
    t0 = time.perf_counter()
    first = 0.0
    with httpx.stream(
        "POST",
        root + "/v1/chat/completions",
        json=body,
        timeout=120,
        headers={"Authorization": f"Bearer {token}"},
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not first and line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if any(c["delta"].get("content") for c in chunk.get("choices") or []):
                    first = time.perf_counter() - t0
    return first


def first_token_execution(root: str, token: str) -> float:
    auth = {"Authorization": f"Bearer {token}"}
    t0 = time.perf_counter()
    rec = httpx.post(root + "/v1/executions", json={"message": MESSAGE}, headers=auth, timeout=60).json()
    first = 0.0
    with httpx.stream("GET", root + f"/v1/executions/{rec['id']}/events", headers=auth, timeout=120) as r:
        event = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "delta" and not first:
                if json.loads(line[6:]).get("text"):
                    first = time.perf_counter() - t0
            elif line.startswith("data: ") and event in ("completed", "failed", "cancelled"):
                break
    return first


async def load(root: str, token: str, clients: int, seconds: float) -> dict[str, Any]:
    body = {
        "model": "local", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 8,
        "temperature": 0,
    }  # fmt: skip
    done, lost, refused = 0, [], 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(
        timeout=300, limits=limits, headers={"Authorization": f"Bearer {token}"}
    ) as http:

        async def one_client() -> None:
            nonlocal done, refused
            while time.monotonic() < deadline:
                try:
                    async with http.stream("POST", root + "/v1/chat/completions", json=body) as r:
                        if r.status_code == 429:
                            refused += 1
                            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                            continue
                        ended = False
                        async for line in r.aiter_lines():
                            ended = ended or line == "data: [DONE]"
                        if r.status_code != 200 or not ended:
                            lost.append(f"HTTP {r.status_code}, ended={ended}")
                        else:
                            done += 1
                except httpx.HTTPError as e:
                    lost.append(repr(e))

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return {"done": done, "lost": lost, "refused": refused}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    interrupt_on_sigterm()
    machine_line()
    watch = CpuWatch()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-"))
    env: dict[str, str] | None = None
    try:
        env = server_env(tmp, ctx=2048)
        start_server(env)
        root = f"http://127.0.0.1:{env['STIGMER_SERVER_PORT']}"
        token = read_token(Paths(Path(env["STIGMER_HOME"]))) or ""
        first_token_endpoint(root, token), first_token_execution(root, token)  # warm-up
        ep, ex = [], []
        for _ in range(args.repeat):
            ep.append(first_token_endpoint(root, token))
            ex.append(first_token_execution(root, token))
        e_ms, x_ms = statistics.median(ep) * 1000, statistics.median(ex) * 1000
        print(
            f"(a) first token, agent/default: endpoint {e_ms:.0f} ms | execution stream (what stigmer run "
            f"waits for) {x_ms:.0f} ms | added {e_ms - x_ms:+.0f} ms ({e_ms / x_ms:.2f}x); medians of {args.repeat}"
        )

        api_pid = server_pids(env)["server"]
        peak = [0.0]
        stop = threading.Event()

        def sample() -> None:
            proc = psutil.Process(api_pid)
            while not stop.wait(0.5):
                peak[0] = max(peak[0], proc.memory_info().rss / 1e6)

        sampler = threading.Thread(target=sample, daemon=True)
        idle = psutil.Process(api_pid).memory_info().rss / 1e6
        sampler.start()
        got = asyncio.run(load(root, token, args.clients, args.seconds))
        stop.set()
        sampler.join()
        verdict = "met" if not got["lost"] and peak[0] < RSS_LIMIT_MB else "NOT met"
        print(
            f"(b) {args.clients} streaming clients for {args.seconds:.0f} s: {got['done']} requests completed, "
            f"{len(got['lost'])} lost, {got['refused']} refused (429); API RSS {idle:.0f} MB idle, peak "
            f"{peak[0]:.0f} MB (limit {RSS_LIMIT_MB:.0f}): {verdict}"
        )
        for why in got["lost"][:5]:
            print("    lost:", why)
    finally:
        clean_up(tmp, env, watch)


if __name__ == "__main__":
    main()

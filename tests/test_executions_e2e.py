"""Agents as durable executions, end to end: the real CLI, the real Temporal dev server, the real worker,
the built-in engine on the starter model (or a remote-API stand-in where a test needs an LLM that
misbehaves on cue). Kills are real SIGKILLs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from stigmer.paths import Paths
from tests.conftest import run_cli, stigmer_exe
from tests.doubles.archives import free_port
from tests.doubles.fake_llm_apis import FakeAnthropic, FakeOpenAI
from tests.executions import record, wait_until

pytestmark = pytest.mark.usefixtures("stop_server")

LONG = "name: long\ninstructions: You write long, detailed stories.\ntemperature: 0\nmax_tokens: 300\n"
SHORT = "name: short\ninstructions: Answer in a few words.\ntemperature: 0\nmax_tokens: 8\n"


def _finished(exec_id: str, env: dict[str, str] | None = None) -> dict[str, Any] | None:
    rec = record(exec_id, env)
    return rec if rec["state"] in ("COMPLETED", "FAILED", "CANCELLED") else None


def _apply(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> None:
    f = tmp_path / f"agent-{abs(hash(text))}.yaml"
    f.write_text(text)
    r = run_cli("agent", "apply", "-f", str(f), env=env, timeout=180)
    assert r.returncode == 0, r.stderr


def _streamed(out: str) -> str:
    """The text the CLI streamed after its last `🤖 Agent: ` (what a retry starts over with)."""
    return out.rsplit("🤖 Agent: ", 1)[1].split("\n✅", 1)[0].split("\n❌", 1)[0]


@pytest.fixture
def engine_env(isolated_home: Paths) -> dict[str, str]:
    return {
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "2048",
        "STIGMER_RUNNER_HEARTBEAT_TIMEOUT": "3",
    }


@pytest.fixture
def engine(engine_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in engine_env.items():
        monkeypatch.setenv(k, v)
    r = run_cli("server", timeout=240)
    assert r.returncode == 0, r.stderr
    return engine_env


def test_run_streams_an_answer_and_records_it(isolated_home: Paths, engine: dict[str, str]) -> None:
    r = run_cli("run", "-m", "Say hello", timeout=180)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.index("⏳ Execution pending...") < out.index("▶️ Execution started") < out.index("🤖 Agent: ")
    assert "✅ Execution completed" in out
    for line in (
        "Duration: ",
        "Model: smollm2:135m (llamacpp)",
        "Tokens: ",
        "Attempts: 1",
        "Total messages: ",
    ):
        assert line in out, line
    streamed = _streamed(out)
    assert streamed.strip()
    listing = run_cli("execution", "list", "--json")
    latest = json.loads(listing.stdout)[0]
    rec = record(latest["id"])
    assert rec["state"] == "COMPLETED" and rec["agent"] == "default" and rec["model"] == "smollm2:135m"
    assistant = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
    assert assistant == [streamed]  # what was stored is exactly what was streamed
    assert [m["role"] for m in rec["messages"]][:2] == ["system", "user"] and rec["messages"][1][
        "content"
    ] == "Say hello"
    assert rec["usage"]["output_tokens"] > 0 and rec["duration"] > 0
    # the execution shows in Temporal as a workflow with its model call as an activity
    from stigmer.server.specs import temporal_binary

    show = subprocess.run(
        [temporal_binary(isolated_home), "workflow", "show", "--workflow-id", rec["id"], "--output", "json",
         "--address", os.environ["STIGMER_TEMPORAL_ADDRESS"]],
        capture_output=True, text=True,
    )  # fmt: skip
    # The model request is an activity of its own; `prepare` a local activity, recorded as a marker.
    history = json.loads(show.stdout)["events"]
    scheduled = [
        e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for e in history
        if "activityTaskScheduledEventAttributes" in e
    ]
    markers = [
        e["markerRecordedEventAttributes"]["markerName"]
        for e in history
        if "markerRecordedEventAttributes" in e
    ]
    assert scheduled == ["agent__stigmer__model_request_stream"]
    assert markers.count("core_local_activity") == 1


def test_agents_from_files(isolated_home: Paths, engine: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: poet\ninstructions: You write short poems.\ntemperature: hot\n")
    r = run_cli("agent", "apply", "-f", str(bad))
    assert r.returncode == 2 and "bad.yaml:3" in r.stderr and "temperature" in r.stderr
    bad.write_text("instructions: no name\n")
    r = run_cli("agent", "apply", "-f", str(bad))
    assert r.returncode == 2 and "'name'" in r.stderr
    _apply(tmp_path, "name: poet\ninstructions: You write short poems.\ntemperature: 0.7\nmax_tokens: 40\n")
    listing = run_cli("agent", "list").stdout
    assert "poet" in listing and "default" in listing
    got = json.loads(run_cli("agent", "get", "poet", "--json").stdout)
    assert got == {
        "name": "poet",
        "instructions": "You write short poems.",
        "temperature": 0.7,
        "max_tokens": 40,
    }
    r = run_cli("run", "poet", "-m", "The sea", timeout=180)
    assert r.returncode == 0, r.stderr
    rec = json.loads(run_cli("execution", "list", "--json", "--agent", "poet").stdout)[0]
    full = record(rec["id"])
    assert full["messages"][0] == {"role": "system", "content": "You write short poems."}
    unknown = run_cli("run", "nobody", "-m", "hi")
    assert (
        unknown.returncode == 6
        and "No agent named 'nobody'" in unknown.stderr
        and "stigmer agent list" in unknown.stderr
    )
    assert run_cli("agent", "rm", "poet").returncode == 0
    assert "poet" not in run_cli("agent", "list").stdout
    assert run_cli("agent", "rm", "default").returncode == 10  # built in


def test_json_detach_and_stdin(isolated_home: Paths, engine: dict[str, str], tmp_path: Path) -> None:
    _apply(tmp_path, SHORT)
    r = run_cli("run", "short", "--detach", "-m", "hi")
    assert r.returncode == 0 and r.stdout.strip().startswith("ex-")
    exec_id = r.stdout.strip()
    assert wait_until(lambda: _finished(exec_id), 120)["state"] == "COMPLETED"
    proc = subprocess.run(
        [*stigmer_exe(), "run", "short", "--json"],
        input="from stdin",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)  # nothing but the record on stdout
    assert rec["state"] == "COMPLETED" and rec["message"] == "from stdin"
    logs = run_cli("execution", "logs", exec_id)
    assert "✅ Execution completed" in logs.stdout


def test_ctrl_c_cancels_the_execution(isolated_home: Paths, engine: dict[str, str], tmp_path: Path) -> None:
    _apply(tmp_path, LONG)
    proc = subprocess.Popen(
        [*stigmer_exe(), "run", "long", "-m", "Tell me a very long story about the sea."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = ""
        while "🤖 Agent: " not in seen:
            seen += proc.stdout.read(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Cancelling execution" in err and "Execution cancelled" in out
    rec = json.loads(run_cli("execution", "list", "--json").stdout)[0]
    assert rec["state"] == "CANCELLED"


def test_killed_worker_mid_answer_completes_without_duplicated_text(
    isolated_home: Paths, engine: dict[str, str], tmp_path: Path
) -> None:
    _apply(tmp_path, LONG)
    proc = subprocess.Popen(
        [*stigmer_exe(), "run", "long", "-m", "Tell me a long story about a lighthouse."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = ""
        while seen.count(" ") < 10:  # some words are out
            seen += proc.stdout.read(1)
        status = json.loads(run_cli("server", "status", "--json").stdout)
        os.kill(status["services"]["agent-runner"]["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    out = seen + out
    assert proc.returncode == 0, err
    assert "retried (attempt 2)" in out
    rec = json.loads(run_cli("execution", "list", "--json").stdout)[0]
    full = record(rec["id"])
    assert full["state"] == "COMPLETED" and full["attempts"] == 2
    final = [m["content"] for m in full["messages"] if m["role"] == "assistant"]
    assert final == [_streamed(out)]  # the retried answer, once: the partial first attempt is not in it


def test_unreachable_llm_fails_naming_the_endpoint(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = free_port()
    for k, v in {
        "STIGMER_LLM_PROVIDER": "openai-compatible",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{dead}/v1",
        "STIGMER_LLM_MODEL": "some-model",
    }.items():
        monkeypatch.setenv(k, v)
    r = run_cli("run", "-m", "hello", timeout=240)
    assert r.returncode == 12, r.stdout + r.stderr
    assert (
        "❌ Execution failed" in r.stdout and f"127.0.0.1:{dead}" in r.stdout and "after retries" in r.stdout
    )
    rec = json.loads(run_cli("execution", "list", "--json").stdout)[0]
    assert rec["state"] == "FAILED" and rec["attempts"] >= 2


def test_remote_providers_run_agents(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI(key="sk-x") as api:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", api.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
        r = run_cli("run", "-m", "ping pong", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "🤖 Agent: echo: ping pong" in r.stdout and "Model: gpt-4o-mini (openai)" in r.stdout
        assert api.requests[-1]["stream"] is True
        worker = json.loads(run_cli("server", "status", "--json").stdout)["services"]["agent-runner"]["pid"]
        # The worker has the key (the run reached the stand-in with it), through a pipe: not in its environ.
        assert "OPENAI_API_KEY" not in psutil.Process(worker).environ()
        run_cli("server", "stop")
    with FakeAnthropic(key="sk-a") as api:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "anthropic")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", api.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-a")
        r = run_cli("run", "-m", "hi there", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "🤖 Agent: echo: hi there" in r.stdout


def test_twenty_at_once_and_a_restart_mid_way(
    isolated_home: Paths, engine: dict[str, str], tmp_path: Path
) -> None:
    _apply(tmp_path, SHORT)
    ids = [run_cli("run", "short", "--detach", "-m", f"number {i}").stdout.strip() for i in range(20)]
    assert all(i.startswith("ex-") for i in ids)
    restart = run_cli("server", "restart", timeout=240)
    assert restart.returncode == 0, restart.stderr
    for exec_id in ids:
        rec = wait_until(lambda exec_id=exec_id: _finished(exec_id), 240)
        assert rec["state"] == "COMPLETED", rec


def _pollers(isolated_home: Paths) -> set[str]:
    """The identities polling the runner's task queue, as Temporal sees them."""
    from stigmer.executions.contract import TASK_QUEUE
    from stigmer.server.specs import temporal_binary

    r = subprocess.run(
        [temporal_binary(isolated_home), "task-queue", "describe", "--task-queue", TASK_QUEUE, "--output",
         "json", "--address", os.environ["STIGMER_TEMPORAL_ADDRESS"]],
        capture_output=True, text=True,
    )  # fmt: skip
    return set(re.findall(r'"identity":\s*"([^"]+)"', r.stdout))


def _other_machine(isolated_home: Paths, tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A second machine's worker: its own home, the shared Temporal, the server's API by URL, with the
    server's worker token and payload key (never the admin API token)."""
    return {
        **{k: v for k, v in os.environ.items() if k != "STIGMER_API_TOKEN"},
        "STIGMER_HOME": str(tmp_path / "machine-2"),
        "STIGMER_TEMPORAL_MANAGED": "false",
        "STIGMER_API_URL": f"http://127.0.0.1:{os.environ['STIGMER_SERVER_PORT']}",
        "STIGMER_WORKER_TOKEN": (isolated_home.home / "worker.token").read_text().strip(),
        "STIGMER_PAYLOAD_KEY": (isolated_home.home / "payload.key").read_text().strip(),
        "STIGMER_RUNNER_API_PATIENCE": "3",
        **overrides,
    }


def test_two_workers_share_the_queue(isolated_home: Paths, engine: dict[str, str], tmp_path: Path) -> None:
    _apply(tmp_path, SHORT)
    before = wait_until(lambda: _pollers(isolated_home), 30)
    second = subprocess.Popen(
        [*stigmer_exe(), "worker"], env=_other_machine(isolated_home, tmp_path), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(lambda: len(_pollers(isolated_home) - before) >= 1, 60)  # the second worker polls
        ids = [run_cli("run", "short", "--detach", "-m", f"task {i}").stdout.strip() for i in range(12)]
        records = [wait_until(lambda i=i: _finished(i), 180) for i in ids]
        assert all(r["state"] == "COMPLETED" for r in records)
        workers = {r["worker"] for r in records}
        assert len(workers) == 2 and f":{second.pid}" in " ".join(workers)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)


def test_a_misconfigured_worker_refuses_to_start(
    isolated_home: Paths, engine: dict[str, str], tmp_path: Path
) -> None:
    """A wrong token, a wrong key or a wrong address: the worker says which and exits, taking no work."""
    cases = [
        ({"STIGMER_WORKER_TOKEN": "not-the-token"}, "refused this worker's token", 11),
        ({"STIGMER_PAYLOAD_KEY": "A" * 43 + "="}, "payload key is not the one", 3),
        ({"STIGMER_API_URL": f"http://127.0.0.1:{free_port()}"}, "cannot be reached", 8),
        ({"STIGMER_WORKER_TOKEN": "", "STIGMER_API_TOKEN": (isolated_home.home / "api.token").read_text()},
         "refused this worker's token", 11),  # the admin token is not a worker's
    ]  # fmt: skip
    for overrides, said, code in cases:
        r = subprocess.run(
            [*stigmer_exe(), "worker"], env=_other_machine(isolated_home, tmp_path, **overrides),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == code, (overrides, r.stderr[-800:])
        assert said in r.stderr, r.stderr[-800:]
        assert "Traceback" not in r.stderr


def test_slow_model_keeps_heartbeating(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOpenAI(key="sk-x", delay=0.5) as api:
        api.script.append({"content": " ".join(["word"] * 14)})  # ~7 s of streaming, heartbeat timeout 3 s
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", api.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
        monkeypatch.setenv("STIGMER_RUNNER_HEARTBEAT_TIMEOUT", "3")
        r = run_cli("run", "-m", "slowly", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Attempts: 1" in r.stdout and "retried" not in r.stdout

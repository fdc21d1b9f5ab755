"""A worker killed (-9) in the middle of a shell call, for real: the command dies with it (its whole tree,
a `setsid` child included), Temporal runs the call again on the restarted worker, and the stream and the
record say that an earlier attempt may have run partly. The side effect happens at most once in full."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import wait_until

pytestmark = pytest.mark.usefixtures("stop_server")


@pytest.fixture
def api(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(key="sk-retry") as fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-retry")
        monkeypatch.setenv("STIGMER_RUNNER_HEARTBEAT_TIMEOUT", "3")
        yield fake


def test_a_shell_call_of_a_killed_worker_dies_with_it_and_the_retry_says_so(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path
) -> None:
    r = run_cli("server", timeout=240)
    assert r.returncode == 0, r.stderr
    agent = tmp_path / "ops.yaml"
    agent.write_text(
        "name: ops\ninstructions: You run commands.\ntools:\n  - shell:\n      approval: never\n      timeout: 60\n"
    )
    assert run_cli("agent", "apply", "-f", str(agent)).returncode == 0
    # start, a detached child that would outlive a plain process-group kill, then done
    script = (
        "echo start >> log.txt; setsid sh -c 'echo $$ > child.pid; sleep 120' & sleep 4; echo done >> log.txt"
    )
    api.script += [
        {"tool_calls": [{"name": "run_command", "arguments": {"argv": ["sh", "-c", script]}}]},
        {"content": "Ran it."},
    ]
    exec_id = run_cli("run", "ops", "--detach", "-m", "Run the script").stdout.strip()
    workspace = isolated_home.data_dir / "workspace" / "ops"
    child_pid = int(
        wait_until(
            lambda: (workspace / "child.pid").exists() and (workspace / "child.pid").read_text().strip()
        )
    )
    from stigmer.services.manager import Services

    worker = Services(isolated_home).record("agent-runner")
    assert worker is not None
    os.kill(worker.pid, signal.SIGKILL)
    # the command and its setsid child die with the worker, not 120 s later
    wait_until(
        lambda: (
            not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
        ),
        20,
    )
    rec = wait_until(lambda: (r := json.loads(run_cli("execution", "get", exec_id, "--json").stdout))["state"]
                in ("COMPLETED", "FAILED") and r, 180)  # fmt: skip
    assert rec["state"] == "COMPLETED", rec
    log = (workspace / "log.txt").read_text().split()
    assert log == ["start", "start", "done"]  # the first run was cut off; only the retry finished
    tool = next(m for m in rec["messages"] if m["role"] == "tool")
    assert "may have run partly" in tool["content"]  # the record (and the model) are told
    assert rec["tool_calls"] == 2  # both attempts count (limits count retried attempts too)
    stream = run_cli("execution", "logs", exec_id).stdout
    assert "may have run partly" in stream

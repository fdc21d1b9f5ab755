"""Agents that act, end to end: a scripted model (an OpenAI-compatible stand-in that answers with tool
calls; the starter model cannot call tools) driving the real worker, the real Temporal dev server and
real tools: workspace files, a shell, an MCP server over stdio written with the official SDK, approvals
answered from the CLI, a worker killed between two tool calls."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import in_state, record, tool_call, wait_until

pytestmark = pytest.mark.usefixtures("stop_server")

MCP_SERVER = Path(__file__).parent / "doubles" / "mcp_notes_server.py"


def _tool_messages(api: FakeOpenAI) -> list[str]:
    """What the model was told by tools, in the order it was told (from the requests it received)."""
    seen: list[str] = []
    for body in api.requests:
        for m in body.get("messages") or []:
            if m.get("role") == "tool" and m.get("content") not in seen:
                seen.append(m["content"])
    return seen


def _running_in(folder: Path, argv: list[str]) -> bool:
    """Whether a process whose command line ends with argv runs in folder: this test's own command, not
    one of the other tests that pytest-xdist runs at the same time (nor of anything else on the machine)."""
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if (p.info["cmdline"] or [])[-len(argv) :] == argv and p.info["cwd"]:
            if Path(p.info["cwd"]).resolve() == folder.resolve():
                return True
    return False


@pytest.fixture
def api(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(key="sk-tools") as fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-tools")
        monkeypatch.setenv("STIGMER_RUNNER_HEARTBEAT_TIMEOUT", "3")
        yield fake


def _apply(tmp_path: Path, text: str) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text(text)
    r = run_cli("agent", "apply", "-f", str(f), timeout=240)
    assert r.returncode == 0, r.stderr


def test_workspace_tools_are_called_shown_and_confined(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path
) -> None:
    _apply(tmp_path, "name: scribe\ninstructions: You keep notes.\ntools:\n  - workspace\n")
    api.script += [
        tool_call("write_file", path="notes/today.txt", content="buy milk"),
        tool_call("read_file", path="notes/today.txt"),
        tool_call("write_file", path="../outside.txt", content="nope"),
        tool_call("read_file", path="/etc/passwd"),
        {"content": "All done."},
    ]
    r = run_cli("run", "scribe", "-m", "Take a note", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert '🔧 Tool: write_file({"path": "notes/today.txt", "content": "buy milk"})' in out
    assert "🔧 Tool: read_file" in out and "Tool calls: 4" in out and "🤖 Agent: All done." in out
    workspace = isolated_home.data_dir / "workspace" / "scribe"
    assert (workspace / "notes" / "today.txt").read_text() == "buy milk"
    assert not (isolated_home.data_dir / "workspace" / "outside.txt").exists()
    told = _tool_messages(api)
    assert "buy milk" in told[1]  # the file's content came back to the model
    assert "escapes the workspace" in told[2] and "escapes the workspace" in told[3]
    rec = record(json.loads(run_cli("execution", "list", "--json").stdout)[0]["id"])
    assert rec["tool_calls"] == 4 and [m["role"] for m in rec["messages"]].count("tool") == 4


def test_shell_needs_approval_and_keeps_secrets(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STIGMER_LLM_API_KEY", "sk-tools")  # the worker needs it; the tool must not see it
    monkeypatch.setenv("STIGMER_CLOUD_TOKEN", "cloud-secret")
    _apply(tmp_path, "name: ops\ninstructions: You run commands.\ntools:\n  - shell\n")  # approval by default
    api.script += [tool_call("run_command", argv=["env"]), {"content": "Looked at the environment."}]
    exec_id = run_cli("run", "ops", "--detach", "-m", "Show the environment").stdout.strip()
    rec = wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL"))
    assert rec["approvals"][0]["tool"] == "run_command" and rec["approvals"][0]["args"] == {"argv": ["env"]}
    logs = run_cli("execution", "get", exec_id).stdout
    assert "waiting for approval: run_command" in logs
    # the server restarts while the execution waits: nothing is lost
    assert run_cli("server", "restart", timeout=240).returncode == 0
    assert record(exec_id)["state"] == "WAITING_APPROVAL"
    ok = run_cli("execution", "approve", exec_id)
    assert ok.returncode == 0 and "Approved: run_command" in ok.stdout
    done = wait_until(lambda: in_state(exec_id, "COMPLETED", "FAILED"), 120)
    assert done["state"] == "COMPLETED"
    env_output = _tool_messages(api)[0]
    assert "PATH=" in env_output
    for secret in ("sk-tools", "cloud-secret", "STIGMER_API_TOKEN", "OPENAI_API_KEY"):
        assert secret not in env_output, secret


def test_deny_is_told_to_the_agent_and_always_sticks(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path
) -> None:
    _apply(tmp_path, "name: ops\ninstructions: You run commands.\ntools:\n  - shell: {approval: required}\n")
    api.script += [tool_call("run_command", argv=["rm", "-rf", "x"]), {"content": "Fine, I did not."}]
    exec_id = run_cli("run", "ops", "--detach", "-m", "Delete x").stdout.strip()
    wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL"))
    assert run_cli("execution", "deny", exec_id).returncode == 0
    assert wait_until(lambda: in_state(exec_id, "COMPLETED"))["state"] == "COMPLETED"
    assert "denied" in _tool_messages(api)[0]
    api.requests.clear()
    api.script += [
        tool_call("run_command", argv=["echo", "one"]),
        tool_call("run_command", argv=["echo", "two"]),
        {"content": "Both ran."},
    ]
    exec_id = run_cli("run", "ops", "--detach", "-m", "Echo twice").stdout.strip()
    wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL"))
    assert run_cli("execution", "approve", exec_id, "--always").returncode == 0
    rec = wait_until(lambda: in_state(exec_id, "COMPLETED"), 120)
    told = _tool_messages(api)
    assert "one" in told[0] and "two" in told[1]  # the second call needed no second answer
    events = run_cli("execution", "logs", exec_id).stdout
    assert events.count("Waiting for approval") == 1 and rec["tool_calls"] == 2


def test_mcp_server_tools(isolated_home: Paths, api: FakeOpenAI, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    notes = tmp_path / "notes" / "notes.txt"
    _apply(
        tmp_path,
        "name: notetaker\ninstructions: You use the notes server.\nmcp_servers:\n"
        f"  - name: notes\n    command: [{sys.executable}, {MCP_SERVER}, {notes}]\n"
        f"    sandbox: {{paths: {{rw: [{notes.parent}]}}}}\n",  # its notes file is outside its sandbox otherwise
    )
    api.script += [tool_call("notes_add_note", text="remember the milk"), {"content": "Noted."}]
    r = run_cli("run", "notetaker", "-m", "Remember the milk", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "🔧 Tool: notes_add_note" in r.stdout
    assert notes.read_text() == "remember the milk\n"
    assert "1 notes" in _tool_messages(api)[0]  # the server's answer reached the model
    tools_offered = {t["function"]["name"] for t in api.requests[0].get("tools") or []}
    assert {"notes_add_note", "notes_count_notes"} <= tools_offered
    servers = [  # this test's server (its notes file): pytest-xdist may run another test's meanwhile
        p
        for p in psutil.process_iter(["cmdline"])
        if {str(MCP_SERVER), str(notes)} <= set(p.info["cmdline"] or [])
    ]
    assert servers, "the MCP server runs while the worker does"
    run_cli("server", "stop")
    for p in servers:
        wait_until(lambda p=p: not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, 30)


def test_killed_worker_never_repeats_a_finished_tool_call(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path
) -> None:
    _apply(tmp_path, "name: worker\ninstructions: x\ntools:\n  - shell: {approval: never, timeout: 60}\n")
    api.script += [
        tool_call("run_command", argv=["sh", "-c", "echo ran >> count.txt"]),
        tool_call("run_command", argv=["sleep", "6"]),
        {"content": "Finished."},
    ]
    exec_id = run_cli("run", "worker", "--detach", "-m", "go").stdout.strip()
    workspace = isolated_home.data_dir / "workspace" / "worker"
    wait_until(lambda: (workspace / "count.txt").exists())
    wait_until(lambda: _running_in(workspace, ["sleep", "6"]), 30)  # the second call has started
    status = json.loads(run_cli("server", "status", "--json").stdout)
    os.kill(status["services"]["agent-runner"]["pid"], signal.SIGKILL)
    rec = wait_until(lambda: in_state(exec_id, "COMPLETED", "FAILED"), 180)
    assert rec["state"] == "COMPLETED", rec
    assert (workspace / "count.txt").read_text() == "ran\n"  # the first call ran once

"""A hostile agent on the real server (the real worker, Temporal dev server and API; a scripted model
stand-in): its shell commands try what hostile testing did, every attempt fails, the allowed work is
done, and the policy each call ran under is on the record, in the stream and in Temporal's activity
summaries."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer.paths import Paths
from stigmer.sandbox import linux
from stigmer.services import record as records
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import tool_call

pytestmark = [
    pytest.mark.usefixtures("stop_server"),
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or linux.landlock_abi() < 4,
        reason="needs Linux with Landlock ABI 4 or later (this machine's kernel has 7)",
    ),
]


@pytest.fixture
def api(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(key="sk-sandbox-e2e") as fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("STIGMER_LLM_API_KEY", "sk-sandbox-e2e")
        yield fake


def _told(api: FakeOpenAI) -> list[str]:
    seen: list[str] = []
    for body in api.requests:
        for m in body.get("messages") or []:
            if m.get("role") == "tool" and m.get("content") not in seen:
                seen.append(m["content"])
    return seen


def test_a_hostile_agents_commands_fail_and_the_policy_is_on_the_record(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path
) -> None:
    home = Path(os.environ["HOME"])
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE-KEY")
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        "name: hostile\ninstructions: You run commands.\n"
        "tools:\n  - shell: {approval: never, allow_shell_string: true}\n"
    )
    r = run_cli("agent", "apply", "-f", str(agent), timeout=240)  # starts the server
    assert r.returncode == 0, r.stderr
    runner = records.read(isolated_home.pid_file("agent-runner"))
    assert runner is not None
    port = os.environ["STIGMER_SERVER_PORT"]
    outside = tmp_path / "escaped.txt"
    api.script += [
        tool_call("run_command", argv=f"cat {isolated_home.home}/api.token"),
        tool_call("run_command", argv=f"cat /proc/{runner.pid}/environ | tr '\\0' '\\n' | grep -c KEY"),
        tool_call("run_command", argv=f"cat {home}/.ssh/id_rsa"),
        tool_call("run_command", argv=f"echo x > {outside}"),
        tool_call(
            "run_command",
            argv=f"curl -s -m 5 http://127.0.0.1:{port}/health || python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}))\"",
        ),
        tool_call("run_command", argv="echo fine > kept.txt && cat kept.txt"),
        {"content": "Done."},
    ]
    run = run_cli("run", "hostile", "-m", "Try everything", timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    told = _told(api)
    assert len(told) == 6, told
    token = (isolated_home.home / "api.token").read_text().strip()
    for message in told[:5]:
        assert token not in message and "PRIVATE-KEY" not in message and "sk-sandbox-e2e" not in message
    assert (
        "Permission denied" in told[0] and "Permission denied" in told[1] and "Permission denied" in told[2]
    )
    assert "Permission denied" in told[3] and not outside.exists()
    assert "exit code 0" not in told[4] and "ok" not in told[4].lower().split(), told[4]
    assert "exit code 0" in told[5] and "fine" in told[5]
    # the stream (stigmer run's output) shows what each call could do
    assert (
        run.stdout.count("sandbox: shell: [landlock ") == 6
        and "no network" in run.stdout
        and "landlock" in run.stdout
    )
    # the record: the stored events, as `stigmer execution logs` replays them
    listed = json.loads(run_cli("execution", "list", "--json").stdout)
    rows = listed["executions"] if isinstance(listed, dict) else listed
    logs = run_cli("execution", "logs", rows[0]["id"]).stdout
    assert logs.count("sandbox: shell: [landlock ") == 6 and "] no network; rw " in logs, logs
    # Temporal's history (and its UI): each tool call's activity is summarized with its policy
    summaries = asyncio.run(_activity_summaries(isolated_home))
    shell = [s for s in summaries if s.startswith("call tool: run_command [shell: [landlock ")]
    assert len(shell) == 6 and all("no network" in s and "landlock" in s for s in shell), summaries


async def _activity_summaries(paths: Paths) -> list[str]:
    """Every activity summary in the agent executions' Temporal histories, decoded."""
    from stigmer.config import store
    from stigmer.server.temporal_client import connect

    client = await connect(store.load(paths), paths)
    summaries: list[str] = []
    async for wf in client.list_workflows('WorkflowType="stigmer.AgentExecution"'):
        handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
        async for event in handle.fetch_history_events():
            if event.HasField("user_metadata") and event.user_metadata.HasField("summary"):
                summaries.append(
                    str((await client.data_converter.decode([event.user_metadata.summary], [str]))[0])
                )
    return summaries

"""Temporal is no back door (issue 13), each attack tried for real against the running server: the real
Temporal dev server, the real worker and API, a scripted OpenAI-compatible model (FakeOpenAI) that asks
for tools, and the `temporal` CLI as the attacker's tool. The legitimate paths are checked beside them."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from stigmer.paths import Paths
from stigmer.server.api.temporal_ui import BROWSER_BLOCKED_PORTS, COOKIE
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import in_state, record, tool_call, wait_until

pytestmark = pytest.mark.usefixtures("stop_server")

SECRET_PROMPT = "the launch code is marmalade-7741"


def _temporal(paths: Paths, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The attacker's tool: the `temporal` CLI, talking to the managed dev server's gRPC port."""
    from stigmer.server.specs import temporal_binary

    return subprocess.run(
        [temporal_binary(paths), *args, "--address", os.environ["STIGMER_TEMPORAL_ADDRESS"]],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _workflow_status(paths: Paths, workflow_id: str, run_id: str | None = None) -> str:
    args = ["workflow", "describe", "-w", workflow_id, "--output", "json"]
    r = _temporal(paths, *args, *(["-r", run_id] if run_id else []))
    info = json.loads(r.stdout)["workflowExecutionInfo"]
    return str(info["status"])


def _request(
    port: int, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def api(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(key="sk-closed") as fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-closed")
        yield fake


@pytest.fixture
def server(isolated_home: Paths, api: FakeOpenAI, tmp_path: Path) -> FakeOpenAI:
    r = run_cli("server", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    f = tmp_path / "ops.yaml"
    f.write_text("name: ops\ninstructions: You run commands.\ntools:\n  - shell\n")  # approval by default
    r = run_cli("agent", "apply", "-f", str(f))
    assert r.returncode == 0, r.stderr
    return api


def _workspace(paths: Paths) -> Path:
    return paths.data_dir / "workspace" / "ops"


def test_workflows_started_through_temporal_run_nothing(
    isolated_home: Paths, server: FakeOpenAI, tmp_path: Path
) -> None:
    """The reported attack and its variants: the old input shape with an MCP command; a real execution's
    id with a guessed ticket; a real execution's own encrypted input, replayed. Each fails, runs nothing
    and asks the model nothing; the real record stays as it was."""
    done = run_cli("run", "-m", "hello")
    assert done.returncode == 0, done.stderr
    real = json.loads(run_cli("execution", "list", "--json").stdout)[0]
    asked = len(server.requests)
    pwned = tmp_path / "pwned.txt"
    old_shape = {
        "execution_id": "x", "agent": "x", "instructions": "", "message": "hi", "tools": [],
        "mcp_servers": [{"name": "m", "command": ["sh", "-c", f"id > {pwned}"]}],
    }  # fmt: skip
    attempts = [
        ("attack-old-shape", old_shape),
        (real["id"], {"execution_id": real["id"], "ticket": "guessed"}),
        ("attack-other-id", {"execution_id": real["id"], "ticket": "guessed"}),
        ("attack-plain", {"execution_id": "attack-plain", "agent": "ops", "message": "run id", "tools": ["shell"]}),
    ]  # fmt: skip
    # The real execution's own input (encrypted: the attacker cannot read it, only copy it), replayed
    # under its id after it finished: the API knows that execution has ended.
    replayed = asyncio.run(_replay_input(isolated_home, real["id"]))
    assert wait_until(
        lambda: _workflow_status(isolated_home, real["id"], replayed) == "WORKFLOW_EXECUTION_STATUS_FAILED",
        60,
    )
    for workflow_id, payload in attempts:
        r = _temporal(
            isolated_home, "workflow", "start", "--type", "stigmer.AgentExecution", "--task-queue",
            "agent_execution_runner", "--workflow-id", workflow_id, "--input", json.dumps(payload),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    for workflow_id, _ in attempts:
        assert wait_until(
            lambda w=workflow_id: _workflow_status(isolated_home, w) == "WORKFLOW_EXECUTION_STATUS_FAILED", 60
        )

    assert not pwned.exists()
    assert len(server.requests) == asked  # the model was never asked
    after = record(real["id"])
    assert after["state"] == "COMPLETED" and after["output"] == real["output"]
    log = (isolated_home.logs_dir / "server.log").read_text()
    assert "not started by Stigmer's API" in log or "ticket is not this execution's" in log


async def _replay_input(paths: Paths, exec_id: str) -> str:
    """Start the workflow again with its recorded input payload, as raw bytes (no key needed)."""
    from temporalio.client import Client
    from temporalio.common import RawValue

    client = await Client.connect(os.environ["STIGMER_TEMPORAL_ADDRESS"])
    handle = client.get_workflow_handle(exec_id)
    async for event in handle.fetch_history_events():
        if event.HasField("workflow_execution_started_event_attributes"):
            payload = event.workflow_execution_started_event_attributes.input.payloads[0]
            break
    assert payload.metadata["encoding"] == b"binary/encrypted"
    started = await client.start_workflow(
        "stigmer.AgentExecution", RawValue(payload), id=exec_id, task_queue="agent_execution_runner"
    )
    return str(started.result_run_id)


def test_signals_cannot_approve_and_one_decision_per_call(isolated_home: Paths, server: FakeOpenAI) -> None:
    server.script += [tool_call("run_command", argv=["touch", "ran.txt"]), {"content": "Done."}]
    exec_id = run_cli("run", "ops", "--detach", "-m", "Make the file").stdout.strip()
    rec = wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL"))
    call_id = rec["approvals"][0]["call_id"]
    forged = json.dumps({"call_id": call_id, "tool": "run_command", "approve": True, "always": True})
    for name, payload in [("decide", forged), ("wake", forged), ("wake", None), ("approve", forged)]:
        args = ["workflow", "signal", "-w", exec_id, "--name", name]
        r = _temporal(isolated_home, *args, *(["--input", payload] if payload else []))
        assert r.returncode == 0, r.stderr
    time.sleep(2)  # what a forged approval would have needed to run the command (it takes ~0.1 s)
    rec = record(exec_id)
    assert rec["state"] == "WAITING_APPROVAL" and rec["approvals"][0]["call_id"] == call_id
    assert not (_workspace(isolated_home) / "ran.txt").exists()

    # Approve and deny at once, through the API: one wins, the other is refused naming it, and what ran,
    # the record and the stream agree.
    from stigmer.server import control

    client = control.api(isolated_home)
    answers: dict[str, Any] = {}

    def answer(verb: str) -> None:
        try:
            answers[verb] = client.post(f"/v1/executions/{exec_id}/{verb}", {"call_id": call_id})
        except Exception as e:  # noqa: BLE001 - the loser's error is what we check
            answers[verb] = e

    threads = [threading.Thread(target=answer, args=(v,)) for v in ("approve", "deny")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [v for v, a in answers.items() if isinstance(a, dict)]
    losers = [a for a in answers.values() if not isinstance(a, dict)]
    assert len(winners) == 1 and len(losers) == 1, answers
    assert getattr(losers[0], "code", None) is not None and losers[0].code.code == "conflict"
    assert "already answered" in losers[0].message
    final = wait_until(lambda: in_state(exec_id, "COMPLETED", "FAILED"))
    ran = (_workspace(isolated_home) / "ran.txt").exists()
    assert ran == (winners[0] == "approve")
    stream = run_cli("execution", "logs", exec_id).stdout
    assert ("run_command allowed" in stream) == ran and ("run_command denied" in stream) == (not ran)
    assert final["approvals"] == []
    # After the end, another answer is a conflict, never a 500.
    r = run_cli("execution", "approve", exec_id)
    assert r.returncode == 7 and "has ended" in r.stderr


def test_histories_are_encrypted_and_the_ui_decodes_them_only_when_signed_in(
    isolated_home: Paths, server: FakeOpenAI
) -> None:
    r = run_cli("run", "-m", f"Remember: {SECRET_PROMPT}")
    assert r.returncode == 0, r.stderr
    exec_id = json.loads(run_cli("execution", "list", "--json").stdout)[0]["id"]
    show = _temporal(isolated_home, "workflow", "show", "-w", exec_id, "--output", "json")
    assert show.returncode == 0, show.stderr
    assert "marmalade" not in show.stdout and "You run commands" not in show.stdout
    history = json.loads(show.stdout)["events"]
    started = next(e for e in history if "workflowExecutionStartedEventAttributes" in e)
    payload = started["workflowExecutionStartedEventAttributes"]["input"]["payloads"][0]
    assert base64.b64decode(payload["metadata"]["encoding"]) == b"binary/encrypted"
    completed = next(e for e in history if "workflowExecutionCompletedEventAttributes" in e)
    result = completed["workflowExecutionCompletedEventAttributes"]["result"]["payloads"][0]

    ui = int(os.environ["STIGMER_TEMPORAL_UI_PORT"])
    host = {"Host": f"127.0.0.1:{ui}"}
    decode = json.dumps({"payloads": [result]}).encode()
    # Not signed in: the UI, its API and the codec answer only "sign in".
    for method, path, body in [("GET", "/", None), ("GET", "/api/v1/namespaces/default/workflows", None),
                               ("POST", "/codec/decode", decode)]:  # fmt: skip
        status, _, text = _request(ui, method, path, headers={**host, "Accept": "text/html"}, body=body)
        assert status == 401 and b"marmalade" not in text, (path, status)
    # The one-time link from the CLI (printed on stdout; no browser without a display).
    r = run_cli("server", "temporal-ui", "--no-open", env={"DISPLAY": ""})
    assert r.returncode == 0, r.stderr
    link = r.stdout.strip()
    assert link.startswith(f"http://127.0.0.1:{ui}/_stigmer/signin?t=")
    path = link.split(str(ui), 1)[1]
    status, headers, _ = _request(ui, "GET", path, headers=host)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and cookie.startswith(COOKIE + "=")
    session = {**host, "Cookie": cookie.split(";")[0]}
    status, _, text = _request(ui, "GET", path, headers=host)
    assert status == 403 and b"stigmer server temporal-ui" in text  # used twice
    # Signed in: Temporal's own UI comes through, and the codec decodes.
    status, _, text = _request(ui, "GET", "/", headers=session)
    assert status == 200 and b"<html" in text.lower()
    status, _, text = _request(
        ui, "POST", "/codec/decode", headers={**session, "Content-Type": "application/json"}, body=decode
    )
    assert status == 200, text
    decoded = json.loads(text)["payloads"][0]
    assert "marmalade" in base64.b64decode(decoded["data"]).decode()
    # Another page on this machine (another port), even with the cookie: refused.
    status, _, _ = _request(
        ui, "POST", "/codec/decode", headers={**session, "Origin": "http://127.0.0.1:3000"}, body=decode
    )
    assert status == 403


def _listening_ports(paths: Paths) -> set[int]:
    """Every TCP port our services listen on (their processes and their children)."""
    from stigmer.services.manager import Services

    ports: set[int] = set()
    for name in ("temporal", "server", "agent-runner", "llm"):
        rec = Services(paths).record(name)
        if rec is None:
            continue
        proc = psutil.Process(rec.pid)
        for p in [proc, *proc.children(recursive=True)]:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    ports.add(c.laddr.port)
    return ports


def _foreign_host_answer(port: int) -> str:
    """What a page on evil.example (rebound to 127.0.0.1) gets from this port."""
    try:
        status, _, body = _request(
            port, "GET", "/api/v1/namespaces/default/workflows", headers={"Host": f"evil.example:{port}"}
        )
    except (http.client.HTTPException, OSError) as e:
        return f"no HTTP answer ({type(e).__name__})"  # gRPC (HTTP/2 only): no browser speaks it
    return f"HTTP {status}" if status >= 400 else f"HTTP {status}: {body[:100]!r}"


def test_no_port_answers_a_foreign_host(isolated_home: Paths, server: FakeOpenAI) -> None:
    ports = _listening_ports(isolated_home)
    assert (
        int(os.environ["STIGMER_SERVER_PORT"]) in ports
        and int(os.environ["STIGMER_TEMPORAL_UI_PORT"]) in ports
    )
    answered = {}
    for port in sorted(ports):
        if port in BROWSER_BLOCKED_PORTS:
            continue  # the UI's and the metrics' own listeners: no browser connects to these ports
        answered[port] = _foreign_host_answer(port)
    print("foreign Host answers:", answered)
    leaks = {p: a for p, a in answered.items() if a.startswith("HTTP 2") or a.startswith("HTTP 3")}
    assert not leaks, answered
    blocked = ports & set(BROWSER_BLOCKED_PORTS)
    assert len(blocked) == 2, ports  # the UI's and the metrics'; nothing else hides there
    # The legitimate way in: a signed-in session on the guarded UI port still works (above), and the API
    # answers its own Host.
    status, _, _ = _request(int(os.environ["STIGMER_SERVER_PORT"]), "GET", "/health")
    assert status == 200


def test_events_are_posted_only_by_the_execution_s_worker(isolated_home: Paths, server: FakeOpenAI) -> None:
    server.script += [tool_call("run_command", argv=["true"])]
    exec_id = run_cli("run", "ops", "--detach", "-m", "wait for me").stdout.strip()
    wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL"))
    admin = (isolated_home.home / "api.token").read_text().strip()
    worker = (isolated_home.home / "worker.token").read_text().strip()
    port = int(os.environ["STIGMER_SERVER_PORT"])
    forged = json.dumps(
        {"ticket": "guessed", "events": [{"type": "completed", "record": {"output": "fake"}}]}
    )

    def post(path: str, token: str, body: str = forged) -> int:
        status, _, _ = _request(port, "POST", path, body=body.encode(),
                                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
        return status

    assert post(f"/v1/executions/{exec_id}/events", admin) == 405  # the old door is gone
    assert post(f"/v1/runner/executions/{exec_id}/events", admin) == 401  # the admin token is not a worker's
    assert post(f"/v1/runner/executions/{exec_id}/events", worker) == 403  # a worker without the ticket
    assert post(f"/v1/runner/executions/{exec_id}/claim", worker) == 403
    assert post("/v1/executions", worker, json.dumps({"message": "hi"})) == 401  # a worker is not admin
    # Even with the execution's ticket, a worker cannot end it or decide for a person.
    from stigmer.server.db import Database

    ticket = Database(isolated_home.data_dir / "stigmer.db").get_execution(exec_id)["ticket"]  # type: ignore[index]
    for kind in ("completed", "failed", "cancelled", "pending", "approval"):
        body = json.dumps(
            {"ticket": ticket, "events": [{"type": kind, "record": {"output": "fake"}, "approved": True}]}
        )
        assert post(f"/v1/runner/executions/{exec_id}/events", worker, body) == 200
    rec = record(exec_id)
    assert rec["state"] == "WAITING_APPROVAL" and rec["approvals"]
    kinds = [json.loads(line)["kind"] for line in _stored_events(isolated_home, exec_id)]
    assert not {"completed", "failed", "cancelled", "approval"} & set(kinds), kinds
    # Cancel, then approve: 409 with the JSON error, and nothing left pending on the record.
    assert run_cli("execution", "cancel", exec_id).returncode == 0
    final = wait_until(lambda: in_state(exec_id, "CANCELLED"))
    assert final["approvals"] == []
    r = run_cli("execution", "approve", exec_id)
    assert r.returncode == 7 and "has ended (CANCELLED)" in r.stderr and "Traceback" not in r.stderr


def _stored_events(paths: Paths, exec_id: str) -> list[str]:
    from stigmer.server.db import Database

    db = Database(paths.data_dir / "stigmer.db")
    try:
        return [json.dumps({"kind": k}) for _, k, _ in db.events(exec_id)]
    finally:
        db.close()


def test_a_taken_temporal_ui_port_is_named_at_once(isolated_home: Paths, api: FakeOpenAI) -> None:
    """The UI's port is the API's too (its door): someone else on it is found before anything waits."""
    import socket

    port = int(os.environ["STIGMER_TEMPORAL_UI_PORT"])
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen(1)
    try:
        t0 = time.monotonic()
        r = run_cli("server", timeout=240)
        took = time.monotonic() - t0
    finally:
        holder.close()
    assert r.returncode == 8, r.stdout + r.stderr  # a service could not start, as for the API's own port
    assert f"Port {port} on 127.0.0.1 is held by another program" in r.stderr
    assert "Traceback" not in r.stderr and took < 30, took


def test_an_agent_that_names_its_model_runs_on_it(
    isolated_home: Paths, server: FakeOpenAI, tmp_path: Path
) -> None:
    """The claim carries the worker's default LLM; an agent with a model of its own gets that one, and the
    record and the `started` event say so."""
    f = tmp_path / "picky.yaml"
    f.write_text("name: picky\ninstructions: Be brief.\nmodel: gpt-4.1-mini\n")
    assert run_cli("agent", "apply", "-f", str(f)).returncode == 0
    r = run_cli("run", "picky", "-m", "hi")
    assert r.returncode == 0, r.stderr
    assert "gpt-4.1-mini" in r.stdout and server.requests[-1]["model"] == "gpt-4.1-mini"
    exec_id = json.loads(run_cli("execution", "list", "--json").stdout)[0]["id"]
    assert record(exec_id)["model"] == "gpt-4.1-mini"
    started = [
        line for line in run_cli("execution", "logs", exec_id).stdout.splitlines() if "started" in line
    ]
    assert started and "gpt-4.1-mini" in started[0]

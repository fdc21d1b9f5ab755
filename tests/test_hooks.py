"""Webhooks (issue 18): a POST signed with the hook's secret (GitHub's X-Hub-Signature-256) runs the agent
with the templated message; nothing else does. One real server for the module (tests/shared_server.py)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import pytest

from stigmer.server.triggers import fill, sign, signature_ok
from tests.conftest import run_cli
from tests.executions import in_state, wait_until
from tests.shared_server import Shared, same_home, shared_server

server = pytest.fixture(scope="module")(shared_server)
isolated_home = pytest.fixture(same_home)  # overrides conftest's: every test here uses the module's server


# -- pure parts -------------------------------------------------------------------------------------------
def test_template_fills_dotted_paths_and_names_missing_fields(server: Shared) -> None:
    body = {"number": 7, "action": "opened", "pull_request": {"title": "Fix it", "labels": [{"name": "bug"}]}}
    text, missing = fill(
        "PR {{number}}: {{ action }} {{pull_request.title}} {{pull_request.labels.0.name}}", body
    )
    assert text == "PR 7: opened Fix it bug" and missing == []
    text, missing = fill("{{number}} {{sender.login}}", body)
    assert text == "7 " and missing == ["sender.login"]


def test_signature_is_githubs(server: Shared) -> None:
    secret, body = "It's a Secret to Everybody", b"Hello, World!"
    # GitHub's documented example (docs.github.com: validating webhook deliveries)
    assert sign(secret, body) == "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert signature_ok(secret, body, sign(secret, body))
    assert not signature_ok(secret, body, None) and not signature_ok(secret, body, "sha256=00")
    assert not signature_ok(secret, body + b"x", sign(secret, body))


# -- through the real server --------------------------------------------------------------------------------
def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the test's own local server
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _add(name: str, *extra: str) -> dict[str, Any]:
    r = run_cli("hook", "add", name, "--agent", "default", *extra, "--json")
    assert r.returncode == 0, r.stderr
    made: dict[str, Any] = json.loads(r.stdout)
    return made


def test_signed_delivery_runs_the_agent_once(server: Shared) -> None:
    made = _add("gh", "--template", "PR {{number}}: {{pull_request.title}} by {{sender.login}}")
    url, secret = made["hook"]["url"], made["secret"]
    assert url == f"http://127.0.0.1:{os.environ['STIGMER_SERVER_PORT']}/hooks/gh"
    body = json.dumps({"number": 42, "pull_request": {"title": "Add schedules"}}).encode()
    headers = {"X-Hub-Signature-256": sign(secret, body), "X-GitHub-Delivery": "d-1",
               "Content-Type": "application/json"}  # fmt: skip
    status, answer = _post(url, body, headers)  # no bearer token
    assert status == 202, answer
    rec = wait_until(lambda: in_state(answer["execution_id"], "COMPLETED", "FAILED"), 120)
    assert rec["state"] == "COMPLETED", rec
    assert rec["message"] == "PR 42: Add schedules by " and rec["trigger"] == "hook gh"
    assert rec["warnings"] == ["Fields missing from the body, left empty: sender.login"]
    assert "echo: PR 42: Add schedules by" in rec["output"]
    # the same delivery again: the same execution, nothing run twice
    again_status, again = _post(url, body, headers)
    assert again_status == 202 and again["execution_id"] == answer["execution_id"] and again["repeat"]
    # the secret shows nowhere after it was made
    listed = run_cli("hook", "list", "--json")
    assert listed.returncode == 0 and secret not in listed.stdout and "gh" in listed.stdout
    logs = "".join(p.read_text(errors="replace") for p in server.paths.logs_dir.glob("*.log"))
    assert secret not in logs


def test_unsigned_wrong_and_large_bodies_are_refused(server: Shared) -> None:
    made = _add("plain")
    url, secret = made["hook"]["url"], made["secret"]
    body = b"deploy finished"
    assert _post(url, body, {})[0] == 401
    assert _post(url, body, {"X-Hub-Signature-256": sign("not-the-secret", body)})[0] == 401
    assert _post(url, body, {"X-Hub-Signature-256": "sha256=" + "0" * 64})[0] == 401
    # a hook that does not exist answers the same as a wrong signature
    assert _post(url.replace("/plain", "/nope"), body, {"X-Hub-Signature-256": sign(secret, body)})[0] == 401
    big = b"x" * (1024 * 1024 + 1)
    assert _post(url, big, {"X-Hub-Signature-256": sign(secret, big)})[0] == 413
    # the body as text when there is no template; rotate: the old secret stops working
    status, answer = _post(url, body, {"X-Hub-Signature-256": sign(secret, body)})
    assert status == 202
    rec = wait_until(lambda: in_state(answer["execution_id"], "COMPLETED", "FAILED"), 120)
    assert rec["message"] == "deploy finished" and rec["trigger"] == "hook plain"
    r = run_cli("hook", "rotate", "plain", "--json")
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)["secret"]
    assert _post(url, body, {"X-Hub-Signature-256": sign(secret, body)})[0] == 401
    assert _post(url, body, {"X-Hub-Signature-256": sign(new, body)})[0] == 202
    assert run_cli("hook", "rm", "plain").returncode == 0
    assert _post(url, body, {"X-Hub-Signature-256": sign(new, body)})[0] == 401


def test_bad_names_and_unknown_agents(server: Shared) -> None:
    r = run_cli("hook", "add", "bad name!", "--agent", "default")
    assert r.returncode != 0 and "not a hook name" in r.stderr
    r = run_cli("hook", "add", "x", "--agent", "ghost")
    assert r.returncode != 0 and "No agent named 'ghost'" in r.stderr


def test_a_fire_forged_in_temporal_runs_nothing(server: Shared) -> None:
    """A workflow started directly in Temporal (not by a schedule) names a schedule that does not exist, or
    passes a webhook-shaped input: the API refuses, no execution is made."""
    import asyncio

    from stigmer.config import store
    from stigmer.executions.contract import TASK_QUEUE
    from stigmer.server.temporal_client import connect

    before = server.api().get("/v1/executions?limit=500")

    async def forge() -> str:
        client = await connect(store.load(server.paths), server.paths, store="api")
        handle = await client.start_workflow(
            "stigmer.ScheduleFire", {"schedule": "gh"}, id="stigmer-fire-gh-forged", task_queue=TASK_QUEUE
        )
        try:
            await asyncio.wait_for(handle.result(), 60)
        except Exception as e:  # noqa: BLE001 - the failure is what is expected
            return str(e)
        return "ran"

    assert asyncio.run(forge()) != "ran"
    after = server.api().get("/v1/executions?limit=500")
    assert len(after) == len(before)


def test_migration_7_adds_schedules_hooks_and_the_trigger(server: Shared, tmp_path: Any) -> None:
    import sqlite3

    from stigmer.server.db import MIGRATIONS, Database

    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for script in MIGRATIONS[:6]:  # a database as the previous release left it
        old.executescript(script)
    old.execute("PRAGMA user_version = 6")
    old.commit()
    old.close()
    db = Database(path)
    try:
        columns = {r["name"] for r in db.query("PRAGMA table_info(executions)")}
        assert {"trigger", "warnings"} <= columns
        tables = {r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"schedules", "schedule_fires", "hooks", "hook_deliveries"} <= tables
    finally:
        db.close()


def test_a_delivery_recorded_before_an_api_crash_runs_once_after_it(server: Shared) -> None:
    """The 202 comes once the delivery and its execution are recorded, before Temporal starts the
    workflow. An API killed in between: the restarted API starts the recorded one; a repeat of the
    delivery answers with the same execution."""
    import signal
    import time

    from stigmer.config import store
    from stigmer.server.db import Database
    from stigmer.server.executions import Executions

    made = _add("crashy")
    url, secret = made["hook"]["url"], made["secret"]
    # what deliver() writes, in its one transaction, without the start that comes after the answer
    db = Database(server.paths.data_dir / "stigmer.db")
    try:
        ex = Executions(db, store.load(server.paths), server.paths)
        with db.tx() as c:
            exec_id, _ticket = ex.make("default", "recorded, then the API died", trigger="hook crashy")
            c.execute(
                "INSERT INTO hook_deliveries (hook, delivery, execution_id, created) VALUES (?, ?, ?, ?)",
                ("crashy", "d-crash", exec_id, time.time()),
            )
    finally:
        db.close()

    def api_pid() -> int | None:
        r = run_cli("server", "status", "--json")
        svc = json.loads(r.stdout)["services"]["server"] if r.returncode == 0 else {}
        return svc.get("pid") if svc.get("state") == "running" else None

    before = api_pid()
    assert before
    os.kill(before, signal.SIGKILL)
    wait_until(lambda: (pid := api_pid()) and pid != before, 90, every=0.5)
    rec = wait_until(lambda: in_state(exec_id, "COMPLETED", "FAILED"), 120)
    assert rec["state"] == "COMPLETED" and rec["output"] == "echo: recorded, then the API died", rec
    body = b"recorded, then the API died"
    headers = {"X-Hub-Signature-256": sign(secret, body), "X-GitHub-Delivery": "d-crash"}
    status, answer = _post(url, body, headers)
    assert status == 202 and answer["execution_id"] == exec_id and answer["repeat"], answer

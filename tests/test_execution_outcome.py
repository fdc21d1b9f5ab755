"""The API's outcome watcher: it ends (a workflow gone from Temporal is a FAILED record, not IN_PROGRESS
for good), and it records the outcome once it can (a full disk delays the record, never loses it). The
Temporal client is a stand-in with temporalio's own handle interface and errors; the database is real."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from stigmer.config.store import load
from stigmer.paths import Paths
from stigmer.server.db import Database
from stigmer.server.executions import Executions


class _Handle:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.id = "ex-1"

    async def result(self, follow_runs: bool = True) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    async def fetch_history_events(self) -> Any:
        for _ in ():
            yield _


class _Client:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def get_workflow_handle(self, workflow_id: str, run_id: str | None = None) -> _Handle:
        return _Handle(self.outcome)


def _executions(paths: Paths, outcome: Any) -> Executions:
    from stigmer.server.keys import ensure_keys

    ensure_keys(paths)
    db = Database(paths.data_dir / "stigmer.db")
    ex = Executions(db, load(paths), paths)
    ex._client = _Client(outcome)
    db.create_execution("ex-1", "default", "hi", None)
    db.update_execution("ex-1", state="IN_PROGRESS")
    return ex


def test_a_workflow_gone_from_temporal_ends_failed(isolated_home: Paths) -> None:
    from temporalio.service import RPCError, RPCStatusCode

    ex = _executions(isolated_home, RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b""))

    async def watch() -> None:
        await asyncio.wait_for(ex._await_result("ex-1"), 10)

    asyncio.run(watch())
    rec = ex.record("ex-1")
    assert rec["state"] == "FAILED" and "gone from Temporal" in rec["error"]
    assert [k for _, k, _ in ex.db.events("ex-1")][-1] == "failed"


def test_an_outcome_that_cannot_be_written_is_written_once_it_can(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = {"text": "done", "provider": "p", "model": "m", "endpoint": "e", "messages": []}
    ex = _executions(isolated_home, out)
    real = ex.db.update_execution
    failures = [sqlite3.OperationalError("database or disk is full")] * 2

    def flaky(exec_id: str, **fields: Any) -> None:
        if fields.get("state") == "COMPLETED" and failures:
            raise failures.pop()
        real(exec_id, **fields)

    monkeypatch.setattr(ex.db, "update_execution", flaky)
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    asyncio.run(asyncio.wait_for(ex._await_result("ex-1"), 10))
    rec = ex.record("ex-1")
    assert rec["state"] == "COMPLETED" and rec["output"] == "done" and not failures


async def _no_wait(_seconds: float) -> None:
    return None


def test_streams_keep_no_memory_of_executions_that_ended(isolated_home: Paths, tmp_path: Path) -> None:
    ex = _executions(isolated_home, {})

    async def follow() -> list[str]:
        kinds = []
        ex._finish("ex-1", "FAILED", error="x")
        async for _, kind, _ in ex.stream("ex-1"):
            kinds.append(kind)
        return kinds

    assert asyncio.run(follow())[-1] == "failed"
    assert "ex-1" not in ex._changed

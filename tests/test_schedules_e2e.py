"""Schedules (issue 18) on Temporal Schedules: each fire is an ordinary execution made by the API, whose
record says trigger "schedule NAME". One real server for the module (tests/shared_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest

from stigmer.errors import StigmerError
from stigmer.server.triggers import check_cron, parse_every
from tests.conftest import run_cli
from tests.executions import wait_until
from tests.shared_server import Shared, same_home, shared_server

server = pytest.fixture(scope="module")(shared_server)
isolated_home = pytest.fixture(same_home)  # overrides conftest's: every test here uses the module's server


def _schedule(name: str) -> dict[str, Any] | None:
    r = run_cli("schedule", "list", "--json")
    assert r.returncode == 0, r.stderr
    return next((s for s in json.loads(r.stdout) if s["name"] == name), None)


def _fired(name: str) -> list[dict[str, Any]]:
    r = run_cli("execution", "list", "--json", "--limit", "200")
    assert r.returncode == 0, r.stderr
    return [e for e in json.loads(r.stdout) if e.get("trigger") == f"schedule {name}"]


def test_validation_errors_name_the_fix(server: Shared) -> None:
    assert parse_every("1h30m") == 5400 and parse_every("30s") == 30
    for bad in ("10", "5x", "0s", "400d", ""):
        with pytest.raises(StigmerError):
            parse_every(bad)
    assert check_cron("0 9 * * 1-5") == "0 9 * * 1-5" and check_cron("*/15 * * jan-mar mon,fri")
    for bad, why in (("0 9 * *", "5 fields"), ("61 * * * *", "minute field has 61"),
                     ("0 9 * * 5-1", "ends before"), ("*/0 * * * *", "step")):  # fmt: skip
        with pytest.raises(StigmerError, match=why):
            check_cron(bad)
    cases = [
        (["--cron", "0 25 * * *"], "hour field has 25"),
        (["--every", "10 minutes"], "not a duration"),
        (["--every", "1h", "--timezone", "Mars/Olympus"], "not a time zone"),
    ]
    for args, why in cases:
        r = run_cli("schedule", "add", "bad", "--agent", "default", "-m", "hi", *args)
        assert r.returncode != 0 and why in r.stderr, r.stderr
    r = run_cli("schedule", "add", "bad", "--agent", "ghost", "-m", "hi", "--every", "1h")
    assert r.returncode != 0 and "No agent named 'ghost'" in r.stderr


def test_every_fires_executions_marked_with_the_schedule(server: Shared) -> None:
    r = run_cli("schedule", "add", "tick", "--agent", "default", "--every", "3s", "-m", "tick tock")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n  20") == 3, r.stdout  # the next 3 fire times
    first = wait_until(lambda: _fired("tick"), 60)
    rec = wait_until(lambda: (x := _schedule("tick")) and x["last_state"] == "COMPLETED" and x, 90)
    assert rec["last_execution"] in {e["id"] for e in first} or _fired("tick")
    assert first[0]["message"] == "tick tock"
    # it is a real Temporal schedule
    from stigmer.server.specs import temporal_binary

    out = subprocess.run(
        [temporal_binary(server.paths), "schedule", "list", "--address", os.environ["STIGMER_TEMPORAL_ADDRESS"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "stigmer-schedule-tick" in out.stdout, out.stdout + out.stderr
    # status shows it
    st = run_cli("server", "status", "--json")
    assert json.loads(st.stdout)["schedules"]["count"] >= 1
    assert "Schedules:" in run_cli("server", "status").stdout
    # pause: no more fires; resume: they come again
    assert run_cli("schedule", "pause", "tick").returncode == 0
    time.sleep(1)
    count = len(_fired("tick"))
    time.sleep(5)
    assert len(_fired("tick")) == count and _schedule("tick")["paused"]  # type: ignore[index]
    assert run_cli("schedule", "resume", "tick").returncode == 0
    wait_until(lambda: len(_fired("tick")) > count, 30)
    assert run_cli("schedule", "rm", "tick").returncode == 0
    assert _schedule("tick") is None
    out = subprocess.run(
        [temporal_binary(server.paths), "schedule", "list", "--address", os.environ["STIGMER_TEMPORAL_ADDRESS"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "stigmer-schedule-tick" not in out.stdout


def test_run_now_and_a_removed_agent(server: Shared, tmp_path: Any) -> None:
    agent = tmp_path / "poet.yaml"
    agent.write_text("name: poet\ninstructions: Write short poems.\n")
    assert run_cli("agent", "apply", "-f", str(agent)).returncode == 0
    r = run_cli("schedule", "add", "daily", "--agent", "poet", "--cron", "0 9 * * 1-5", "--timezone",
                "Europe/Paris", "-m", "a poem", "--overlap", "buffer")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert run_cli("schedule", "run", "daily").returncode == 0
    done = wait_until(lambda: (x := _schedule("daily")) and x["last_state"] == "COMPLETED" and x, 90)
    assert done["cron"] == "0 9 * * 1-5" and done["timezone"] == "Europe/Paris" and len(done["next"]) == 3
    # the agent is removed: the next fire fails, clearly, and the list says so
    assert run_cli("agent", "rm", "poet").returncode == 0
    assert run_cli("schedule", "run", "daily").returncode == 0
    failed = wait_until(lambda: (x := _schedule("daily")) and x["last_state"] == "FAILED" and x, 60)
    assert "No agent named 'poet'" in failed["last_error"]
    listed = run_cli("schedule", "list")
    assert "last fire failed" in listed.stdout and "poet" in listed.stdout
    assert run_cli("schedule", "rm", "daily").returncode == 0


def test_overlap_cancel_cancels_the_run_still_going(server: Shared) -> None:
    """--overlap cancel: a fire that comes while the last run still runs cancels that run (the fire
    workflow waits for its execution, so Temporal's overlap policy applies to the agent's runs)."""
    server.fake.delay = 1.0  # each streamed piece a second: a run lasts longer than the interval
    try:
        r = run_cli("schedule", "add", "slow", "--agent", "default", "--every", "4s", "--overlap", "cancel",
                    "-m", "one two three four five six seven eight nine ten")  # fmt: skip
        assert r.returncode == 0, r.stderr
        cancelled = wait_until(lambda: [e for e in _fired("slow") if e["state"] == "CANCELLED"], 90, every=1)
        assert cancelled
    finally:
        server.fake.delay = 0.0
        run_cli("schedule", "rm", "slow")


def _slow_schedule(name: str, overlap: str) -> None:
    """A schedule that fires only when told (`schedule run`, which Temporal treats as a fire, overlap
    policy included), whose runs last ~8 s."""
    r = run_cli("schedule", "add", name, "--agent", "default", "--cron", "0 9 1 1 *", "--overlap", overlap,
                "-m", "one two three four five six seven eight")  # fmt: skip
    assert r.returncode == 0, r.stderr


def _temporal_schedule(server: Shared, name: str) -> Any:
    """Temporal's own description of the schedule (its running fires, the fires it skipped)."""
    import asyncio

    from stigmer.config import store
    from stigmer.server.temporal_client import connect

    async def describe() -> Any:
        client = await connect(store.load(server.paths), server.paths, store="api")
        return (await client.get_schedule_handle(f"stigmer-schedule-{name}").describe()).info

    return asyncio.run(describe())


def test_overlap_skip_starts_nothing_while_a_run_goes_on(server: Shared) -> None:
    """--overlap skip: a fire that comes while the last run still runs starts nothing, then or later."""
    server.fake.delay = 0.7  # each streamed piece: a run lasts ~8 s
    try:
        _slow_schedule("skipper", "skip")
        assert run_cli("schedule", "run", "skipper").returncode == 0
        first = wait_until(
            lambda: [e for e in _fired("skipper") if e["state"] == "IN_PROGRESS"], 60, every=0.5
        )[0]
        for _ in range(2):
            assert run_cli("schedule", "run", "skipper").returncode == 0
        assert [e["id"] for e in _fired("skipper")] == [first["id"]]
        # the first run ends, and its fire with it: the fires that came meanwhile were dropped
        wait_until(lambda: not _temporal_schedule(server, "skipper").running_actions, 90, every=1)
        info = _temporal_schedule(server, "skipper")
        assert info.num_actions_skipped_overlap == 2 and info.num_actions == 1, info
        assert [(e["id"], e["state"]) for e in _fired("skipper")] == [(first["id"], "COMPLETED")]
    finally:
        server.fake.delay = 0.0
        run_cli("schedule", "rm", "skipper")


def test_overlap_buffer_starts_the_next_run_when_the_last_ends(server: Shared) -> None:
    """--overlap buffer: fires that come while a run goes on wait (one is kept, the rest dropped), and the
    kept one starts its run once the last one ended, never alongside it. Fired by the clock every 3 s
    (each fire also wakes Temporal's scheduler, which then starts what it buffered) while a run lasts
    ~8 s."""
    server.fake.delay = 0.7
    try:
        r = run_cli("schedule", "add", "buffered", "--agent", "default", "--every", "3s", "--overlap", "buffer",
                    "-m", "one two three four five six seven eight")  # fmt: skip
        assert r.returncode == 0, r.stderr
        runs = wait_until(lambda: len(x := _fired("buffered")) >= 2 and x, 120, every=0.5)
        assert run_cli("schedule", "pause", "buffered").returncode == 0
        first, second = sorted(runs, key=lambda e: e["created"])[:2]
        ended = wait_until(
            lambda: next((e for e in _fired("buffered") if e["id"] == first["id"] and e["finished"]), None), 60
        )
        assert ended["state"] == "COMPLETED" and second["created"] >= ended["finished"], (ended, second)
        assert _temporal_schedule(server, "buffered").num_actions_skipped_overlap >= 1  # the third fire
    finally:
        server.fake.delay = 0.0
        run_cli("schedule", "rm", "buffered")

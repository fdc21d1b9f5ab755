"""Helpers for end-to-end tests of executions: wait for a condition, read a record through the real CLI,
script a tool call for the OpenAI stand-in."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import run_cli


def wait_until(cond: Callable[[], Any], timeout: float = 90, every: float = 0.2) -> Any:
    """The first truthy value of cond(), polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def record(exec_id: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = run_cli("execution", "get", exec_id, "--json", env=env)
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def in_state(exec_id: str, *states: str) -> dict[str, Any] | None:
    """The record once it is in one of `states`, else None (for wait_until)."""
    rec = record(exec_id)
    return rec if rec["state"] in states else None


def tool_call(name: str, **args: Any) -> dict[str, Any]:
    """A reply of the scripted model (FakeOpenAI) that calls one tool."""
    return {"tool_calls": [{"name": name, "arguments": args}]}

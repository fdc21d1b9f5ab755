"""A worker that loses the Stigmer API stops taking work until the API answers again (its executions
could not report), and goes back to polling then. Temporal's Worker is replaced by a recorder of when it
polls; the loop, the checks and the timing are the real ones (with short intervals)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stigmer.config.store import load
from stigmer.paths import Paths
from stigmer.runner import worker as runner


class _Polls:
    """Stands in for temporalio's Worker: `async with` = polling the task queue."""

    log: list[str] = []  # noqa: RUF012 - one test's record

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    async def __aenter__(self) -> _Polls:
        self.log.append("poll")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.log.append("stop polling")


def test_a_worker_that_loses_the_api_takes_no_work_until_it_is_back(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    import temporalio.worker

    answers = iter([True, False, False, False, False, True, True, True, True])
    stop = asyncio.Event()
    _Polls.log = []

    async def api_answers() -> bool:
        try:
            ok = next(answers)
        except StopIteration:
            stop.set()
            return True
        _Polls.log.append("api ok" if ok else "api down")
        return ok

    async def nothing(*_args: Any, **_kwargs: Any) -> Any:
        return True

    monkeypatch.setattr(temporalio.worker, "Worker", _Polls)
    monkeypatch.setattr(runner, "check_api", nothing)
    monkeypatch.setattr(runner, "connect", nothing)
    monkeypatch.setattr(runner, "api_answers", api_answers)
    monkeypatch.setattr(runner, "warm_up", lambda: None)
    monkeypatch.setattr(runner, "sandbox", lambda: None)
    monkeypatch.setattr(runner, "HEALTH_EVERY", 0.01)
    monkeypatch.setattr(runner, "API_CHECK_TICKS", 1)

    asyncio.run(asyncio.wait_for(runner.serve(load(isolated_home), isolated_home, stop, None), 10))
    log = _Polls.log
    # polling; one miss is tolerated (a restart of a second), two stop the polling; no polling while the
    # API is down; polling again once it answers
    assert log[:5] == ["poll", "api ok", "api down", "api down", "stop polling"], log
    down = log[5 : log.index("poll", 1)]
    assert down and set(down) <= {"api down", "api ok"} and down[-1] == "api ok", log
    assert log.count("poll") == 2 and log[-1] == "stop polling"

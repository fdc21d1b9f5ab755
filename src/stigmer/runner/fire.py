"""A schedule's fire (server/triggers.py): what a Temporal Schedule starts. Its input carries only the
schedule's name; the one thing it does is ask the API (worker token) to fire that schedule, which makes
an ordinary execution from the API's own record of the schedule. It then waits for that execution to
end, so Temporal's overlap policy (skip, buffer one, cancel the other) applies to the agent's runs; when
the schedule cancels it (overlap: cancel), it cancels the execution."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from stigmer.executions.contract import TERMINAL_STATES

_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10))
_TIMEOUT = timedelta(seconds=30)


async def _call(path: str, body: dict[str, Any]) -> Any:
    from stigmer.runner.publish import Refused, call

    try:
        return await call(path, body)
    except Refused as e:  # the API said no (no such schedule): asking again would not change it
        raise ApplicationError(str(e), non_retryable=True) from None


@activity.defn(name="stigmer.fire_schedule")
async def fire_schedule(name: str) -> dict[str, Any]:
    """Ask the API to fire schedule `name` once for this workflow (its id is unique per scheduled time)."""
    info = activity.info()
    result: dict[str, Any] = await _call(f"/schedules/{name}/fire", {"fire_id": info.workflow_id})
    return result


@activity.defn(name="stigmer.fired_state")
async def fired_state(name: str, execution_id: str) -> str:
    result = await _call(f"/schedules/{name}/executions/{execution_id}", {})
    return str(result["state"])


@activity.defn(name="stigmer.cancel_fired")
async def cancel_fired(name: str, execution_id: str) -> None:
    await _call(f"/schedules/{name}/executions/{execution_id}/cancel", {})


@workflow.defn(name="stigmer.ScheduleFire")
class ScheduleFire:
    @workflow.run
    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        name = str(request.get("schedule") or "")[:100]
        fired = await workflow.execute_activity(
            fire_schedule, name, start_to_close_timeout=_TIMEOUT, retry_policy=_RETRY
        )
        exec_id = str(fired["execution_id"])
        wait = 1.0
        try:
            while True:
                state = await workflow.execute_activity(
                    fired_state, args=[name, exec_id], start_to_close_timeout=_TIMEOUT, retry_policy=_RETRY
                )
                if state in TERMINAL_STATES:
                    return {"execution_id": exec_id, "state": state}
                await workflow.sleep(wait)
                wait = min(wait * 2, 15.0)
        except asyncio.CancelledError:  # overlap "cancel": a newer fire replaces this one
            await workflow.execute_activity(
                cancel_fired, args=[name, exec_id], start_to_close_timeout=_TIMEOUT, retry_policy=_RETRY
            )
            raise

"""Retried attempts, counted by the workflow (issue 18: limits are counted "retried attempts included").

Temporal tries a model request or a tool call again when an attempt fails (a model that broke off
mid-answer, a worker that died, a tool that raised); pydantic-ai's usage counts each request and tool
call once, whatever its attempts, and an activity's result does not say how many it took. So an attempt
after the first tells its workflow, with a signal sent before it does its work: the workflow keeps the
highest attempt of each activity (a signal sent twice counts once), and its limits and the record count
every attempt. A model attempt that died after using tokens cannot say how many: those are not counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

log = logging.getLogger(__name__)

RETRIED_SIGNAL = "stigmer.retried"
MODEL_CALLS, TOOL_CALLS = "model_calls", "tool_calls"
MAX_TRACKED = 10_000  # activities remembered per execution (a signal from elsewhere cannot grow it more)


def kind_of(activity_type: str) -> str | None:
    """Which count an activity's attempts go to (pydantic-ai's activity names), if any."""
    if activity_type.endswith(("__model_request_stream", "__model_request")):
        return MODEL_CALLS
    if activity_type.endswith("__call_tool"):
        return TOOL_CALLS
    return None


class _Inbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        kind = kind_of(info.activity_type)
        if kind is not None and info.attempt > 1 and info.workflow_id:
            await _report(info, kind)
        return await self.next.execute_activity(input)


async def _report(info: Any, kind: str) -> None:
    """Signal the attempt to the workflow; tried a few times, then given up with a warning (the call
    itself matters more than its count)."""
    report = {"activity": info.activity_id, "kind": kind, "attempt": info.attempt}
    for wait in (0.5, 1.0, 2.0, None):
        try:
            handle = activity.client().get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
            await handle.signal(RETRIED_SIGNAL, report)
            return
        except Exception as e:  # noqa: BLE001 - Temporal restarting for a moment
            if wait is None:
                log.warning("could not count attempt %d of %s: %s", info.attempt, info.activity_type, e)
                return
            await asyncio.sleep(wait)


class CountAttempts(Interceptor):
    """The worker's interceptor: attempts after the first are signalled to their workflow."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next)


class Retries:
    """The workflow's part: the highest attempt of each retried activity."""

    def __init__(self) -> None:
        self.attempts: dict[str, tuple[str, int]] = {}

    def note(self, report: Any) -> None:
        if not isinstance(report, dict):
            return
        key, kind, attempt = report.get("activity"), report.get("kind"), report.get("attempt")
        if not isinstance(key, str) or kind not in (MODEL_CALLS, TOOL_CALLS) or not isinstance(attempt, int):
            return
        if key not in self.attempts and len(self.attempts) >= MAX_TRACKED:
            return
        seen = self.attempts.get(key, (kind, 1))[1]
        self.attempts[key] = (kind, max(seen, min(attempt, 1000)))

    def extra(self, kind: str) -> int:
        """The attempts beyond the first, of every activity of this kind."""
        return sum(n - 1 for k, n in self.attempts.values() if k == kind)

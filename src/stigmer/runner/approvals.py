"""Human approval of tool calls, inside the workflow.

A tool marked `approval: required` raises ApprovalRequired; pydantic-ai hands the pending calls to
`decide` below, which runs in workflow code: it tells the API (an activity), then waits. A person
answers through the API (`stigmer execution approve|deny`, or the prompt of `stigmer run` on a
terminal), which records the decision and sends the workflow a `wake` signal; the workflow then reads
the decisions from the API (an activity). The signal carries nothing: a signal sent by anything but
Stigmer's API can wake the workflow, never decide. The wait is a workflow condition, so it holds no
worker and survives restarts of everything. A denial is told to the agent, which goes on without the
tool. "Always" answers stand for that tool for the rest of the execution.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from pydantic_ai import DeferredToolRequests, DeferredToolResults, RunContext, ToolDenied
from temporalio import activity, workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from stigmer.executions.messages import Decision

DENIED = "The user denied this tool call. Do not retry it; continue without it."
RECHECK = timedelta(minutes=10)  # a wake-up lost with an API restart: look at the API again anyway


class NotifyInput(BaseModel):
    execution_id: str
    ticket: str
    events: list[dict[str, Any]]


class DecisionsInput(BaseModel):
    execution_id: str
    ticket: str
    call_ids: list[str]


@activity.defn(name="stigmer.notify")
async def notify(inp: NotifyInput) -> None:
    """Tell the API what the workflow waits for (it must arrive: sent again until it does)."""
    from stigmer.runner.publish import deliver

    await deliver(inp.execution_id, inp.ticket, inp.events)


@activity.defn(name="stigmer.decisions")
async def decisions(inp: DecisionsInput) -> list[Decision]:
    """The decisions people made, through the API, on these calls."""
    from stigmer.runner.publish import call

    found = await call(
        f"/executions/{inp.execution_id}/decisions", {"ticket": inp.ticket, "call_ids": inp.call_ids}
    )
    return [Decision.model_validate(d) for d in found]


class Approvals:
    """The part of the workflow's state that approvals need (the workflow object inherits it)."""

    def __init__(self) -> None:
        self.decisions: dict[str, Decision] = {}
        self.always: dict[str, bool] = {}  # tool name -> approve
        self.woken = False
        # Seconds spent waiting for a person (tool approvals, limit crossings): not the agent's time, so
        # not counted against its `seconds` limit (runner/limits.py).
        self.waited = 0.0

    def record(self, d: Decision) -> None:
        self.decisions[d.call_id] = d
        if d.always and d.tool:
            self.always[d.tool] = d.approve


_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=10))  # until the API answers


async def decide(ctx: RunContext[Any], requests: DeferredToolRequests) -> DeferredToolResults:
    state: Approvals = workflow.instance()
    execution_id, ticket = ctx.deps.execution_id, ctx.deps.ticket
    results: dict[str, Any] = {}
    waiting = []
    for call in requests.approvals:
        if call.tool_name in state.always:
            results[call.tool_call_id] = True if state.always[call.tool_name] else ToolDenied(DENIED)
        else:
            waiting.append(call)
    if waiting:
        await _ask(state, execution_id, ticket, waiting)
        for c in waiting:
            d = state.decisions.get(c.tool_call_id)
            approve = d.approve if d is not None else state.always[c.tool_name]
            results[c.tool_call_id] = True if approve else ToolDenied(DENIED)
    return requests.build_results(approvals=results)


async def _ask(state: Approvals, execution_id: str, ticket: str, waiting: list[Any]) -> None:
    """Tell the API which calls wait for a person, then wait until each has a decision."""
    events = [
        {"type": "approval_required", "id": c.tool_call_id, "name": c.tool_name, "args": c.args_as_dict()}
        for c in waiting
    ]
    ids = [c.tool_call_id for c in waiting]

    def pending() -> list[str]:
        return [i for i in ids if i not in state.decisions and not _by_always(state, waiting, i)]

    await ask_person(state, execution_id, ticket, events, pending, state.record)


async def ask_person(
    state: Approvals,
    execution_id: str,
    ticket: str,
    events: list[dict[str, Any]],
    pending: Callable[[], list[str]],
    take: Callable[[Decision], None],
) -> None:
    """Post the `approval_required` events through the API, then wait (woken by the API's signal, or
    asking it every RECHECK) until `pending()` is empty, handing each decision found to `take`. The
    time spent is the person's, not the execution's: it is added to `state.waited` (limits.py)."""
    began = workflow.now()
    try:
        await workflow.execute_activity(
            notify,
            NotifyInput(execution_id=execution_id, ticket=ticket, events=events),
            start_to_close_timeout=timedelta(seconds=90),
            retry_policy=_RETRY,
        )
        while pending():
            try:
                await workflow.wait_condition(lambda: state.woken, timeout=RECHECK)
            except TimeoutError:
                pass
            state.woken = False
            for found in await workflow.execute_activity(
                decisions,
                DecisionsInput(execution_id=execution_id, ticket=ticket, call_ids=pending()),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=_RETRY,
            ):
                take(found)
    finally:
        state.waited += (workflow.now() - began).total_seconds()


def _by_always(state: Approvals, calls: list[Any], call_id: str) -> bool:
    tool = next((c.tool_name for c in calls if c.tool_call_id == call_id), None)
    return tool is not None and tool in state.always

"""Human approval of tool calls, inside the workflow.

A tool marked `approval: required` raises ApprovalRequired; pydantic-ai hands the pending calls to
`decide` below, which runs in workflow code: it tells the API (an activity), then waits for a
`decide` signal per call. The wait is a workflow condition, so it holds no worker and survives
restarts of everything; the answer arrives as a signal from the API (`stigmer execution approve|deny`,
or the prompt of `stigmer run` on a terminal). A denial is told to the agent, which goes on without
the tool. "Always" answers stand for that tool for the rest of the execution.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from pydantic_ai import DeferredToolRequests, DeferredToolResults, RunContext, ToolDenied
from temporalio import activity, workflow
from temporalio.common import RetryPolicy

DENIED = "The user denied this tool call. Do not retry it; continue without it."


class Decision(BaseModel):
    call_id: str
    tool: str = ""
    approve: bool
    always: bool = False


class NotifyInput(BaseModel):
    execution_id: str
    events: list[dict[str, Any]]


@activity.defn(name="stigmer.notify")
async def notify(inp: NotifyInput) -> None:
    """Tell the API something the workflow decided or waits for."""
    from stigmer.runner.publish import post_events

    await post_events(inp.execution_id, inp.events)


class Approvals:
    """The part of the workflow's state that approvals need (the workflow object inherits it)."""

    def __init__(self) -> None:
        self.decisions: dict[str, Decision] = {}
        self.always: dict[str, bool] = {}  # tool name -> approve

    def record(self, d: Decision) -> None:
        self.decisions[d.call_id] = d
        if d.always and d.tool:
            self.always[d.tool] = d.approve


async def _notify(execution_id: str, events: list[dict[str, Any]]) -> None:
    await workflow.execute_activity(
        notify,
        NotifyInput(execution_id=execution_id, events=events),
        start_to_close_timeout=timedelta(seconds=30),
        retry_policy=RetryPolicy(maximum_attempts=10, maximum_interval=timedelta(seconds=10)),
    )


async def decide(ctx: RunContext[Any], requests: DeferredToolRequests) -> DeferredToolResults:
    state: Approvals = workflow.instance()
    execution_id = ctx.deps.execution_id
    results: dict[str, Any] = {}
    waiting = []
    for call in requests.approvals:
        if call.tool_name in state.always:
            results[call.tool_call_id] = True if state.always[call.tool_name] else ToolDenied(DENIED)
        else:
            waiting.append(call)
    if waiting:
        await _notify(
            execution_id,
            [
                {
                    "type": "approval_required",
                    "id": c.tool_call_id,
                    "name": c.tool_name,
                    "args": c.args_as_dict(),
                }
                for c in waiting
            ],
        )
        ids = [c.tool_call_id for c in waiting]

        def answered() -> bool:
            return all(i in state.decisions or _by_always(state, waiting, i) for i in ids)

        await workflow.wait_condition(answered)
        answers = []
        for c in waiting:
            d = state.decisions.get(c.tool_call_id)
            approve = d.approve if d is not None else state.always[c.tool_name]
            results[c.tool_call_id] = True if approve else ToolDenied(DENIED)
            answers.append(
                {"type": "approval", "id": c.tool_call_id, "name": c.tool_name, "approved": approve,
                 "always": bool(d.always) if d is not None else True}
            )  # fmt: skip
        await _notify(execution_id, answers)
    return requests.build_results(approvals=results)


def _by_always(state: Approvals, calls: list[Any], call_id: str) -> bool:
    tool = next((c.tool_name for c in calls if c.tool_call_id == call_id), None)
    return tool is not None and tool in state.always

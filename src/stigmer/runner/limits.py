"""An execution's limits, kept inside the workflow (agents/limits.py says which and how much).

The agent is driven step by step: before each model request the model calls, tokens and seconds used
so far are compared with the limits, and before each step that runs tools, the tool calls. The counts
are the agent run's own (the workflow's state: a worker that restarts replays them, so they hold over
the whole execution). A model request still going when the seconds run out is raced against a workflow
timer: the timer wins, the request is cancelled (its activity too: the worker closes the model's
stream), and the crossing is asked like any other; approving sends the request again. The time spent
waiting for a person (this decision, a tool's approval) is not the agent's: it is not counted. Crossing a limit does not fail the execution: it waits for a person, like a tool
call that needs approval (an `approval_required` event named `limit`, with the reason, answered through
`stigmer execution approve|deny` or the prompt of `stigmer run`). Approving grants the same amount
again; denying ends the execution FAILED with the type `limit_reached`, with the messages it produced.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from stigmer.executions.messages import Decision
    from stigmer.runner.approvals import Approvals, ask_person
    from stigmer.runner.attempts import MODEL_CALLS, TOOL_CALLS, Retries

LIMIT_REACHED = "limit_reached"  # the failure's type: the API records it as the execution's error code
OUTPUT_TOOL = "final_result"  # the structured answer (an output schema) is a tool call, not a tool's


class Budget:
    """The limits of one execution and what was granted on top (approved crossings)."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.base = dict(limits)
        self.allowed = dict(limits)
        self.started = workflow.now()
        self.crossings = 0

    def used_seconds(self) -> float:
        """Seconds of the execution so far, less those it waited for a person."""
        state: Approvals = workflow.instance()
        return (workflow.now() - self.started).total_seconds() - state.waited

    def seconds_left(self) -> float | None:
        if "seconds" not in self.allowed:
            return None
        return max(0.0, self.allowed["seconds"] - self.used_seconds())

    def crossed(self, node: Any, usage: Any) -> tuple[str, int, int] | None:
        """(name, used, limit) of the first limit the next step would cross, else None."""
        from pydantic_ai import Agent

        used_seconds = int(self.used_seconds())
        if "seconds" in self.allowed and used_seconds >= self.allowed["seconds"]:
            return "seconds", used_seconds, self.allowed["seconds"]
        # the agent library counts a request or a tool call once: the attempts Temporal retried, on top
        retries: Retries = workflow.instance()
        if Agent.is_model_request_node(node):
            requests = usage.requests + retries.extra(MODEL_CALLS)
            if requests >= self.allowed.get("model_calls", requests + 1):
                return "model_calls", requests, self.allowed["model_calls"]
            tokens = usage.input_tokens + usage.output_tokens
            if tokens >= self.allowed.get("tokens", tokens + 1):
                return "tokens", tokens, self.allowed["tokens"]
        if Agent.is_call_tools_node(node):
            asked = sum(1 for c in node.model_response.tool_calls if c.tool_name != OUTPUT_TOOL)
            calls = usage.tool_calls + retries.extra(TOOL_CALLS)
            if asked and calls + asked > self.allowed.get("tool_calls", calls + asked):
                return "tool_calls", calls, self.allowed["tool_calls"]
        return None

    def grant(self, name: str) -> None:
        self.allowed[name] += self.base[name]


async def ask(budget: Budget, execution_id: str, ticket: str, crossed: tuple[str, int, int]) -> bool:
    """Wait for a person to approve going on past a limit (True) or not."""
    name, used, limit = crossed
    budget.crossings += 1
    call_id = f"limit-{name}-{budget.crossings}"
    reason = f"limit: {name} {used} of {limit}"
    more = f"{budget.base[name]:,} more {name.replace('_', ' ')}"
    state: Approvals = workflow.instance()
    event = {
        "type": "approval_required",
        "id": call_id,
        "name": "limit",
        "args": {"reason": reason, "approve": f"grants {more}"},
        "reason": reason,
    }

    def take(found: Decision) -> None:
        state.decisions[found.call_id] = found  # never an "always": each crossing is asked

    await ask_person(
        state, execution_id, ticket, [event], lambda: [] if call_id in state.decisions else [call_id], take
    )
    return state.decisions[call_id].approve


def refused(crossed: tuple[str, int, int], messages: list[dict[str, Any]]) -> ApplicationError:
    name, used, limit = crossed
    return ApplicationError(
        f"limit: {name} {used} of {limit}, and going on was denied. Raise it in the agent file "
        f"(limits: {{{name}: N}}) or for one run (stigmer run --limit {name}=N).",
        {"messages": messages},
        type=LIMIT_REACHED,
        non_retryable=True,
    )


async def run(
    runner: Any, budget: Budget, execution_id: str, ticket: str, messages: Any, **kwargs: Any
) -> Any:
    """The agent run, step by step within the budget. `messages(history)`: the record's messages of what
    was produced so far (kept when a crossing is denied)."""
    from pydantic_ai import Agent
    from pydantic_ai.usage import UsageLimits

    # The agent library's own limit (50 requests) gives way to ours.
    async with runner.iter(usage_limits=UsageLimits(request_limit=None), **kwargs) as agent_run:
        node = agent_run.next_node
        while not Agent.is_end_node(node):
            crossed = budget.crossed(node, agent_run.usage())
            while crossed is not None:
                await _ask_or_refuse(budget, execution_id, ticket, crossed, agent_run, node, messages)
                crossed = budget.crossed(node, agent_run.usage())
            left = budget.seconds_left() if Agent.is_model_request_node(node) else None
            # (a marker in the history: executions begun before the race replay without its timers)
            if left is None or not workflow.patched("seconds-limit-race"):
                node = await agent_run.next(node)
                continue
            try:
                # A workflow timer raced against the model request: pydantic-ai's activities take the
                # cancellation (one cancel to Temporal, which cancels the activity on the worker).
                node = await asyncio.wait_for(agent_run.next(node), timeout=max(left, 0.001))
            except TimeoutError:
                limit = budget.allowed["seconds"]
                await _ask_or_refuse(
                    budget, execution_id, ticket, ("seconds", limit, limit), agent_run, node, messages
                )
                node = _again(agent_run, node)  # approved: the same request, sent again
        return agent_run.result


def _again(agent_run: Any, node: Any) -> Any:
    """A new step for a model request that was cancelled. A step runs once (pydantic-ai refuses to run
    a step whose stream began again), and the cancelled one had put its request in the history: it is
    taken out (the new step puts it back, as it was sent)."""
    import dataclasses

    from pydantic_ai.messages import ModelRequest

    state = agent_run.ctx.state
    history = state.message_history
    request = node.request
    # the step puts its request last before anything that could be cancelled (the timer fires in a
    # later workflow task than the one that started the step)
    if history and isinstance(history[-1], ModelRequest):
        request = history.pop()
        state.appended_messages.replace(request, None)
        state.run_step -= 1
    return dataclasses.replace(node, request=request)


async def _ask_or_refuse(
    budget: Budget, execution_id: str, ticket: str, crossed: tuple[str, int, int], agent_run: Any,
    node: Any, messages: Any,
) -> None:  # fmt: skip
    """Ask a person about a crossing: approved, grant the same amount again; denied, end the execution
    with what it made, the tool results the next request would have carried too."""
    from pydantic_ai import Agent

    if not await ask(budget, execution_id, ticket, crossed):
        made = agent_run.all_messages()
        if Agent.is_model_request_node(node) and node.request not in made:
            made = [*made, node.request]
        raise refused(crossed, messages(made))
    budget.grant(crossed[0])

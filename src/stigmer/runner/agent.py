"""The durable agent: pydantic-ai on Temporal. Each model request runs as its own activity (retried by
Temporal, heartbeating from a background task while it waits on the model), its text streamed to the
API as it is generated. This module is imported inside the workflow sandbox: no I/O at import.

Why pydantic-ai: its TemporalDurability capability runs model requests and tool calls as activities,
streams deltas from inside them, and speaks OpenAI-compatible endpoints (the built-in engine, Ollama,
vLLM, LM Studio) and Anthropic; measured here with the built-in engine, first delta ~130 ms after the
workflow starts, ~2 s of worker import and ~40 MB.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from pydantic_ai import Agent, RunContext
from pydantic_ai.capabilities import HandleDeferredToolCalls, ResolveModelId
from pydantic_ai.durable_exec.temporal import TemporalDurability
from pydantic_ai.messages import (
    AgentStreamEvent,
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
)
from pydantic_ai.toolsets._dynamic import DynamicToolset
from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityConfig

with workflow.unsafe.imports_passed_through():
    from stigmer.runner import approvals, llm, tools
    from stigmer.runner.llm import LlmTarget
    from stigmer.runner.publish import Publisher

MODEL_PREFIX = "stigmer:"
# A model request: long generations are fine (start_to_close), a dead worker is noticed within the
# heartbeat timeout and the request retried on another (or the restarted) worker.
MODEL_TIMEOUT = timedelta(minutes=30)
HEARTBEAT_TIMEOUT = timedelta(seconds=float(os.environ.get("STIGMER_RUNNER_HEARTBEAT_TIMEOUT") or 10))
# A tool call: each tool enforces its own timeout (1-3600 s, from the agent file) and retry count.
TOOL_ACTIVITY = ActivityConfig(
    start_to_close_timeout=timedelta(seconds=3700),
    heartbeat_timeout=HEARTBEAT_TIMEOUT,
    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=11),
)
MODEL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=4,
)


class RunDeps(BaseModel):
    """Crosses into every activity (so into Temporal's history): nothing secret."""

    execution_id: str
    ticket: str  # the execution's secret (encrypted in the history): the API takes its events with it
    target: LlmTarget
    agent: str = "default"
    tools: list[dict[str, Any]] = []  # ToolConfig fields, from the agent file
    workspace: str | None = None  # the agent file's workspace folder, when it names one
    session: str | None = None  # a turn of a conversation: its transcript is read by the model activity
    history: bool = False  # the caller gave earlier messages (OpenAI endpoint): read the same way


def _model(ctx: Any, model_id: str) -> Any:
    """Models are named `stigmer:<name>`; the endpoint comes from the run's deps, the key from the worker."""
    if not model_id.startswith(MODEL_PREFIX):
        return None
    deps: RunDeps = ctx.deps
    # In the workflow the model only describes itself (the request runs in an activity): no key, no I/O.
    if workflow.in_workflow():
        return llm.build(deps.target, key="unused")
    model = llm.build(deps.target)
    if deps.session or deps.history:
        from stigmer.runner.transcript import WithTranscript

        # The conversation so far reaches the model here, in the activity, read from the API: it never
        # crosses Temporal, so a turn's history does not grow with its session.
        return WithTranscript(model, deps.execution_id, deps.ticket, deps.target.context)
    return model


async def _stream(ctx: RunContext[RunDeps], events: AsyncIterable[AgentStreamEvent]) -> None:
    """Runs inside the model-request activity (and the tool-event activities): forward what happens."""
    info = activity.info()
    async with Publisher(ctx.deps.execution_id, ctx.deps.ticket, info.attempt) as pub:
        if info.activity_type.endswith("model_request_stream") and info.attempt > 1:
            pub.event("retry", reason="the model request is being retried")  # clients drop its partial text
        async for event in events:
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                pub.text(event.part.content)
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                pub.text(event.delta.content_delta)
            elif isinstance(event, FunctionToolCallEvent):
                pub.event(
                    "tool_call",
                    id=event.part.tool_call_id,
                    name=event.part.tool_name,
                    args=event.part.args_as_dict(),
                    sandbox=tools.sandbox_of(ctx.deps, event.part.tool_name),  # what the call could do
                )
            elif isinstance(event, FunctionToolResultEvent):
                result = event.part  # a ToolReturnPart (or a retry prompt for the model)
                pub.event(
                    "tool_result",
                    id=result.tool_call_id,
                    name=getattr(result, "tool_name", "") or "",
                    content=str(getattr(result, "content", ""))[:2000],
                )


def _make(name: str, *, with_tools: bool) -> Agent[RunDeps, str]:
    durability = TemporalDurability(
        event_stream_handler=_stream,
        toolset_activity_config={tools.TOOLSET_ID: TOOL_ACTIVITY} if with_tools else {},
        activity_config=ActivityConfig(
            start_to_close_timeout=timedelta(minutes=2),
            retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=10)),
        ),
        model_activity_config=ActivityConfig(
            start_to_close_timeout=MODEL_TIMEOUT,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=MODEL_RETRY,
        ),
    )
    return Agent(
        f"{MODEL_PREFIX}default",
        name=name,  # activity names: agent__<name>__model_request_stream, ...
        deps_type=RunDeps,
        toolsets=[DynamicToolset(tools.build, id=tools.TOOLSET_ID)] if with_tools else [],
        capabilities=[
            ResolveModelId(_model),
            *([HandleDeferredToolCalls(handler=approvals.decide)] if with_tools else []),
            durability,
        ],
    )


# Two agents, the same but for tools: an agent file without tools then costs no tool-listing activity
# per run (~30 ms and a workflow task here).
agent = _make("stigmer", with_tools=False)
tool_agent = _make("stigmer_tools", with_tools=True)

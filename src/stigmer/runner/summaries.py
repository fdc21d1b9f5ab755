"""Tool-call activities summarized with the sandbox policy they run under, in Temporal's history and UI.

The policy of each tool is computed where I/O is allowed (the get-tools activity, runner/tools.py) and
travels back into the workflow as the tool definition's metadata (`{"temporal": {"summary": ...}}`).
pydantic-ai replaces an activity's summary with its own ("call tool: <toolset>:<name>"), so this
workflow interceptor sets it from that metadata as the activity is scheduled: deterministic (the
metadata is in the history already), and through Temporal's public interceptor API.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.worker import (
    Interceptor,
    StartActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

MAX_SUMMARY = 400


def summary_of(args: Any) -> str | None:
    """The summary a tool call's own definition asks for, from the activity's arguments (pydantic-ai's
    CallToolParams first), else None."""
    params = args[0] if isinstance(args, list | tuple) and args else None
    metadata = getattr(getattr(params, "tool_def", None), "metadata", None)
    temporal = metadata.get("temporal") if isinstance(metadata, dict) else None
    summary = temporal.get("summary") if isinstance(temporal, dict) else None
    return summary[:MAX_SUMMARY] if isinstance(summary, str) and summary else None


class _Outbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        summary = summary_of(input.args)
        if summary:
            input.summary = summary
        return super().start_activity(input)


class _Inbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_Outbound(outbound))


class ToolSummaries(Interceptor):
    """The worker's interceptor that puts each tool call's sandbox policy in its activity's summary."""

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _Inbound

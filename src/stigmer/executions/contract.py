"""The execution protocol in one place: what the API, the agent runner and the CLI say to each other.

Names of the workflow, its task queue and its signal; the states of an execution and the kinds of event
in its stream. Standard library only, so the CLI can use it at no cost; the messages themselves (the
workflow's input, what a worker claims from the API, decisions) are pydantic models in messages.py.

Trust: the workflow input carries only a reference (execution id and a ticket that only Stigmer's API and
its workers can read, since payloads are encrypted); what to run comes from the API when a worker claims
the execution with that ticket. A signal only wakes the workflow: the decisions themselves are read from
the API. So nothing that arrives through Temporal is trusted unless Stigmer's API sent it.
"""

from __future__ import annotations

import enum

WORKFLOW = "stigmer.AgentExecution"
TASK_QUEUE = "agent_execution_runner"
WAKE_SIGNAL = "wake"  # "look again at the API": carries nothing the workflow trusts


class ExecutionState(enum.StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    WAITING_APPROVAL = "WAITING_APPROVAL"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({ExecutionState.COMPLETED, ExecutionState.FAILED, ExecutionState.CANCELLED})


class EventKind(enum.StrEnum):
    # written by the API
    PENDING = "pending"
    STARTED = "started"
    CANCELLING = "cancelling"
    APPROVAL = "approval"  # a person decided (through the API)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # sent by the worker running the execution's current attempt
    DELTA = "delta"
    RETRY = "retry"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"
    APPROVAL_REQUIRED = "approval_required"
    NOTICE = "notice"


# What a worker may post. Terminal states and `pending` come only from Temporal's outcome (the API's
# watcher), decisions only from the API.
WORKER_EVENTS = frozenset(
    {
        EventKind.DELTA,
        EventKind.RETRY,
        EventKind.TOOL_CALL,
        EventKind.TOOL_RESULT,
        EventKind.APPROVAL_REQUIRED,
        EventKind.NOTICE,
    }
)
END_EVENTS = frozenset({EventKind.COMPLETED, EventKind.FAILED, EventKind.CANCELLED})

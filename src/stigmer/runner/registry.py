"""What the agent runner executes: its workflows and activities, in one place (the worker registers
exactly these; the agent's own activities come with pydantic-ai's plugin)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def workflows() -> list[type]:
    from stigmer.runner.fire import ScheduleFire
    from stigmer.runner.health import Ping
    from stigmer.runner.workflow import AgentExecution

    return [Ping, AgentExecution, ScheduleFire]


def activities() -> list[Callable[..., Any]]:
    from stigmer.runner.approvals import decisions, notify
    from stigmer.runner.fire import cancel_fired, fire_schedule, fired_state
    from stigmer.runner.health import pong
    from stigmer.runner.workflow import prepare

    return [pong, prepare, notify, decisions, fire_schedule, fired_state, cancel_fired]

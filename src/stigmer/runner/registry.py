"""What the agent runner executes: its workflows and activities, in one place (the worker registers
exactly these)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def workflows() -> list[type]:
    from stigmer.runner.health import Ping

    return [Ping]


def activities() -> list[Callable[..., Any]]:
    from stigmer.runner.health import pong

    return [pong]

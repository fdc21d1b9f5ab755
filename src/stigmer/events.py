"""Progress as events: the core reports, whoever called it decides how to show them.

A Reporter is passed with each call that can take time (an install, a pull, a start), never stored
globally, so that a daemon serving several requests at once sends each request's progress to its own
caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

INITIALIZING, INSTALLING, STARTING = "Initializing", "Installing", "Starting"


@dataclass(frozen=True)
class Event:
    phase: str
    message: str
    key: str | None = None  # identifies one progress bar (a download, a layer)
    done: int | None = None
    total: int | None = None


Reporter = Callable[[Event], None]


def silent(_event: Event) -> None:
    pass

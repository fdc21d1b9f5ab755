"""What the service layer needs to know to run one of the product's processes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stigmer.sandbox.policy import Policy


@dataclass(frozen=True)
class RestartPolicy:
    """How a supervisor brings a dead service back: with growing back-off, and not forever."""

    max_restarts: int = 5  # within `window` seconds; past that the service is reported as failed
    window: float = 300.0
    backoff_first: float = 0.5
    backoff_max: float = 30.0

    def delay(self, attempt: int) -> float:
        return float(min(self.backoff_max, self.backoff_first * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # llm, temporal, agent-runner, api: names its pid record and its log
    argv: list[str]  # built as a list by a pure function; never a shell string
    env: Mapping[str, str]  # built from an allow-list (services.env), never the whole environment
    ready: Callable[[], bool]  # True once the service answers
    what: str = ""  # how messages name it ("the Local LLM server"); the name when empty
    address: tuple[str, int] | None = None  # where it listens: a busy port is named in errors
    more_addresses: tuple[tuple[str, int], ...] = ()  # other ports it listens on, checked the same way
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0
    cwd: Path | None = None
    info: Mapping[str, Any] = field(default_factory=dict)  # kept in the pid record (provider, model, ...)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    pass_fds: tuple[int, ...] = ()  # open files the child inherits (a lock it must hold while it runs)
    # Started through the sandbox launcher with this policy (Linux; elsewhere the argv as is).
    sandbox: Policy | None = None
    # Secrets in `env` reach the child through a pipe, not its environment (services.secrets): only
    # for our own Python processes, which read it at their start.
    secrets_by_pipe: bool = False

    @property
    def label(self) -> str:
        return self.what or self.name

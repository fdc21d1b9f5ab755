"""What the daemon knows about its services, written to run/state.json after every change.

The daemon is the only writer (atomic replace); the CLI reads it while it waits for a start, and the API
serves it in /v1/status. It is a report, never an instruction: pid records decide what is ours.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stigmer.fsutil import atomic_write
from stigmer.paths import Paths

# Service states
STARTING, RUNNING, RESTARTING, FAILED, STOPPED, EXTERNAL = (
    "starting",
    "running",
    "restarting",
    "failed",
    "stopped",
    "external",  # not ours to run: an external Temporal, a remote LLM, an Ollama the user runs
)
# Daemon phases
PHASE_STARTING, PHASE_READY, PHASE_FAILED, PHASE_STOPPING = "starting", "ready", "failed", "stopping"


@dataclass
class ServiceStatus:
    name: str
    state: str = STOPPED
    pid: int | None = None
    address: str | None = None  # host:port where it listens, when it does
    started: float | None = None  # epoch seconds of the current process
    restarts: int = 0
    last_failure: str | None = None
    last_failure_at: float | None = None
    log: str = ""


@dataclass
class DaemonState:
    pid: int
    started: float
    api_url: str
    phase: str = PHASE_STARTING
    message: str = ""  # why the start failed: the service, what happened
    failed_service: str | None = None
    services: dict[str, ServiceStatus] = field(default_factory=dict)
    temporal_address: str = ""
    web_ui: str | None = None
    data_dir: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DaemonState:
        services = {k: ServiceStatus(**v) for k, v in (raw.get("services") or {}).items()}
        return cls(**{**raw, "services": services})


DAEMON = "daemon"  # its pid record is run/daemon.pid


def record_address(info: dict[str, Any]) -> str | None:
    """Where a service of ours listens, from its pid record: host:port (the LLM's from its base URL)."""
    if info.get("port"):
        return f"127.0.0.1:{info['port']}"
    if info.get("base_url"):
        from urllib.parse import urlsplit

        return urlsplit(str(info["base_url"])).netloc or None
    return None


def daemon_record(paths: Paths) -> Any:
    """The daemon's record when it names our live daemon process, else None."""
    from stigmer.services import record as records

    return records.live_record(paths.pid_file(DAEMON))


def state_path(paths: Paths) -> Path:
    return paths.run_dir / "state.json"


def write(paths: Paths, state: DaemonState) -> None:
    atomic_write(state_path(paths), state.to_json())


def read(paths: Paths) -> DaemonState | None:
    try:
        raw = json.loads(state_path(paths).read_bytes())
        return DaemonState.from_dict(raw)
    except (OSError, ValueError, TypeError, KeyError):
        return None

"""A sandbox policy: what one process (and everything it starts) may read, write, connect to and use.

Plain data, passed to the launcher as JSON on its command line (it holds no secret) and written, as
`summary()`, on the record of every tool call so that a person can audit what a command could do.
Standard library only (see stigmer/sandbox/__init__.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from stigmer.sandbox import ANY, NONE, PORTS

__all__ = ["ANY", "NONE", "PORTS", "Limits", "Policy"]


@dataclass(frozen=True)
class Limits:
    """rlimits; None leaves the inherited one."""

    memory: int | None = None  # bytes of data (RLIMIT_DATA: heap and private mappings, not reservations)
    cpu_seconds: int | None = None  # per process (RLIMIT_CPU)
    file_size: int | None = None  # bytes, the largest file it may write (RLIMIT_FSIZE)
    processes: int | None = None  # processes it may add to what this user runs now (RLIMIT_NPROC)


@dataclass(frozen=True)
class Policy:
    name: str  # who it is for, as the record shows it: "shell", "mcp notes", "engine"
    read: tuple[str, ...] = ()  # folders and files it may read and run
    write: tuple[str, ...] = ()  # folders and files it may also change (create, write, remove)
    devices: tuple[str, ...] = ()  # device files it may read, write and ioctl (/dev/null, a GPU)
    network: str = NONE
    connect: tuple[int, ...] = ()  # TCP ports it may connect to, with network = "ports"
    bind: tuple[int, ...] | None = None  # TCP ports it may listen on; None: not restricted
    hosts: tuple[str, ...] = ()  # the hosts its proxy lets through (for the record)
    limits: Limits = field(default_factory=Limits)
    seccomp: bool = True  # refuse what tools never need (ptrace, mount, keyctl, bpf, modules...)
    require: bool = False  # refuse to run when the kernel cannot enforce the file rules
    denied: tuple[str, ...] = ()  # secrets kept out of reach (for the record: Landlock allows, never denies)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data: dict[str, Any] = json.loads(text)
        data["limits"] = Limits(**data.get("limits") or {})
        for key in ("read", "write", "devices", "connect", "hosts", "denied"):
            data[key] = tuple(data.get(key) or ())
        if data.get("bind") is not None:
            data["bind"] = tuple(data["bind"])
        return cls(**data)

    def with_limits(self, **changes: int | None) -> Policy:
        return replace(self, limits=replace(self.limits, **changes))

    def summary(self, enforced: str = "") -> str:
        """One line: what the process could do. `enforced` names the mechanism (e.g. "landlock 7,
        seccomp"), or says it is not enforced."""
        parts = []  # what matters most first: a long path must not push it out of a shortened line
        if self.network == NONE:
            parts.append("no network")
        elif self.network == PORTS:
            where = ", ".join(self.hosts) if self.hosts else "ports " + ", ".join(map(str, self.connect))
            parts.append(f"network: {where}")
        else:
            parts.append("network: any")
        parts.append(f"rw {_paths(self.write)}" if self.write else "no writes")
        if self.bind is not None:
            parts.append("listen: " + (", ".join(map(str, self.bind)) or "none"))
        limits = self.limits
        if limits.memory:
            parts.append(f"memory {limits.memory // (1024 * 1024)} MB")
        if limits.cpu_seconds:
            parts.append(f"cpu {limits.cpu_seconds}s")
        if limits.file_size:
            parts.append(f"files <= {limits.file_size // (1024 * 1024)} MB")
        if limits.processes:
            parts.append(f"+{limits.processes} processes")
        return f"{self.name}: " + (f"[{enforced}] " if enforced else "") + "; ".join(parts)


def _paths(paths: tuple[str, ...]) -> str:
    shown = ", ".join(paths[:3])
    return shown + (f" (+{len(paths) - 3})" if len(paths) > 3 else "")

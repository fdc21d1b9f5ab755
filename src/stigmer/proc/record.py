"""Pid records that know which process they describe.

A bare pid is not enough: after a crash or a reboot the number can belong to anything. The record keeps
the process's create time and executable; a pid whose create time differs is a stranger and is never
signalled. A zombie is not running.

The file starts with the bare pid on its own line (so `kill $(head -1 llm.pid)` still works), followed
by one JSON line with the identity.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stigmer.fsutil import atomic_write

# create_time from psutil is a float rounded by the OS; allow a little jitter between two reads.
CREATE_TIME_TOLERANCE = 0.05


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    create_time: float
    argv: list[str]
    service: str  # what it is, e.g. "llm"
    info: dict[str, Any] = field(default_factory=dict)  # provider, base_url, model, ...

    def to_bytes(self) -> bytes:
        return f"{self.pid}\n{json.dumps(asdict(self), sort_keys=True)}\n".encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ProcessRecord | None:
        lines = data.decode("utf-8", "replace").splitlines()
        if len(lines) < 2:
            return None  # an old bare pid file: we cannot prove the pid is ours, so it is not
        try:
            raw = json.loads(lines[1])
            return cls(
                int(raw["pid"]),
                float(raw["create_time"]),
                list(raw["argv"]),
                str(raw["service"]),
                dict(raw.get("info") or {}),
            )
        except (ValueError, KeyError, TypeError):
            return None


def write(path: Path, record: ProcessRecord) -> None:
    atomic_write(path, record.to_bytes(), mode=0o644)


def read(path: Path) -> ProcessRecord | None:
    try:
        return ProcessRecord.from_bytes(path.read_bytes())
    except OSError:
        return None


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_ours(record: ProcessRecord) -> bool:
    """True only if the pid is alive, not a zombie, and is the very process we started."""
    import psutil

    try:
        p = psutil.Process(record.pid)
        if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        return abs(p.create_time() - record.create_time) <= CREATE_TIME_TOLERANCE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def live_record(path: Path) -> ProcessRecord | None:
    """The record if it names our live process; a stale record is removed."""
    rec = read(path)
    if rec is None:
        return None
    if is_ours(rec):
        return rec
    if path.exists() and os.access(path.parent, os.W_OK):
        remove(path)
    return None

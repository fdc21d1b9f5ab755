"""Pid records that know which process they describe.

A bare pid is not enough: after a crash or a reboot the number can belong to anything. The record keeps
the process's create time and executable; a pid whose create time differs is a stranger and is never
signalled. A zombie is not running.

The file starts with the bare pid on its own line (so `kill $(head -1 llm.pid)` still works), followed
by one JSON line with the identity.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
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


def _identity(pid: int) -> tuple[float, bool] | None:
    """(create time, is zombie or dead) of a live pid, None when there is no such process.

    On Linux this reads /proc directly, computing the create time exactly as psutil does (boot time +
    start ticks): `stigmer server llm status` has a 100 ms budget and importing psutil costs ~14 ms.
    Elsewhere psutil does it.
    """
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return None
        except OSError:
            pass  # e.g. hidepid: fall through to psutil
        else:
            fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
            state, start_ticks = fields[0], int(fields[19])
            return _boot_time() + start_ticks / _clock_ticks(), state in ("Z", "X")
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time(), p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.ZombieProcess:
        return 0.0, True
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@functools.cache
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime"):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


@functools.cache
def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def create_time(pid: int) -> float | None:
    ident = _identity(pid)
    return ident[0] if ident else None


def is_ours(record: ProcessRecord) -> bool:
    """True only if the pid is alive, not a zombie, and is the very process we started."""
    ident = _identity(record.pid)
    if ident is None or ident[1]:
        return False
    return abs(ident[0] - record.create_time) <= CREATE_TIME_TOLERANCE


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

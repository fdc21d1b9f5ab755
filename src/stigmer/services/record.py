"""Pid records that know which process they describe.

A bare pid is not enough: after a crash or a reboot the number can belong to anything. The record keeps
the process's create time and command line; a pid whose create time or command line differs is a
stranger and is never signalled. A zombie is not running.

The file starts with the bare pid on its own line (so `kill $(head -1 run/llm.pid)` still works),
followed by one JSON line with the identity.
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

    @property
    def command(self) -> list[str]:
        """The program's own command line: argv without the sandbox launcher in front of it."""
        from stigmer.sandbox.launch import inner

        return inner(self.argv)

    def to_bytes(self) -> bytes:
        return f"{self.pid}\n{json.dumps(asdict(self), sort_keys=True)}\n".encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ProcessRecord | None:
        lines = data.decode("utf-8", "replace").splitlines()
        if len(lines) < 2:
            return None  # a bare pid file: we cannot prove the pid is ours, so it is not
        try:
            raw = json.loads(lines[1])
            return cls(
                int(raw["pid"]),
                float(raw["create_time"]),
                [str(a) for a in raw["argv"]],
                str(raw["service"]),
                dict(raw.get("info") or {}),
            )
        except (ValueError, KeyError, TypeError):
            return None


def write(path: Path, record: ProcessRecord) -> None:
    atomic_write(path, record.to_bytes())


def read(path: Path) -> ProcessRecord | None:
    try:
        return ProcessRecord.from_bytes(path.read_bytes())
    except OSError:
        return None


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def remove_if(path: Path, record: ProcessRecord) -> bool:
    """Remove the record only if it is still this one: never one that another process wrote since."""
    current = read(path)
    if current is None or (current.pid, current.create_time) != (record.pid, record.create_time):
        return False
    remove(path)
    return True


@dataclass(frozen=True)
class Identity:
    create_time: float
    cmdline: list[str]
    gone: bool  # a zombie, or dead


def identity(pid: int) -> Identity | None:
    """What the OS says about a live pid; None when there is no such process (or it is not ours to see)."""
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            gone = p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
            return Identity(p.create_time(), [] if gone else p.cmdline(), gone)
    except psutil.ZombieProcess:
        return Identity(0.0, [], True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def create_time(pid: int) -> float | None:
    ident = identity(pid)
    return ident.create_time if ident else None


def is_ours(record: ProcessRecord) -> bool:
    """True only if the pid is alive, not a zombie, and is the very process we started: same create time
    and same command line (a pid reused within the clock's resolution still runs something else)."""
    ident = identity(record.pid)
    if ident is None or ident.gone:
        return False
    if abs(ident.create_time - record.create_time) > CREATE_TIME_TOLERANCE:
        return False
    return same_command(ident.cmdline, record.argv)


def same_command(cmdline: list[str], argv: list[str]) -> bool:
    """The process's command line is the one we started: the same argv, or, for a script started
    through its #! line, the interpreter followed by that same argv. A program started through the
    sandbox launcher shows the launcher's command line until the launcher execs it (same pid), then
    the program's own: either is ours."""
    from stigmer.sandbox.launch import inner

    program = inner(argv)
    if program is not argv and program and _same(cmdline, program):
        return True
    return _same(cmdline, argv)


def _same(cmdline: list[str], argv: list[str]) -> bool:
    if cmdline == argv:
        return True
    n = len(argv)
    if n == 0 or len(cmdline) <= n:
        return False
    script, *rest = cmdline[-n:]
    return rest == argv[1:] and os.path.basename(script) == os.path.basename(argv[0])


def live_record(path: Path) -> ProcessRecord | None:
    """The record if it names our live process; a stale record is removed."""
    rec = read(path)
    if rec is None:
        return None
    if is_ours(rec):
        return rec
    remove_if(path, rec)
    return None

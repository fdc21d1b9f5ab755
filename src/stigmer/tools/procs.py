"""Processes started for tools (shell commands, stdio MCP servers) never outlive their call, nor the
worker that started them: not the command's whole process tree, `setsid` and double forks included.

Linux: each one runs under a guardian (stigmer/tools/guardian.py), a small `python -I -S` process that
is a child subreaper, so everything the command leaves behind becomes its child and stays reachable;
it dies with the worker thread that started it (PR_SET_PDEATHSIG) and then kills the whole tree at
once; when the command exits or the worker asks (SIGTERM), it stops the tree and exits as the command
did. No root, no cgroup delegation, and nothing to reap in the worker. It costs one process per
running tool (about 9 MB, started in 20-100 ms).

Why not the worker as the subreaper: the worker would then have to reap orphans itself, and a
waitpid(-1) there takes exit statuses that subprocess and asyncio wait for (a command's exit code would
read 0); nor could it tell which call an orphan belongs to. A cgroup v2 subtree needs delegation from
systemd (and cgroup v2), which many machines and containers do not give.

A backstop for the case the guardian itself is killed with SIGKILL (the OOM killer): every tool process
carries STIGMER_TOOL_OWNER=<worker pid>:<its create time> in its environment, and a worker that starts
kills the processes of this user whose owner is no longer running (kill_leftovers), so they last at
most until the worker's next start (the daemon restarts a dead one within seconds).

macOS and Windows have neither a subreaper nor a parent-death signal: commands keep a process group of
their own (a process group tree on Windows) that is stopped when the call ends, and the leftovers of a
dead worker are killed at its next start, by the same marker.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stigmer.sandbox.policy import Policy

log = logging.getLogger(__name__)

OWNER_ENV = "STIGMER_TOOL_OWNER"
GUARDIAN = Path(__file__).with_name("guardian.py")


def mechanism(platform: str = sys.platform) -> str | None:
    """How tool processes are kept from outliving the worker here: "guardian" (Linux), or None."""
    return "guardian" if platform.startswith("linux") else None


def why_not(platform: str = sys.platform) -> str:
    """Why there is no guardian on this platform ("" when there is one)."""
    if mechanism(platform):
        return ""
    return (
        f"{platform} has no child subreaper nor parent-death signal: a command's process group is stopped "
        "when its call ends, and what a dead worker left running is killed at the worker's next start"
    )


def available() -> bool:
    return mechanism() is not None and bool(sys.executable) and GUARDIAN.is_file()


def guarded_argv(argv: list[str], *, grace: float, policy: Policy | None = None) -> list[str]:
    """argv run under a guardian (see the module's docstring). `grace`: the seconds between SIGTERM and
    SIGKILL when the guardian stops the command's tree; `policy`: the sandbox it runs in."""
    confined = ["--policy", policy.to_json()] if policy else []
    return [sys.executable, "-I", "-S", str(GUARDIAN), str(os.getpid()), f"{grace:g}", *confined, "--", *argv]


@functools.cache
def _owner(pid: int) -> str:
    from stigmer.services import record

    return f"{pid}:{record.create_time(pid) or 0.0:.2f}"


def owner() -> str:
    """This process's identity as tool processes carry it: <pid>:<create time>."""
    return _owner(os.getpid())


def marker() -> dict[str, str]:
    """The environment entry that marks a process as started for a tool by this worker."""
    return {OWNER_ENV: owner()}


def _owner_alive(value: str) -> bool:
    from stigmer.services import record

    try:
        pid_text, _, started = value.partition(":")
        pid, create_time = int(pid_text), float(started)
    except ValueError:
        return True  # not ours to judge
    ident = record.identity(pid)
    return ident is not None and not ident.gone and abs(ident.create_time - create_time) < 0.05


def leftovers() -> list[tuple[int, str]]:
    """(pid, owner) of this user's processes marked as tool processes of a worker that is gone."""
    import psutil

    me, uid = os.getpid(), os.getuid() if hasattr(os, "getuid") else None
    alive: dict[str, bool] = {}
    found = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if uid is not None and p.uids().real != uid:
                continue
            value = p.environ().get(OWNER_ENV)
        except (psutil.Error, OSError):
            continue
        if not value:
            continue
        if value not in alive:
            alive[value] = _owner_alive(value)
        if not alive[value]:
            found.append((p.pid, value))
    return found


def kill_leftovers() -> int:
    """SIGKILL the tool processes of workers that are gone (the worker calls this as it starts); how many."""
    import psutil

    killed = 0
    for pid, value in leftovers():
        try:
            psutil.Process(pid).send_signal(signal.SIGKILL)
            killed += 1
            log.warning(
                "killed pid %d, left running by the tool call of a worker that is gone (%s)", pid, value
            )
        except psutil.Error:
            pass
    return killed


def setup() -> None:
    """At the worker's start: kill what a dead worker's tool calls left running; say how they are kept."""
    try:
        kill_leftovers()
    except Exception as e:  # noqa: BLE001 - a failed sweep must not stop the worker
        log.warning("could not look for processes left by an earlier worker: %s", e)
    if not available():
        log.info("tool processes: %s", why_not() or "no guardian (no Python executable to run it)")

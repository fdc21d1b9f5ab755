"""The guardian of one tool process (Linux): runs the command as its child and makes sure that nothing
of the command's process tree outlives it, or outlives the worker that started it.

    python -I -S guardian.py WORKER_PID GRACE [--policy POLICY_JSON] -- ARGV...

Started by stigmer.tools.procs (never imported by the worker: it runs with the standard library only,
under `python -I -S`, so it starts in a few tens of milliseconds). It

- makes itself a child subreaper (PR_SET_CHILD_SUBREAPER): whatever the command starts and leaves
  behind, also after `setsid` or a double fork, becomes the guardian's child when its parent exits,
  so the whole tree stays reachable;
- asks for SIGHUP when the worker (the thread that started it) dies (PR_SET_PDEATHSIG), and gives the
  command SIGKILL when the guardian itself dies; it exits at once if the worker died before it got
  that far;
- when the command exits, stops what it left behind (SIGTERM, SIGKILL after GRACE seconds), reaps it
  all, and exits as the command did (its exit code, or the same signal);
- on SIGTERM (the worker's timeout, or a stop): SIGTERM to the whole tree, SIGKILL after GRACE;
- on SIGHUP (the worker died, or wants it gone now): SIGKILL to the whole tree at once;
- with --policy, confines the command (stigmer/sandbox/linux.py) between fork and exec; the guardian
  itself stays outside, so that it can still see and stop everything the command starts. A policy that
  cannot be applied as required: one line on stderr, exit 126, and the command never runs.

Its own stdin, stdout and stderr are pointed at /dev/null once the command runs, so only the command
and its descendants hold the pipes the worker reads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
WATCHED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
KILL_EVERY = 0.1  # seconds between SIGKILL rounds while something is left
IDLE_WAIT = 3600.0


def children_of() -> dict[int, list[int]]:
    """Every process's children, from /proc (the ppid is the 2nd field after the command name)."""
    kids: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc: nothing to find (the worker then kills the process group)
        return kids
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def descendants(root: int) -> list[int]:
    kids = children_of()
    out: list[int] = []
    todo = [root]
    while todo:
        for child in kids.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def signal_tree(sig: int) -> None:
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except OSError:  # exited meanwhile (or not ours to signal)
            pass


def exit_like(status: int | None) -> None:
    """Exit as the command did: its exit code, or killed by the same signal."""
    if status is None:
        os._exit(128 + signal.SIGKILL)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the command's crash is not ours to dump
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def confine(policy: str) -> None:
    """Apply the sandbox policy to this process (the command's, before exec)."""
    # -I -S: the standard library only; the package root by os.path (pathlib would import re: ~10 ms)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
    from stigmer.sandbox import linux

    try:
        linux.apply(linux.loads(policy))
    except linux.SandboxError as e:
        os.write(2, f"error: the tool's sandbox could not be applied: {e}\n".encode(errors="replace"))
        os._exit(126)


def start(argv: list[str], libc: ctypes.CDLL, policy: str = "") -> int:
    guardian = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:  # the command: dies with the guardian, and starts with default signal handling
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != guardian:
            os._exit(128 + signal.SIGKILL)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)  # Python ignores these, and an exec keeps what is ignored
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if policy:
            confine(policy)
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"cannot run {argv[0]!r}: {e.strerror}\n".encode(errors="replace"))
        os._exit(127)
    except BaseException:  # noqa: BLE001 - never return into the guardian's code in the child
        os._exit(127)
    raise AssertionError("unreachable")


def main(args: list[str]) -> None:
    worker, grace = int(args[0]), float(args[1])
    policy = ""
    if len(args) > 4 and args[2] == "--policy":
        policy, args = args[3], [*args[:2], *args[4:]]
    argv = args[3:] if len(args) > 3 and args[2] == "--" else []
    if not argv:
        os.write(2, b"usage: guardian.py WORKER_PID GRACE [--policy JSON] -- ARGV...\n")
        os._exit(2)
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # taken with sigtimedwait, never as handlers
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.write(2, b"cannot become a child subreaper\n")
        os._exit(126)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0)
    if os.getppid() != worker:  # the worker died before we were set up: start nothing
        os._exit(128 + signal.SIGKILL)
    command = start(argv, libc, policy)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    status: int | None = None  # the command's wait status, once it has exited
    kill_at: float | None = None  # SIGKILL whatever is left from then on
    while True:
        while True:  # reap: the command, and whatever was left to us
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # nothing left at all
                exit_like(status)
                return
            if pid == 0:
                break
            if pid == command:
                status = st
        now = time.monotonic()
        if status is not None and kill_at is None:  # the command is done: stop what it left behind
            signal_tree(signal.SIGTERM)
            kill_at = now + grace
        if kill_at is not None and now >= kill_at:
            signal_tree(signal.SIGKILL)
            kill_at = now + KILL_EVERY  # again, in case something was forking meanwhile
        wait = IDLE_WAIT if kill_at is None else max(0.0, kill_at - now)
        got = signal.sigtimedwait(WATCHED, wait)
        if got is None or got.si_signo == signal.SIGCHLD:
            continue
        if got.si_signo == signal.SIGHUP:  # the worker died (or wants everything gone now)
            signal_tree(signal.SIGKILL)
            kill_at = time.monotonic() + KILL_EVERY
        elif kill_at is None:  # SIGTERM or SIGINT: stop gracefully
            signal_tree(signal.SIGTERM)
            kill_at = time.monotonic() + grace


if __name__ == "__main__":
    main(sys.argv[1:])

"""Run one command for an agent in its workspace, and leave nothing behind.

- An argv list, never a shell: a string is refused unless the agent file sets allow_shell_string, and
  then it runs as ["sh", "-c", command] (still an argv; never shell=True).
- The environment comes from an allow-list (stigmer.services.env.child_env): API keys and tokens
  (STIGMER_LLM_API_KEY, OPENAI_API_KEY, HF_TOKEN, ...) never reach the command. Proxy variables are
  passed on, unless they carry a password.
- stdin is /dev/null, stdout and stderr share one pipe (interleaved as a terminal shows them).
- Linux: the command runs under a guardian (stigmer.tools.procs), a child subreaper in a session of its
  own, so that its whole process tree (also what moved to another session with setsid, or double
  forked) is stopped when the command exits, at the deadline (SIGTERM, then SIGKILL after TERM_GRACE
  seconds), and at once when the worker dies, even by SIGKILL. A tool call does not leave daemons
  behind, and a command of a dead worker does not go on.
- Elsewhere the command gets its own session and process group (POSIX; a new process group on
  Windows), which is stopped the same way; a process that moves itself into another session escapes
  that (we stop reading its output DRAIN_AFTER_EXIT seconds after the command ends), and is killed
  when a worker starts next (stigmer.tools.procs.kill_leftovers). On Windows, processes left behind
  after a normal exit are not tracked (that would need a job object).
- Output is read as it comes. Past max_output, the first and last halves are kept and the middle is
  counted and dropped, so memory stays bounded; the command is *not* killed for talking too much (a
  verbose build should still finish and report its real exit code). A command that prints forever
  therefore runs until its timeout.

- With a policy (stigmer/sandbox: Linux, applied by the guardian between fork and exec), the command
  and all it starts may read and write only what the policy lists, reach only its network, and none of
  the system calls tools never need. Without one, it runs as the user, with the user's files.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from stigmer.services.env import PROXY, child_env
from stigmer.tools import procs
from stigmer.tools.errors import ToolFailure

if TYPE_CHECKING:
    from stigmer.sandbox.policy import Policy

log = logging.getLogger(__name__)

TERM_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
GUARDIAN_GRACE = TERM_GRACE - 0.5  # the guardian's, so that it is done before the worker would SIGKILL
DRAIN_AFTER_EXIT = 1.0  # seconds to keep reading output held open by a process that escaped the group
CHUNK = 64 * 1024
POLL = 0.05
CREATE_NEW_PROCESS_GROUP = 0x00000200  # Windows
_guardians: dict[int, bool] = {}  # pid -> whether it is a guardian (Linux), for the running commands


@dataclass(frozen=True)
class ShellResult:
    exit_code: int  # negative: killed by that signal (POSIX)
    output: str  # stdout and stderr interleaved, at most about max_output bytes plus notes
    timed_out: bool
    truncated: bool


def run(
    argv: list[str] | str,
    *,
    cwd: Path,
    timeout: float,
    max_output: int = 64_000,
    allow_shell_string: bool = False,
    environ: Mapping[str, str] | None = None,
    policy: Policy | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> ShellResult:
    """Run argv in `cwd` (the workspace root) with a deadline. `environ` is the environment the
    command's is drawn from (os.environ when None): only allow-listed, non-secret names pass;
    `extra_env` is added as given (its temporary folder, its proxy); `policy` confines it."""
    if timeout <= 0 or max_output < 1:
        raise ValueError("timeout must be positive and max_output at least 1")
    if not Path(cwd).is_dir():
        raise ValueError(f"cwd {cwd} is not a folder")
    command = command_argv(argv, allow_shell_string=allow_shell_string)
    env = {**command_env(environ), **(extra_env or {})}
    guarded = sys.platform != "win32" and procs.available()
    if guarded:  # the guardian starts the command: find it first, to say what is wrong as Popen would
        check_program(command[0], cwd=Path(cwd), path=env.get("PATH", os.defpath))
    log.debug("running %s in %s%s", command, cwd, " under a guardian" if guarded else "")
    try:
        proc = subprocess.Popen(
            procs.guarded_argv(command, grace=GUARDIAN_GRACE, policy=policy)
            if guarded
            else _confined(command, policy),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            close_fds=True,
            **popen_options(),
        )
    except FileNotFoundError:
        hint = " (shell strings need sh)" if isinstance(argv, str) else ""
        raise ToolFailure(f"command not found: {command[0]!r}{hint}") from None
    except PermissionError:
        raise ToolFailure(f"{command[0]!r} cannot be run: permission denied") from None
    except OSError as e:
        raise ToolFailure(f"could not start {command[0]!r}: {e.strerror or e}") from None
    _guardians[proc.pid] = guarded
    out = _Output(max_output)
    deadline = time.monotonic() + timeout
    try:
        timed_out = (
            _run_windows(proc, out, deadline) if sys.platform == "win32" else _run_posix(proc, out, deadline)
        )
    except BaseException:  # a bug or an interrupt here must not leave the command running
        _kill_now(proc)
        raise
    finally:
        _guardians.pop(proc.pid, None)
    output = out.text()
    if timed_out:
        output += f"\n[timed out after {timeout:g}s: the command and the processes it started were stopped]"
    code = proc.returncode if proc.returncode is not None else -9  # as if killed (SIGKILL)
    return ShellResult(exit_code=code, output=output, timed_out=timed_out, truncated=out.truncated)


def _confined(command: list[str], policy: Policy | None) -> list[str]:
    """Without a guardian (macOS, Windows): the platform's own confinement, if any."""
    if policy is None:
        return command
    from stigmer.sandbox.call import confined_argv

    return confined_argv(command, policy)


def command_argv(argv: object, *, allow_shell_string: bool) -> list[str]:
    """The argv to start, or a ToolFailure telling the model what to send instead."""
    if isinstance(argv, str):
        if not allow_shell_string:
            raise ToolFailure(
                'pass the command as a list of arguments, such as ["ls", "-l", "src"]; '
                "shell command strings are not enabled for this agent"
            )
        if not argv.strip():
            raise ToolFailure("the command is empty")
        return command_argv(["sh", "-c", argv], allow_shell_string=False)
    if not isinstance(argv, list | tuple) or not argv:
        raise ToolFailure('pass the command as a non-empty list of arguments, such as ["ls", "-l"]')
    if not all(isinstance(a, str) for a in argv):
        raise ToolFailure("every argument must be text")
    if not argv[0]:
        raise ToolFailure("the program name (the first argument) is empty")
    if any("\x00" in a for a in argv):
        raise ToolFailure("an argument contains a NUL byte")
    try:
        for a in argv:
            os.fsencode(a)
    except UnicodeEncodeError:
        raise ToolFailure("an argument is not valid text (it holds an unpaired surrogate)") from None
    return list(argv)


def command_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's environment: child_env's allow-list plus proxies (not those with a password),
    settings that keep programs from waiting for a terminal nobody is at, and the mark of this worker
    (stigmer.tools.procs: what a dead worker left running is found by it)."""
    env = child_env(PROXY, environ=environ)
    for name in PROXY:
        value = env.get(name, "")
        if "@" in (urlsplit(value).netloc if "://" in value else value):
            del env[name]  # http://user:password@proxy:3128 is a secret too
    env.update({"PAGER": "cat", "GIT_PAGER": "cat", "GIT_TERMINAL_PROMPT": "0", **procs.marker()})
    return env


def check_program(program: str, *, cwd: Path, path: str) -> None:
    """A ToolFailure, as Popen's errors read, when `program` cannot be run (looked up as execvp does)."""
    if os.sep in program or (os.altsep and os.altsep in program):
        candidates = [cwd / program]
    else:
        candidates = [Path(d or ".") / program for d in path.split(os.pathsep)]
        candidates = [c if c.is_absolute() else cwd / c for c in candidates]
    found = [c for c in candidates if c.exists()]
    if any(c.is_file() and os.access(c, os.X_OK) for c in found):
        return
    if not found:
        raise ToolFailure(f"command not found: {program!r}")
    raise ToolFailure(f"{program!r} cannot be run: permission denied")


def popen_options(platform: str = sys.platform) -> dict[str, Any]:
    """Popen keyword arguments that give the command a process group of its own."""
    if platform == "win32":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}  # a new session and group; no controlling terminal either


class _Output:
    """The first and last halves of at most `limit` bytes; the middle is counted, not kept."""

    def __init__(self, limit: int) -> None:
        self.head_cap = limit - limit // 2
        self.tail_cap = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.lock = threading.Lock()  # the Windows reader thread adds while the caller may read

    def add(self, data: bytes) -> None:
        with self.lock:
            self.total += len(data)
            room = self.head_cap - len(self.head)
            if room > 0:
                self.head += data[:room]
                data = data[room:]
            if data and self.tail_cap:
                self.tail += data[-self.tail_cap :]
                if len(self.tail) > self.tail_cap:
                    del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > self.head_cap + self.tail_cap

    def text(self) -> str:
        with self.lock:
            if not self.truncated:
                return (self.head + self.tail).decode("utf-8", "replace")
            dropped = self.total - len(self.head) - len(self.tail)
            head = self.head.decode("utf-8", "replace")
            tail = self.tail.decode("utf-8", "replace")
        return f"{head}\n[... {dropped} bytes of output omitted ...]\n{tail}"


def _run_posix(proc: subprocess.Popen[bytes], out: _Output, deadline: float) -> bool:
    """Read until the command ends or the deadline; stop its group; True when it timed out."""
    assert proc.stdout is not None
    pipe = proc.stdout
    timed_out = _read_until(pipe, out, deadline, proc=proc)
    if not timed_out:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True  # it closed its output but kept running
    if _guardians.get(proc.pid):
        _stop_guardian(proc, signal.SIGTERM)  # it stops the whole tree, then exits
    _stop_group(proc.pid, proc)
    # What is still in the pipe; a process that escaped the group may hold it open, so not forever.
    _read_until(pipe, out, time.monotonic() + DRAIN_AFTER_EXIT, proc=None)
    pipe.close()
    return timed_out


def _read_until(
    pipe: IO[bytes], out: _Output, deadline: float, *, proc: subprocess.Popen[bytes] | None
) -> bool:
    """Read into `out` until end of file, the deadline (returns True) or, when `proc` is given, its exit
    (the rest is read after its group is stopped: a background child may hold the pipe open)."""
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            if proc is not None and proc.poll() is not None:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if selector.select(min(left, POLL)):
                try:
                    chunk = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    return False  # every writer has closed it
                out.add(chunk)


def _stop_group(pgid: int, proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group, SIGKILL to whatever is left after TERM_GRACE; reap our child."""
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGTERM)
        end = time.monotonic() + TERM_GRACE
        while time.monotonic() < end and _group_alive(pgid):
            proc.poll()  # reap the leader as soon as it exits, so it does not count as alive
            time.sleep(POLL)
        if _group_alive(pgid):
            log.debug("process group %d outlived SIGTERM; killing it", pgid)
            _signal_group(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # stuck in the kernel (a dead NFS mount): nothing more to do
        log.warning("pid %d did not exit after SIGKILL", proc.pid)


def _stop_guardian(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Ask the guardian to stop the command's tree (SIGTERM: gracefully; SIGHUP: at once) and wait for it
    to be done; should it not be, its process group is killed (the command's group)."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=TERM_GRACE + 3)
        except subprocess.TimeoutExpired:
            log.warning("the guardian of pid %d did not stop the command; killing its group", proc.pid)
            _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in the group. Zombies count for killpg(pgid, 0), and an
    init that does not reap (some containers) would keep them around forever."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil

    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _run_windows(proc: subprocess.Popen[bytes], out: _Output, deadline: float) -> bool:
    """Windows cannot select() on a pipe: a thread reads; psutil stops the process tree at the deadline."""
    assert proc.stdout is not None
    pipe = proc.stdout

    def pump() -> None:
        while chunk := os.read(pipe.fileno(), CHUNK):
            out.add(chunk)

    reader = threading.Thread(target=pump, name="shell-output", daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_tree(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not exit after being killed", proc.pid)
    reader.join(DRAIN_AFTER_EXIT)
    return timed_out


def _kill_now(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's group (its tree on Windows) at once; for when we are failing ourselves."""
    if sys.platform == "win32":
        _stop_tree(proc.pid)
    elif _guardians.get(proc.pid):
        _stop_guardian(proc, signal.SIGHUP)  # SIGKILL to the whole tree, setsid'd processes included
    else:
        _signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("pid %d did not exit after SIGKILL", proc.pid)


def _stop_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=TERM_GRACE)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass

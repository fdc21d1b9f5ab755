"""Starting and stopping detached services: argv lists only, never a shell."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from stigmer.errors import ErrorCode, StigmerError
from stigmer.fsutil import PRIVATE_FILE
from stigmer.services import record as records
from stigmer.services.record import ProcessRecord

log = logging.getLogger(__name__)

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
# Every service is started with this umask, so what it creates is private whatever the user's umask:
# Temporal's temporal.db, the worker's health stamp, the files the tools and shell commands write.
PRIVATE_UMASK = 0o077

# Windows: CREATE_NEW_PROCESS_GROUP | DETACHED_PROCESS | CREATE_NO_WINDOW, as the seed asks, so the
# service survives the console closing and Ctrl-C in the CLI's console does not reach it.
CREATE_NEW_PROCESS_GROUP = 0x00000200
DETACHED_PROCESS = 0x00000008
CREATE_NO_WINDOW = 0x08000000


def detach_options(platform: str = sys.platform) -> dict[str, Any]:
    """Popen keyword arguments that detach a child from the CLI on this platform."""
    if platform == "win32":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | DETACHED_PROCESS | CREATE_NO_WINDOW}
    return {"start_new_session": True}  # its own session and process group: no SIGHUP/SIGINT from us


def _copy_tail(source: IO[bytes], target: IO[bytes], max_bytes: int) -> None:
    """Copy the last max_bytes of `source` as it is now (from the start of a line): a rotated log holds
    the cap however much the service wrote between two checks, and however fast it writes meanwhile."""
    end = source.seek(0, os.SEEK_END)
    start = max(0, end - max_bytes)
    source.seek(start)
    if start:
        start += len(source.readline(max_bytes))
    left = end - start
    while left > 0 and (chunk := source.read(min(left, 1 << 20))):
        target.write(chunk)
        left -= len(chunk)


def _cap(path: Path, max_bytes: int) -> None:
    """Keep only the last max_bytes of a rotated log."""
    with contextlib.suppress(OSError):
        if path.stat().st_size <= max_bytes:
            return
        part = path.with_name(f"{path.name}.part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        with path.open("rb") as source, os.fdopen(fd, "wb") as target:
            _copy_tail(source, target, max_bytes)
        os.replace(part, path)


def rotate_log(
    path: Path, *, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS, cap: int = LOG_MAX_BYTES
) -> None:
    """Rotate llm.log -> llm.log.1 -> ... when it has grown past max_bytes (done at each start); a
    rotated file keeps at most the newest `cap` bytes."""
    try:
        if path.stat().st_size < max_bytes:
            return
    except FileNotFoundError:
        return
    for i in range(backups - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))
    with contextlib.suppress(OSError):
        path.with_name(f"{path.name}.1").chmod(PRIVATE_FILE)  # a log of an earlier version may be 0644
    _cap(path.with_name(f"{path.name}.1"), cap)


def rotate_running(
    path: Path, *, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS, cap: int = LOG_MAX_BYTES
) -> bool:
    """Rotate a log that a running service still writes to: copy it aside, then truncate it in place.

    The service keeps its file open in append mode, so after the truncation its next line lands at the
    start of the emptied file. A line written between the copy and the truncation can be lost, as with
    logrotate's copytruncate; renaming instead would leave the service writing to the rotated file.
    The copy keeps the newest `cap` bytes: the cap holds, however much was written since the last check.
    """
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(backups - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
    rotated = path.with_name(f"{path.name}.1")
    with path.open("rb") as source:
        fd = os.open(rotated, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)  # not 0644 by the umask
        with os.fdopen(fd, "wb") as target:
            if hasattr(os, "fchmod"):  # an existing one keeps its mode otherwise
                os.fchmod(fd, PRIVATE_FILE)
            _copy_tail(source, target, cap)
    with path.open("r+b") as f:
        f.truncate(0)
    return True


def start_detached(
    argv: list[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    pid_path: Path | None,
    service: str,
    info: dict[str, Any],
    cwd: Path | None = None,
    pass_fds: tuple[int, ...] = (),
    stdin_pipe: bool = False,
    secrets_by_pipe: bool = False,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Spawn argv detached, output appended to log_path; its record is written to pid_path (if given).
    `stdin_pipe`: its stdin is a pipe from us (to say one thing at start), not /dev/null.
    `secrets_by_pipe`: the secrets in `env` go through a pipe, not the child's environment, which any
    process of the user can read (services.secret_pipe; POSIX, for our own Python processes)."""
    from stigmer.services import secret_pipe

    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    rotate_log(log_path)
    log.debug("starting %s: %s", service, argv)
    child_env, fds, secrets_fd = dict(env), tuple(pass_fds) if os.name != "nt" else (), None
    if secrets_by_pipe and secret_pipe.supported():
        child_env, hidden = secret_pipe.split(env)
        if hidden:
            secrets_fd = secret_pipe.send(hidden)
            child_env[secret_pipe.ENV] = str(secrets_fd)
            fds = (*fds, secrets_fd)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    with os.fdopen(fd, "ab") as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
                close_fds=True,
                pass_fds=fds,
                umask=PRIVATE_UMASK,  # POSIX (Windows ignores it)
                **detach_options(),
            )
        except OSError as e:
            raise StigmerError(
                f"Could not start the {service} process {argv[0]}: {e.strerror}.",
                hint="Check that the file exists and is executable.",
                code=ErrorCode.START_FAILED,
            ) from e
        finally:
            if secrets_fd is not None:
                os.close(secrets_fd)  # the child has its copy; the data waits in the pipe for it
    ctime = records.create_time(proc.pid) or time.time()
    with contextlib.suppress(OSError):
        log_path.chmod(PRIVATE_FILE)  # a log written by an earlier version may still be 0644
    rec = ProcessRecord(proc.pid, ctime, list(argv), service, info)
    if pid_path is not None:
        records.write(pid_path, rec)
    return proc, rec


def stop(rec: ProcessRecord, *, timeout: float = 10.0) -> bool:
    """Terminate our process (and its process group on POSIX), wait with a deadline, then kill.

    Returns False when the record does not name our live process: nothing is signalled then.
    """
    import psutil

    if not records.is_ours(rec):
        return False
    try:
        proc = psutil.Process(rec.pid)
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return True
    _signal(rec.pid, signal.SIGTERM)
    alive = wait_gone([proc, *children], timeout=timeout)
    for p in alive:
        log.warning("pid %s did not stop in %.0fs; killing it", p.pid, timeout)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    wait_gone(alive, timeout=5)
    return True


def wait_gone(procs: list[Any], *, timeout: float) -> list[Any]:
    """Wait until the processes have exited; the ones still running at the deadline.

    A process that exited but is not reaped yet (a zombie) counts as gone: detached services are
    children of PID 1, which may reap them late (~2 s measured here) or, in some containers, never.
    Only once all its threads have exited, though: a zombie main thread whose other threads are still
    ending (llama.cpp's) still holds the process's files and ports.
    """
    import psutil

    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE or p.num_threads() > 1:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        if sys.platform != "win32" and os.getpgid(pid) == pid:
            os.killpg(pid, sig)  # the whole group we created: the runtime and its runners
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass

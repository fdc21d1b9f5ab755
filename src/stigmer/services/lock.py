"""One start or stop at a time per STIGMER_HOME, and one daemon.

Two `stigmer server` run at the same moment would each see nothing running and each start a server;
the loser's clean-up could then remove the winner's pid record. Every command that starts or stops
services holds the control lock while it does; the daemon holds its own lock for its whole life.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths

WAIT = 15 * 60.0  # a first start may download a runtime and a model while holding it


@contextmanager
def held(path: Path, *, wait: float = 0.0, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """An exclusive lock on `path` (a file lock, released if the process dies): True while held, or
    False when it was not free within `wait` seconds (0: one try). `on_wait` is called before waiting."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = FileLock(str(path), mode=0o600)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if wait <= 0:
            yield False
            return
        if on_wait is not None:
            on_wait()
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            yield False
            return
    try:
        yield True
    finally:
        lock.release()


@contextmanager
def control_lock(
    paths: Paths, *, timeout: float = WAIT, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    paths.ensure(paths.run_dir)
    with held(paths.lock_file, wait=timeout, on_wait=on_wait) as got:
        if not got:
            raise StigmerError(
                f"Another stigmer command has been starting or stopping the server for {timeout / 60:.0f} "
                "minutes.",
                hint=f"Wait for it to finish, or stop it (the lock is {paths.lock_file}).",
                code=ErrorCode.BUSY,
            )
        yield


@contextmanager
def try_control_lock(paths: Paths) -> Iterator[bool]:
    """The control lock if it is free now (True), else False at once: for work that can wait a round."""
    paths.ensure(paths.run_dir)
    with held(paths.lock_file) as got:
        yield got

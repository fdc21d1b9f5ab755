"""One start or stop at a time per STIGMER_HOME.

Two `stigmer server` run at the same moment would each see nothing running and each start a server;
the loser's clean-up could then remove the winner's pid record. Every command that starts or stops
services holds this exclusive lock while it does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths

WAIT = 15 * 60.0  # a first start may download a runtime and a model while holding it


@contextmanager
def control_lock(
    paths: Paths, *, timeout: float = WAIT, on_wait: Callable[[], None] | None = None
) -> Iterator[None]:
    from filelock import FileLock, Timeout

    paths.ensure(paths.run_dir)
    lock = FileLock(str(paths.lock_file), mode=0o600)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise StigmerError(
                f"Another stigmer command has been starting or stopping the server for {timeout / 60:.0f} "
                "minutes.",
                hint=f"Wait for it to finish, or stop it (the lock is {paths.lock_file}).",
                code=ErrorCode.BUSY,
            ) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def try_control_lock(paths: Paths) -> Iterator[bool]:
    """The control lock if it is free now (True), else False at once: for work that can wait a round."""
    from filelock import FileLock, Timeout

    paths.ensure(paths.run_dir)
    lock = FileLock(str(paths.lock_file), mode=0o600)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()

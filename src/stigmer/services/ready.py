"""Waiting for a service to answer, with a deadline that reports the log tail on failure."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError
from stigmer.fsutil import tail

# Poll every 10 ms for the first seconds (servers here are ready in 0.1-0.5 s, and each probe costs
# ~1 ms), then back off to 100 ms for slow starts (a big model loading).
FIRST_INTERVAL = 0.01
FAST_PERIOD = 3.0
MAX_INTERVAL = 0.1


def wait_ready(
    probe: Callable[[], bool],
    *,
    proc: subprocess.Popen[bytes] | None,
    what: str,
    log_path: Path,
    timeout: float = 30.0,
) -> float:
    """Call probe until it returns True; return the seconds waited. Fails early if proc exits."""
    start = time.monotonic()
    interval = FIRST_INTERVAL
    while True:
        if probe():
            return time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            raise _failed(f"The {what} exited during start-up (exit code {proc.returncode}).", log_path)
        if time.monotonic() - start > timeout:
            raise _failed(f"The {what} did not become ready within {timeout:.0f} seconds.", log_path)
        time.sleep(interval)
        if time.monotonic() - start > FAST_PERIOD:
            interval = min(interval * 1.5, MAX_INTERVAL)


def _failed(message: str, log_path: Path) -> StigmerError:
    lines = tail(log_path, 15)
    shown = "\n".join(f"  {line}" for line in lines) if lines else "  (the log is empty)"
    return StigmerError(
        message,
        hint=f"Last lines of {log_path}:\n{shown}\n\nSee the whole log: {log_path}",
        code=ErrorCode.START_FAILED,
    )

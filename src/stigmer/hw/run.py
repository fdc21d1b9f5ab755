"""The one way hardware probes run a program: an argv list (never a shell), no stdin, a deadline.

Probes such as nvidia-smi can hang (a wedged driver, a GPU fallen off the bus), so every run has a
timeout and on expiry the program and everything it started are killed: the child runs in its own
process group (session) and the whole group gets SIGKILL. Only processes we started are touched.

Detectors take a `Run` so that tests feed them captured outputs; `run_probe` is the real one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

log = logging.getLogger(__name__)

# (argv, timeout in seconds) -> (exit code, stdout, stderr); raises TimeoutError past the deadline and
# OSError when the program cannot be started.
Run = Callable[[Sequence[str], float], tuple[int, str, str]]

DEFAULT_TIMEOUT = 5.0
_REAP_TIMEOUT = 1.0  # after SIGKILL: the pipes close as soon as the group is gone


def run_probe(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    import subprocess  # not at import time: the CLI's start-up budget is tight

    env = dict(os.environ)
    env.update(LC_ALL="C", LANG="C")  # numbers and messages in one format, whatever the user's locale
    if sys.platform == "win32":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        flags = 0
    log.debug("probe: %s (timeout %.1f s)", list(argv), timeout)
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=sys.platform != "win32",  # its own process group: a kill reaches its children
        creationflags=flags,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            proc.communicate(timeout=_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # A descendant left the group (setsid) and holds the pipes, or the program is stuck in the
            # kernel (a wedged GPU driver) where even SIGKILL waits: stop reading and give up on it.
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            try:
                proc.wait(timeout=_REAP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("probe %s (pid %d) survived SIGKILL; left behind", argv[0], proc.pid)
        raise TimeoutError(f"{argv[0]} did not answer within {timeout:g} s") from None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if sys.platform == "win32":
        proc.kill()
        return
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created for it: its pid is the group id
    except ProcessLookupError:
        pass  # already gone

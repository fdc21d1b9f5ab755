"""Secrets handed to our own child processes through an inherited pipe, never in their environment.

Any process of the user can read /proc/<pid>/environ, and what it shows is the environment block the
process was started with (exec's copy on its stack), not what the process sets later. So the spawner
keeps secret entries (services.env.is_secret_name: the LLM key, provider keys, the API token) out of
the child's environment, writes them as JSON into a pipe whose read end the child inherits (its number
in STIGMER_SECRETS_FD), and the child, first thing in its entry point, reads them, closes the pipe and
puts them into os.environ, where the code that reads settings finds them as before.

The parent keeps its secrets in memory (its own os.environ, filled the same way), so a service the
supervisor restarts gets them again.

protect() then makes the process not dumpable: other processes of the user can no longer read its
memory (/proc/<pid>/mem, which holds the keys now), its open files or its environ, nor ptrace it. What
the supervisor and `stigmer server` read of a process (/proc/<pid>/stat, status, cmdline: create
time, state, command line, children) stays readable by all, so identity checks are unaffected;
measured: /proc/self/environ and /proc/self/io become unreadable to the process itself, which reads
neither. Its children get dumpable back at exec (tools run through the launcher, which Landlock
confines instead).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping, MutableMapping

from stigmer.services.env import is_secret_name

ENV = "STIGMER_SECRETS_FD"
MAX_BYTES = 16 * 1024  # what any pipe holds without a reader (macOS's smallest buffer): a few keys fit
PR_SET_DUMPABLE = 4


def supported() -> bool:
    return os.name == "posix"


def split(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the environment without secrets, the secrets)."""
    public: dict[str, str] = {}
    hidden: dict[str, str] = {}
    for name, value in env.items():
        if name == ENV:
            continue  # a pipe of ours that a parent forgot to read: never passed on
        (hidden if is_secret_name(name) else public)[name] = value
    return public, hidden


def send(secrets: Mapping[str, str]) -> int:
    """A pipe holding `secrets` as JSON, its write end closed: the read end, for the child to inherit
    (the caller closes it once the child is started)."""
    data = json.dumps(dict(secrets)).encode()
    if len(data) > MAX_BYTES:
        raise ValueError(f"secrets of {len(data)} bytes do not fit a pipe's buffer ({MAX_BYTES})")
    read_fd, write_fd = os.pipe()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(write_fd, view) :]
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


def receive(environ: MutableMapping[str, str] | None = None) -> int:
    """In the child, first thing: read the secrets the parent sent, close the pipe and put them into
    `environ` (os.environ). How many; 0 when none were sent."""
    env = os.environ if environ is None else environ
    raw = env.pop(ENV, "")
    if not raw.isdigit():
        return 0
    fd = int(raw)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return 0  # not an open pipe (a copy of the variable outside a spawn): nothing to read
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    secrets = json.loads(b"".join(chunks) or b"{}")
    for name, value in secrets.items():
        env[str(name)] = str(value)
    return len(secrets)


def protect() -> bool:
    """Make this process not dumpable (Linux): see the module's docstring. False where not applied."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def start_child() -> None:
    """The first lines of our services' entry points (the daemon, the agent runner, the API)."""
    receive()
    protect()

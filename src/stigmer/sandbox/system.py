"""Locations every policy starts from: the system folders a program needs to run (read-only), the
devices every program may use, and the secrets no policy may open up.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

# Read-only for everyone: programs, libraries, configuration, the kernel's views of processes.
SYSTEM_READ = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/proc", "/sys",
    "/nix/store", "/snap", "/run/systemd/resolve", "/run/resolvconf", "/var/lib/ca-certificates",
)  # fmt: skip
# Devices any program may read and write; never /dev as a whole (a disk read bypasses every rule).
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/fd")
# GPUs, for the engine.
GPU_DEVICES = (
    "/dev/nvidia0",
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/dri",
    "/dev/kfd",
)
# Under the user's home: what holds keys and tokens (never readable by a tool unless named on purpose).
HOME_SECRETS = (
    ".ssh", ".aws", ".config", ".gnupg", ".docker", ".kube", ".azure", ".netrc", ".git-credentials",
    ".password-store", ".local/share/keyrings", ".pypirc", ".npmrc",
)  # fmt: skip


def python_read() -> tuple[str, ...]:
    """This Python's installation (the launcher and the engine run with it)."""
    return tuple(dict.fromkeys(os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)))


def system_read() -> tuple[str, ...]:
    """SYSTEM_READ that exists here, plus this Python."""
    return tuple(p for p in SYSTEM_READ if os.path.exists(p)) + python_read()


def secret_locations(stigmer_home: Path, home: Path | None = None) -> tuple[str, ...]:
    """Stigmer's home (the API token, the payload key, config.yaml) and the user's secret folders."""
    home = home or Path.home()
    return (str(stigmer_home), *(str(home / name) for name in HOME_SECRETS))


def contains(outer: str, inner: str) -> bool:
    """Whether `inner` is `outer` or below it (paths compared as given, both absolute)."""
    outer = outer.rstrip(os.sep) or os.sep
    return inner == outer or inner.startswith(outer if outer.endswith(os.sep) else outer + os.sep)


def path_dirs(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The PATH's folders, real and existing (a tool finds its programs there)."""
    out = []
    for entry in environ.get("PATH", os.defpath).split(os.pathsep):
        if entry and os.path.isabs(entry) and os.path.isdir(entry):
            out.append(os.path.realpath(entry))
    return tuple(dict.fromkeys(out))

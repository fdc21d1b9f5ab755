"""`stigmer server enable --system` / `disable --system` (Linux, root): the server as a system service run
by a dedicated user, for hosts with several people on them.

Each user's own `stigmer server` runs as that user, so its tools are held by the sandbox alone (Landlock,
seccomp: see stigmer.sandbox). Run as a system user `stigmer` instead, everything it starts (the LLM,
Temporal, the agent runner, the tools) cannot read any person's files at all, whatever the sandbox gives
on this kernel, and systemd adds its own walls around it:

- NoNewPrivileges=yes, ProtectSystem=strict (the whole system read-only) with ReadWritePaths= its home
  only, ProtectHome=yes (/home, /root and /run/user are not there), PrivateTmp=yes, and the kernel's
  tunables, modules, logs and control groups protected.
- PrivateDevices=no, on purpose: a private /dev has no GPU (/dev/nvidia*, /dev/dri, /dev/kfd), and the
  Local LLM runtime would fall back to the CPU without saying why. The sandbox still gives each tool
  only the devices its policy names.

The user is created with useradd (a system account, home /var/lib/stigmer, no login shell), once: an
existing one is kept. `disable --system` removes the unit and keeps the user and its data (models,
history), saying how to remove them. Every command is an argv list run through one runner, which tests
replace; nothing goes through a shell.
"""

from __future__ import annotations

import os
import pwd
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError
from stigmer.fsutil import atomic_write
from stigmer.server.autostart import Runner, _run, server_argv

USER = "stigmer"
HOME = Path("/var/lib/stigmer")
UNIT = "stigmer.service"
UNIT_DIR = Path("/etc/systemd/system")
NOLOGIN = "/usr/sbin/nologin"
# Where ProtectHome=yes leaves nothing: a Python installed under one cannot run as the service.
HIDDEN = ("/home", "/root", "/run/user")

UserExists = Callable[[str], bool]


@dataclass(frozen=True)
class SystemService:
    unit: Path  # the unit file written (or removed)
    commands: list[list[str]]  # what was run, in order
    user_created: bool = False


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def unit_text(argv: Sequence[str], home: Path = HOME, user: str = USER) -> str:
    """The system unit: the same daemon command as the per-user unit, as `user`, hardened."""
    exec_start = " ".join(shlex.quote(a) for a in argv)
    return (
        "[Unit]\n"
        "Description=Stigmer server (local LLM, Temporal, agent runner, API) as a dedicated user\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"User={user}\n"
        f"Group={user}\n"
        f"ExecStart={exec_start}\n"
        f'Environment="STIGMER_HOME={home}" "HOME={home}"\n'
        f"WorkingDirectory={home}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "TimeoutStopSec=90\n"
        "KillMode=mixed\n"
        "# Hardening: nothing writable but its home, no one's home visible, no privilege to gain.\n"
        "NoNewPrivileges=yes\n"
        "ProtectSystem=strict\n"
        f"ReadWritePaths={home}\n"
        "ProtectHome=yes\n"
        "PrivateTmp=yes\n"
        "# Not a private /dev: it would hide the GPU (/dev/nvidia*, /dev/dri, /dev/kfd) from the Local LLM.\n"
        "PrivateDevices=no\n"
        "ProtectKernelTunables=yes\n"
        "ProtectKernelModules=yes\n"
        "ProtectKernelLogs=yes\n"
        "ProtectControlGroups=yes\n"
        "RestrictSUIDSGID=yes\n"
        "LockPersonality=yes\n"
        "UMask=0077\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def useradd_argv(user: str = USER, home: Path = HOME) -> list[str]:
    return [
        "useradd", "--system", "--user-group", "--home-dir", str(home), "--create-home",
        "--shell", NOLOGIN, "--comment", "Stigmer server", user,
    ]  # fmt: skip


def _require_root(platform: str, euid: int) -> None:
    if not platform.startswith("linux"):
        raise StigmerError(
            f"`--system` (a system service run by a dedicated user) is for Linux with systemd, not {platform}.",
            hint="Without --system: stigmer server enable (starts the server at your login).",
            code=ErrorCode.UNSUPPORTED,
        )
    if euid != 0:
        raise StigmerError(
            "`--system` creates a system user and a unit in /etc/systemd/system: it must run as root.",
            hint="sudo stigmer server enable --system   (or, for your user only: stigmer server enable)",
            code=ErrorCode.ACCESS_DENIED,
        )


def _check_python(python: str, prefix: str) -> None:
    """The service runs this Python as the `stigmer` user, with /home and /root hidden: refuse an
    installation it could not run, rather than a unit that fails at every start."""
    for path in (python, prefix):
        real = os.path.realpath(path)
        for hidden in HIDDEN:
            if path == hidden or path.startswith(hidden + "/") or real.startswith(hidden + "/"):
                raise StigmerError(
                    f"Stigmer is installed under {hidden} ({path}), which the system service cannot see "
                    "(ProtectHome=yes) nor, as the stigmer user, read.",
                    hint="Install it system-wide first, e.g.: python3 -m venv /opt/stigmer && "
                    "/opt/stigmer/bin/pip install stigmer && sudo /opt/stigmer/bin/stigmer server enable --system",
                    code=ErrorCode.UNSUPPORTED,
                )


def enable(
    *,
    runner: Runner = _run,
    user_exists: UserExists = _user_exists,
    platform: str = sys.platform,
    euid: int | None = None,
    unit_dir: Path = UNIT_DIR,
    python: str = sys.executable,
    prefix: str = sys.prefix,
) -> SystemService:
    """Create the user (unless there), write the unit, enable and start it. Raises StigmerError when not
    root, not Linux, this Python is out of the service's reach, or a command fails."""
    _require_root(platform, os.geteuid() if euid is None else euid)
    _check_python(python, prefix)
    done: list[list[str]] = []

    def run(cmd: list[str]) -> None:
        done.append(cmd)
        code = runner(cmd)
        if code != 0:
            raise StigmerError(
                f"`{' '.join(cmd)}` failed (exit code {code}).",
                hint="Run it yourself to see why; nothing after it was done.",
                code=ErrorCode.INSTALL_FAILED,
            )

    created = False
    if not user_exists(USER):
        run(useradd_argv())
        created = True
    unit = unit_dir / UNIT
    atomic_write(unit, unit_text(server_argv(python)).encode(), mode=0o644)  # no secret in it
    run(["systemctl", "daemon-reload"])
    run(["systemctl", "enable", "--now", UNIT])
    return SystemService(unit=unit, commands=done, user_created=created)


def disable(
    *,
    runner: Runner = _run,
    platform: str = sys.platform,
    euid: int | None = None,
    unit_dir: Path = UNIT_DIR,
) -> SystemService | None:
    """Stop and remove the unit; the user and its home stay. None when there was no unit."""
    _require_root(platform, os.geteuid() if euid is None else euid)
    unit = unit_dir / UNIT
    if not unit.exists():
        return None
    done = [["systemctl", "disable", "--now", UNIT]]
    runner(done[0])  # a unit already stopped or never enabled: removed all the same
    unit.unlink()
    done.append(["systemctl", "daemon-reload"])
    runner(done[-1])
    return SystemService(unit=unit, commands=done)

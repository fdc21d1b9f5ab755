"""`stigmer server enable|disable`: start the server at login with the platform's service manager.

Linux: a systemd user unit (~/.config/systemd/user/stigmer.service) running `stigmer server run`,
enabled with `systemctl --user enable --now`. macOS: a launchd agent
(~/Library/LaunchAgents/dev.stigmer.server.plist) loaded with `launchctl`. The files are built by pure
functions (unit-tested); the commands that register them go through one runner that tests replace.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError
from stigmer.fsutil import atomic_write
from stigmer.paths import Paths

UNIT = "stigmer.service"
LABEL = "dev.stigmer.server"

Runner = Callable[[Sequence[str]], int]


@dataclass(frozen=True)
class Autostart:
    path: Path  # the file written
    commands: list[list[str]]  # what registers it with the service manager


def server_argv(python: str = sys.executable) -> list[str]:
    return [python, "-m", "stigmer", "server", "run"]


def systemd_unit(argv: Sequence[str], home: Path) -> str:
    exec_start = " ".join(shlex.quote(a) for a in argv)
    return (
        "[Unit]\n"
        "Description=Stigmer server (local LLM, Temporal, agent runner, API)\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        f'Environment="STIGMER_HOME={home}"\n'
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "TimeoutStopSec=90\n"
        "KillMode=mixed\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def launchd_plist(argv: Sequence[str], home: Path, logs: Path) -> bytes:
    return plistlib.dumps(
        {
            "Label": LABEL,
            "ProgramArguments": list(argv),
            "EnvironmentVariables": {"STIGMER_HOME": str(home)},
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},
            "StandardOutPath": str(logs / "daemon.log"),
            "StandardErrorPath": str(logs / "daemon.log"),
            "ProcessType": "Background",
        }
    )


def plan(
    paths: Paths, *, platform: str = sys.platform, user_home: Path | None = None
) -> tuple[Autostart, bytes]:
    home = user_home or Path.home()
    argv = server_argv()
    if platform.startswith("linux"):
        unit_dir = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "systemd" / "user"
        path = unit_dir / UNIT
        commands = [
            ["systemctl", "--user", "daemon-reload"],
            ["systemctl", "--user", "enable", "--now", UNIT],
        ]
        return Autostart(path, commands), systemd_unit(argv, paths.home).encode()
    if platform == "darwin":
        path = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        commands = [["launchctl", "load", "-w", str(path)]]
        return Autostart(path, commands), launchd_plist(argv, paths.home, paths.logs_dir)
    raise StigmerError(
        f"Starting the server at login is not supported on {platform} yet.",
        hint="Run `stigmer server` after logging in, or add `stigmer server run` to your startup programs.",
        code=ErrorCode.UNSUPPORTED,
    )


def _run(argv: Sequence[str]) -> int:
    if shutil.which(argv[0]) is None:
        return 127
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=60).returncode


def enable(paths: Paths, *, runner: Runner = _run, platform: str = sys.platform) -> tuple[Autostart, bool]:
    """Write the unit and register it; (what, registered). Not registered: the file is there, the
    service manager was not reachable (no systemd user session, say)."""
    auto, content = plan(paths, platform=platform)
    auto.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(auto.path, content, mode=0o644)  # service managers read it; it holds no secret
    return auto, all(runner(cmd) == 0 for cmd in auto.commands)


def disable(paths: Paths, *, runner: Runner = _run, platform: str = sys.platform) -> Autostart | None:
    auto, _content = plan(paths, platform=platform)
    if not auto.path.exists():
        return None
    if platform.startswith("linux"):
        runner(["systemctl", "--user", "disable", UNIT])
    elif platform == "darwin":
        runner(["launchctl", "unload", "-w", str(auto.path)])
    auto.path.unlink()
    if platform.startswith("linux"):
        runner(["systemctl", "--user", "daemon-reload"])
    return auto

"""`stigmer server enable|disable --system`: the system unit's text, the commands it runs (through an
injected runner: nothing is installed here), refusal when not root or not Linux, and an installation
the service could not run."""

from __future__ import annotations

import argparse
import configparser
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from stigmer.cli import server_cmd
from stigmer.errors import ErrorCode, StigmerError
from stigmer.server import system_service as svc

PYTHON = "/opt/stigmer/bin/python"
REAL_ENABLE = svc.enable


class Recorder:
    def __init__(self, fail: str = "") -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> int:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)  # an argv, never a shell line
        self.calls.append(list(argv))
        return 1 if self.fail and self.fail in argv else 0


def enable(tmp_path: Path, runner: Recorder, *, exists: bool = False, **kw: object) -> svc.SystemService:
    args: dict[str, object] = dict(
        runner=runner, user_exists=lambda name: exists, platform="linux", euid=0, unit_dir=tmp_path,
        python=PYTHON, prefix="/opt/stigmer",
    )  # fmt: skip
    args.update(kw)
    return REAL_ENABLE(**args)  # type: ignore[arg-type]


def test_the_unit() -> None:
    text = svc.unit_text([PYTHON, "-m", "stigmer", "server", "run"])
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    s = unit["Service"]
    assert s["ExecStart"] == f"{PYTHON} -m stigmer server run"
    assert s["User"] == "stigmer" and s["Group"] == "stigmer"
    assert s["Environment"] == '"STIGMER_HOME=/var/lib/stigmer" "HOME=/var/lib/stigmer"'
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict" and s["ProtectHome"] == "yes"
    assert s["ReadWritePaths"] == "/var/lib/stigmer" and s["PrivateTmp"] == "yes"
    assert s["PrivateDevices"] == "no"  # the GPU stays visible to the Local LLM
    assert s["Restart"] == "on-failure" and s["KillMode"] == "mixed"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_exec_start_is_quoted() -> None:
    text = svc.unit_text(["/opt/my stigmer/bin/python", "-m", "stigmer", "server", "run"])
    assert "ExecStart='/opt/my stigmer/bin/python' -m stigmer server run" in text


def test_enable_creates_the_user_writes_the_unit_and_starts_it(tmp_path: Path) -> None:
    runner = Recorder()
    done = enable(tmp_path, runner)
    assert done.user_created and done.unit == tmp_path / "stigmer.service"
    assert runner.calls == [
        ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/stigmer", "--create-home",
         "--shell", "/usr/sbin/nologin", "--comment", "Stigmer server", "stigmer"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "stigmer.service"],
    ]  # fmt: skip
    assert done.commands == runner.calls
    assert done.unit.read_text() == svc.unit_text([PYTHON, "-m", "stigmer", "server", "run"])
    assert done.unit.stat().st_mode & 0o777 == 0o644


def test_enable_keeps_an_existing_user(tmp_path: Path) -> None:
    runner = Recorder()
    done = enable(tmp_path, runner, exists=True)
    assert not done.user_created and not any(c[0] == "useradd" for c in runner.calls)
    assert runner.calls[-1] == ["systemctl", "enable", "--now", "stigmer.service"]


def test_a_failing_command_stops_there(tmp_path: Path) -> None:
    runner = Recorder(fail="useradd")
    with pytest.raises(StigmerError, match="useradd") as e:
        enable(tmp_path, runner)
    assert e.value.code is ErrorCode.INSTALL_FAILED
    assert len(runner.calls) == 1 and not (tmp_path / "stigmer.service").exists()


@pytest.mark.parametrize(("platform", "euid", "code"), [("linux", 1000, ErrorCode.ACCESS_DENIED),
                                                        ("darwin", 0, ErrorCode.UNSUPPORTED),
                                                        ("win32", 0, ErrorCode.UNSUPPORTED)])  # fmt: skip
def test_refused_when_not_root_or_not_linux(
    tmp_path: Path, platform: str, euid: int, code: ErrorCode
) -> None:
    runner = Recorder()
    with pytest.raises(StigmerError) as e:
        enable(tmp_path, runner, platform=platform, euid=euid)
    assert e.value.code is code and runner.calls == [] and not (tmp_path / "stigmer.service").exists()
    with pytest.raises(StigmerError):
        svc.disable(runner=runner, platform=platform, euid=euid, unit_dir=tmp_path)
    assert code.exit_code != 0


@pytest.mark.parametrize(("python", "prefix"), [("/home/ann/.venv/bin/python", "/home/ann/.venv"),
                                                ("/usr/bin/python3", "/root/.local/pipx/venvs/stigmer")])  # fmt: skip
def test_an_installation_under_a_home_is_refused(tmp_path: Path, python: str, prefix: str) -> None:
    runner = Recorder()
    with pytest.raises(StigmerError, match="ProtectHome") as e:
        enable(tmp_path, runner, python=python, prefix=prefix)
    assert "/opt/stigmer" in e.value.hint and runner.calls == []


def test_disable_removes_the_unit_and_keeps_the_user(tmp_path: Path) -> None:
    enable(tmp_path, Recorder())
    runner = Recorder()
    done = svc.disable(runner=runner, platform="linux", euid=0, unit_dir=tmp_path)
    assert done is not None and not done.unit.exists()
    assert runner.calls == [
        ["systemctl", "disable", "--now", "stigmer.service"],
        ["systemctl", "daemon-reload"],
    ]
    assert not any(c[0] in ("userdel", "rm") for c in runner.calls)
    assert svc.disable(runner=runner, platform="linux", euid=0, unit_dir=tmp_path) is None


def test_the_cli_refuses_without_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if sys.platform.startswith("linux"):
        monkeypatch.setattr(svc.os, "geteuid", lambda: 1000)
    with pytest.raises(StigmerError, match="root|Linux"):
        server_cmd.enable(argparse.Namespace(system=True))
    with pytest.raises(StigmerError, match="root|Linux"):
        server_cmd.disable(argparse.Namespace(system=True))


def test_the_cli_says_what_it_did_and_what_it_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = Recorder()
    real_disable = svc.disable
    monkeypatch.setattr(svc, "enable", lambda: enable(tmp_path, runner))
    monkeypatch.setattr(
        svc, "disable", lambda: real_disable(runner=runner, platform="linux", euid=0, unit_dir=tmp_path)
    )
    assert server_cmd.enable(argparse.Namespace(system=True)) == 0
    out = capsys.readouterr().out
    assert "Created the system user stigmer" in out and "runs as stigmer" in out
    assert server_cmd.disable(argparse.Namespace(system=True)) == 0
    out = capsys.readouterr().out
    assert "removed" in out and "are kept" in out and "userdel stigmer" in out
    assert server_cmd.disable(argparse.Namespace(system=True)) == 0
    assert "no Stigmer system service" in capsys.readouterr().out


def test_the_cli_refuses_with_a_non_zero_exit(
    isolated_home: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stigmer.cli.main import main

    monkeypatch.setattr(svc.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(svc, "enable", lambda: REAL_ENABLE(platform="linux"))
    assert main(["server", "enable", "--system"]) == ErrorCode.ACCESS_DENIED.exit_code != 0
    assert "must run as root" in capsys.readouterr().err
    monkeypatch.setattr(svc, "enable", lambda: REAL_ENABLE(platform="darwin"))
    assert main(["server", "enable", "--system"]) == ErrorCode.UNSUPPORTED.exit_code != 0
    assert "for Linux with systemd" in capsys.readouterr().err

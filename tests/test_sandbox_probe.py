"""sandbox.probe: the isolation a kernel gives, from fixture files standing in for /proc and /sys, every
branch; then this machine's real kernel (Landlock ABI 7, seccomp); the doctor check and the warning
`stigmer server` prints at start."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import pytest

from stigmer.cli import server_cmd
from stigmer.cli.render import Out
from stigmer.doctor import Problem, isolation_check
from stigmer.sandbox import linux, probe
from stigmer.sandbox.probe import FULL, NONE, PARTIAL

STATUS = "Name:\tpython\nSeccomp:\t0\nSeccomp_filters:\t0\n"


def fake_proc(
    root: Path,
    *,
    status: str = STATUS,
    actions: str | None = "kill_process kill_thread trap errno user_notif trace log allow",
    max_userns: str | None = "63000",
    userns_clone: str | None = None,
    apparmor: str | None = None,
) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text(status)
    files = {
        "sys/kernel/seccomp/actions_avail": actions,
        "sys/user/max_user_namespaces": max_userns,
        "sys/kernel/unprivileged_userns_clone": userns_clone,
        "sys/kernel/apparmor_restrict_unprivileged_userns": apparmor,
    }
    for name, value in files.items():
        if value is not None:
            (proc / name).parent.mkdir(parents=True, exist_ok=True)
            (proc / name).write_text(value + "\n")
    return proc


def fake_sys(root: Path, lsm: str | None = None) -> Path:
    sysfs = root / "sys"
    if lsm is not None:
        (sysfs / "kernel" / "security").mkdir(parents=True)
        (sysfs / "kernel" / "security" / "lsm").write_text(lsm)
    else:
        sysfs.mkdir()
    return sysfs


def linux_probe(tmp_path: Path, *, abi: int, release: str = "6.8.0-45-generic", machine: str = "x86_64",
                lsm: str | None = None, **proc: str | None) -> probe.Isolation:  # fmt: skip
    return probe.probe(
        system="Linux", release=release, machine=machine, abi=abi,
        proc=fake_proc(tmp_path, **proc), sysfs=fake_sys(tmp_path, lsm),
    )  # fmt: skip


def test_landlock_4_and_seccomp_is_full(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=4)
    assert iso.level == FULL and iso.files_confined and iso.seccomp and iso.landlock == 4
    assert iso.fixes == ()
    assert any("6.12" in n for n in iso.notes)  # signals and abstract sockets come with ABI 6
    assert "files and TCP ports" in iso.summary()
    assert probe.warning(iso, require=True) is None and probe.warning(iso, require=False) is None


def test_landlock_6_says_nothing_more(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=6)
    assert iso.level == FULL and iso.notes == ()


def test_landlock_before_abi_4_is_partial_files_only(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=3, release="6.1.0-13-amd64")
    assert iso.level == PARTIAL and iso.files_confined
    assert iso.fixes == ("Linux 6.7 or later restricts tools' TCP connections too (Landlock ABI 4)",)
    assert "files only" in iso.summary()
    warning = probe.warning(iso, require=True)
    assert warning and "partial" in warning and "stigmer doctor" in warning


def test_an_old_kernel_has_no_landlock(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=0, release="5.10.0-28-amd64")
    assert iso.level == NONE and not iso.files_confined
    assert len(iso.fixes) == 1 and "Linux 5.13 or later" in iso.fixes[0] and "5.10.0-28-amd64" in iso.fixes[0]
    assert "no Landlock" in iso.summary()
    assert "without an OS sandbox" in (probe.warning(iso, require=False) or "")
    assert "Tools will not run" in (probe.warning(iso, require=True) or "")


def test_landlock_left_out_of_the_boot_list(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=0, release="6.5.0-generic", lsm="lockdown,capability,yama,apparmor")
    assert iso.level == NONE and iso.lsm == ("lockdown", "capability", "yama", "apparmor")
    assert iso.fixes[0].startswith("add landlock to the kernel's lsm= boot parameter")
    assert "lsm=landlock,lockdown,capability,yama,apparmor" in iso.fixes[0]


def test_landlock_missing_and_the_boot_list_unreadable(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=0, release="6.5.0")
    assert iso.lsm == () and "lsm=landlock," in iso.fixes[0]


def test_no_seccomp_field_is_partial(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=7, status="Name:\tpython\n", actions=None)
    assert iso.level == PARTIAL and not iso.seccomp
    assert iso.fixes == (
        "a kernel with seccomp filters (CONFIG_SECCOMP_FILTER, every major distribution's has)",
    )
    assert "no seccomp filter" in iso.summary()


def test_seccomp_without_errno_action_is_no_filter(tmp_path: Path) -> None:
    assert not linux_probe(tmp_path, abi=7, actions="kill_process allow").seccomp


def test_seccomp_already_under_a_filter_and_an_old_kernel_without_actions_file(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=7, status="Seccomp:\t2\nSeccomp_filters:\t1\n", actions=None)
    assert iso.seccomp and iso.level == FULL


def test_a_machine_without_our_filter(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=5, machine="riscv64")
    assert iso.level == PARTIAL and not iso.seccomp
    assert "x86_64 and aarch64 only (this machine: riscv64)" in iso.fixes[0]


def test_no_landlock_and_no_seccomp_gives_both_fixes(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=0, release="5.4.0", status="")
    assert iso.level == NONE and len(iso.fixes) == 2


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, probe.USERNS_ALLOWED),
        ({"apparmor": "0"}, probe.USERNS_ALLOWED),
        ({"apparmor": "1"}, probe.USERNS_APPARMOR),
        ({"userns_clone": "0"}, probe.USERNS_DISABLED),
        ({"userns_clone": "1", "apparmor": "1"}, probe.USERNS_APPARMOR),
        ({"max_userns": "0"}, probe.USERNS_DISABLED),
        ({"max_userns": None}, probe.USERNS_UNAVAILABLE),
    ],
)
def test_user_namespaces(tmp_path: Path, files: dict[str, str | None], expected: str) -> None:
    iso = linux_probe(tmp_path, abi=7, **files)
    assert iso.userns == expected
    assert iso.level == FULL  # for information only: they change nothing


def test_macos_with_and_without_sandbox_exec(tmp_path: Path) -> None:
    tool = tmp_path / "sandbox-exec"
    tool.write_text("")
    iso = probe.probe(system="Darwin", release="23.4.0", sandbox_exec=str(tool))
    assert iso.level == FULL and iso.sandbox_exec and iso.fixes == ()
    assert "sandbox-exec" in iso.summary()
    iso = probe.probe(system="Darwin", release="23.4.0", sandbox_exec=str(tmp_path / "gone"))
    assert iso.level == NONE and not iso.sandbox_exec and "sandbox-exec is missing" in iso.fixes[0]


def test_windows_says_what_is_and_is_not_isolated() -> None:
    iso = probe.probe(system="Windows", release="10")
    assert iso.level == NONE and not iso.files_confined
    assert "WSL 2" in iso.fixes[0]
    assert "NOT confined" in iso.notes[0] and "environment" in iso.notes[0]
    assert "Tools will not run" in (probe.warning(iso, require=True) or "")


def test_another_system_has_none() -> None:
    iso = probe.probe(system="FreeBSD", release="14.0")
    assert iso.level == NONE and iso.platform == "freebsd" and iso.fixes


def test_kernel_version() -> None:
    assert probe.kernel_version("6.8.0-45-generic") == (6, 8)
    assert probe.kernel_version("5.13") == (5, 13)
    assert probe.kernel_version("weird") == (0, 0)


def test_to_dict_is_plain_json(tmp_path: Path) -> None:
    import json

    data = linux_probe(tmp_path, abi=3, lsm="landlock,yama").to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["level"] == PARTIAL and data["lsm"] == ["landlock", "yama"] and data["summary"]


@pytest.mark.skipif(platform.system() != "Linux", reason="this machine's kernel")
def test_this_kernel() -> None:
    iso = probe.probe()
    assert iso.platform == "linux" and iso.landlock == linux.landlock_abi()
    if iso.landlock >= 4 and platform.machine() in probe.SECCOMP_MACHINES:
        # the machine the tests were written on: Landlock ABI 7, seccomp on
        assert iso.seccomp and iso.level == FULL and iso.fixes == ()
        assert probe.start_warning(True) is None


# -- doctor --------------------------------------------------------------------------------------------
def test_doctor_full_says_nothing_more(tmp_path: Path) -> None:
    problems: list[Problem] = []
    notes: list[str] = []
    data = isolation_check(True, problems, notes, linux_probe(tmp_path, abi=7))
    assert problems == [] and notes == [] and data["level"] == FULL and data["require_sandbox"] is True


def test_doctor_partial_is_a_note_with_the_fix(tmp_path: Path) -> None:
    problems: list[Problem] = []
    notes: list[str] = []
    isolation_check(True, problems, notes, linux_probe(tmp_path, abi=2))
    assert problems == [] and len(notes) == 1 and "partial" in notes[0] and "Linux 6.7" in notes[0]


def test_doctor_no_landlock_is_a_warning_unless_required(tmp_path: Path) -> None:
    iso = linux_probe(tmp_path, abi=0, release="5.10.0")
    problems: list[Problem] = []
    notes: list[str] = []
    isolation_check(False, problems, notes, iso)
    assert problems == [] and "none" in notes[0] and "Linux 5.13 or later" in notes[0]
    notes.clear()
    isolation_check(True, problems, notes, iso)
    assert notes == [] and len(problems) == 1
    assert "Tools will not run" in problems[0].message and "Linux 5.13" in problems[0].fix


def test_doctor_renders_the_isolation_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stigmer.cli.doctor_cmd import _isolation

    _isolation(Out(), {**linux_probe(tmp_path, abi=3, apparmor="1").to_dict(), "require_sandbox": False})
    out = capsys.readouterr().out
    assert "Isolation:" in out and "partial" in out and "ABI 3" in out
    assert "restricted by AppArmor (not used by Stigmer)" in out
    assert "fix:       Linux 6.7 or later" in out and "tools.require_sandbox false" in out
    _isolation(Out(), {**probe.probe(system="Windows", release="10").to_dict(), "require_sandbox": True})
    out = capsys.readouterr().out
    assert "NOT confined" in out and "WSL 2" in out and "Landlock:" not in out


# -- stigmer server --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("require", "abi", "expected"),
    [
        (False, 7, None),
        (False, 0, "Tools run without an OS sandbox here"),
        (True, 0, "Tools will not run"),
        (False, 2, "Tools' OS sandbox is partial here"),
    ],
)
def test_server_start_warns_in_one_line(
    isolated_home: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    require: bool,
    abi: int,
    expected: str | None,
) -> None:
    iso = linux_probe(tmp_path, abi=abi, release="5.10.0" if not abi else "6.1.0")
    monkeypatch.setattr(probe, "probe", lambda: iso)
    monkeypatch.setenv("STIGMER_TOOLS_REQUIRE_SANDBOX", "true" if require else "false")
    monkeypatch.setattr(server_cmd, "bring_up", lambda out, force=False: ({"running": True}, True, 0.1))
    monkeypatch.setattr(server_cmd, "_offer_update", lambda out, status: None)
    monkeypatch.setattr(Out, "server_block", lambda self, status: None)
    assert server_cmd.start(argparse.Namespace(force=False)) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "OS sandbox" in line or "Tools will not run" in line]
    if expected is None:
        assert lines == []
    else:
        assert len(lines) == 1 and expected in lines[0] and "stigmer doctor" in lines[0]

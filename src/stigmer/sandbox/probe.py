"""What isolation this operating system gives the processes Stigmer starts for agents, and how to get more.

Linux: Landlock's ABI (files from 5.13, TCP ports from 6.7 = ABI 4, signals and abstract sockets from
6.12 = ABI 6), whether seccomp filters are there, and, for information only, whether unprivileged user
namespaces are allowed (Stigmer does not use them: Landlock and seccomp need no namespace and no root;
they matter to people comparing with bubblewrap or containers). macOS: sandbox-exec. Windows: nothing
confines files or the network (macos.windows_note).

Levels: "full" (Landlock ABI >= 4 and seccomp: files and TCP ports; or macOS's sandbox-exec), "partial"
(Landlock for files only, or no seccomp filter), "none" (no Landlock, macOS without sandbox-exec,
Windows). Every file is read through the roots given, so tests stand a folder in for /proc and /sys.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FULL, PARTIAL, NONE = "full", "partial", "none"
SANDBOX_EXEC = "/usr/bin/sandbox-exec"
SECCOMP_MACHINES = ("x86_64", "aarch64")  # the ones linux.seccomp_program has a filter for

# user namespaces (information only)
USERNS_ALLOWED = "allowed"
USERNS_DISABLED = "disabled"
USERNS_APPARMOR = "restricted by AppArmor"
USERNS_UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Isolation:
    platform: str  # "linux", "darwin", "windows", ...
    kernel: str  # the kernel's release
    level: str  # FULL, PARTIAL or NONE
    landlock: int = 0  # Landlock ABI, 0 without it
    seccomp: bool = False  # a seccomp filter can be installed (and we have one for this machine)
    userns: str = ""  # unprivileged user namespaces (Linux): USERNS_*; not used by Stigmer
    sandbox_exec: bool = False  # macOS: /usr/bin/sandbox-exec is there
    lsm: tuple[str, ...] = ()  # the active security modules (when /sys/kernel/security/lsm is readable)
    fixes: tuple[str, ...] = ()  # one line each: what would make it stronger (empty when full)
    notes: tuple[str, ...] = field(default=())  # worth knowing, nothing to fix

    @property
    def files_confined(self) -> bool:
        """Whether tools' files are confined by the OS (the thing `tools.require_sandbox` requires)."""
        return self.level != NONE

    def summary(self) -> str:
        """One line, as doctor and the server print it."""
        if self.platform == "linux":
            if not self.landlock:
                what = "no Landlock: tools' files and network are not confined by the kernel"
            elif self.landlock < 4:
                what = f"Landlock ABI {self.landlock}: files only (TCP connections not restricted)"
            else:
                what = f"Landlock ABI {self.landlock}: files and TCP ports"
            return what + (", seccomp filter" if self.seccomp else ", no seccomp filter")
        if self.platform == "darwin":
            return "sandbox-exec profiles: files and network" if self.sandbox_exec else "no sandbox-exec"
        if self.platform == "windows":
            return "no file or network confinement on Windows (environment allow-list, process tree only)"
        return f"no sandbox for tools on {self.platform}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lsm"] = list(self.lsm)
        data["fixes"] = list(self.fixes)
        data["notes"] = list(self.notes)
        data["summary"] = self.summary()
        return data


def probe(
    *,
    system: str | None = None,
    release: str | None = None,
    machine: str | None = None,
    abi: int | None = None,
    proc: Path = Path("/proc"),
    sysfs: Path = Path("/sys"),
    sandbox_exec: str = SANDBOX_EXEC,
) -> Isolation:
    """This machine's isolation. Every argument stands in for the real thing in tests."""
    system = (system if system is not None else platform.system()).lower()
    release = release if release is not None else platform.release()
    if system == "linux":
        if abi is None:
            from stigmer.sandbox import linux

            abi = linux.landlock_abi()
        return _linux(release, machine or platform.machine(), abi, proc, sysfs)
    if system == "darwin":
        return _darwin(release, os.path.exists(sandbox_exec))
    if system == "windows":
        from stigmer.sandbox.macos import windows_note

        return Isolation(
            platform="windows",
            kernel=release,
            level=NONE,
            fixes=("run Stigmer in WSL 2 (a Linux kernel with Landlock) for tools confined by the OS",),
            notes=(windows_note(),),
        )
    return Isolation(
        platform=system,
        kernel=release,
        level=NONE,
        fixes=("run Stigmer on Linux 6.7 or later (or macOS) for tools confined by the OS",),
    )


def _linux(release: str, machine: str, abi: int, proc: Path, sysfs: Path) -> Isolation:
    seccomp = seccomp_available(proc) and machine in SECCOMP_MACHINES
    lsm = active_lsm(sysfs)
    fixes: list[str] = []
    notes: list[str] = []
    if not abi:
        if kernel_version(release) < (5, 13):
            fixes.append(
                f"Linux 5.13 or later confines tools' files (Landlock), 6.7 or later their TCP connections "
                f"too (this kernel: {release})"
            )
        else:
            # The kernel is new enough: Landlock is not built in, or not in the boot list of security modules.
            fixes.append(_lsm_fix(lsm))
    elif abi < 4:
        fixes.append("Linux 6.7 or later restricts tools' TCP connections too (Landlock ABI 4)")
    if abi and abi < 6:
        notes.append(
            "Linux 6.12 or later (Landlock ABI 6) also keeps tools from signalling other processes of "
            "this user and from reaching their abstract unix sockets"
        )
    if not seccomp:
        if machine not in SECCOMP_MACHINES:
            fixes.append(
                f"the system-call filter is built for x86_64 and aarch64 only (this machine: {machine})"
            )
        else:
            fixes.append(
                "a kernel with seccomp filters (CONFIG_SECCOMP_FILTER, every major distribution's has)"
            )
    userns = user_namespaces(proc)  # reported for information: Stigmer's sandbox does not use them
    if not abi:
        level = NONE
    elif abi < 4 or not seccomp:
        level = PARTIAL
    else:
        level = FULL
    return Isolation(
        platform="linux",
        kernel=release,
        level=level,
        landlock=abi,
        seccomp=seccomp,
        userns=userns,
        lsm=lsm,
        fixes=tuple(fixes),
        notes=tuple(notes),
    )


def _lsm_fix(lsm: tuple[str, ...]) -> str:
    wanted = ",".join(("landlock", *lsm)) if lsm else "landlock,lockdown,yama,integrity,apparmor,bpf"
    return (
        f"add landlock to the kernel's lsm= boot parameter (lsm={wanted}) and reboot; the kernel must be "
        "built with CONFIG_SECURITY_LANDLOCK=y"
    )


def _darwin(release: str, has_sandbox_exec: bool) -> Isolation:
    if has_sandbox_exec:
        return Isolation(
            platform="darwin",
            kernel=release,
            level=FULL,
            sandbox_exec=True,
            notes=(
                "tools run under sandbox-exec profiles (deny by default; Apple marks sandbox-exec "
                "deprecated but ships it); no rlimits on memory or processes beyond the system's",
            ),
        )
    return Isolation(
        platform="darwin",
        kernel=release,
        level=NONE,
        fixes=(f"{SANDBOX_EXEC} is missing: it ships with macOS; restore it (or reinstall macOS)",),
    )


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a release like "6.8.0-45-generic"; (0, 0) when it cannot be read."""
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def seccomp_available(proc: Path = Path("/proc")) -> bool:
    """The kernel has seccomp filters: /proc/self/status has a `Seccomp:` field (CONFIG_SECCOMP), and
    /proc/sys/kernel/seccomp/actions_avail lists what filters may return (CONFIG_SECCOMP_FILTER).
    Already under a filter (a container's) is fine: filters stack."""
    status = _read(proc / "self" / "status") or ""
    if not any(line.startswith("Seccomp:") for line in status.splitlines()):
        return False
    actions = _read(proc / "sys" / "kernel" / "seccomp" / "actions_avail")
    return actions is None or "errno" in actions.split()  # the file came in 4.14; our filter returns errno


def user_namespaces(proc: Path = Path("/proc")) -> str:
    """Whether a user without privileges may create a user namespace."""
    sysctl = proc / "sys"
    maximum = _read(sysctl / "user" / "max_user_namespaces")
    if maximum is None:
        return USERNS_UNAVAILABLE  # no CONFIG_USER_NS
    if maximum == "0" or _read(sysctl / "kernel" / "unprivileged_userns_clone") == "0":
        return USERNS_DISABLED  # the Debian/Ubuntu switch, or no namespace at all
    if _read(sysctl / "kernel" / "apparmor_restrict_unprivileged_userns") == "1":
        return USERNS_APPARMOR  # Ubuntu 23.10+: only programs with an AppArmor profile allowing it
    return USERNS_ALLOWED


def active_lsm(sysfs: Path = Path("/sys")) -> tuple[str, ...]:
    """The security modules in force (securityfs), () when not readable (not mounted, a container)."""
    text = _read(sysfs / "kernel" / "security" / "lsm")
    return tuple(name for name in (text or "").split(",") if name)


def start_warning(require: bool, iso: Isolation | None = None) -> str | None:
    """What `stigmer server` says at start about this machine (`iso` stands in for it in tests)."""
    return warning(iso if iso is not None else probe(), require=require)


def warning(iso: Isolation, *, require: bool) -> str | None:
    """The one line `stigmer server` prints when tools are not fully confined here, else None."""
    if iso.level == FULL:
        return None
    if iso.level == NONE:
        if require:
            return (
                f"Tools will not run: this system cannot confine them ({iso.summary()}) and "
                "tools.require_sandbox is true; see: stigmer doctor"
            )
        return f"Tools run without an OS sandbox here ({iso.summary()}); see: stigmer doctor"
    return f"Tools' OS sandbox is partial here ({iso.summary()}); see: stigmer doctor"

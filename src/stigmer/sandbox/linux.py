"""Linux enforcement of a Policy on the calling process (and all it will start), without root:
no_new_privs, Landlock, a seccomp filter, rlimits. Called between fork and exec.

Why ctypes and not a package: it is three Landlock system calls and one prctl for seccomp, and the
launcher must start in milliseconds under `python -I -S` (no site-packages). The PyPI bindings either
need libseccomp's shared library (pyseccomp), a compiled extension (sandlock), or cover Landlock's
file rules only (landlock, py-landlock: no TCP ports, no scopes).

Landlock (kernel 5.13+) only allows: what a policy does not list is denied, so secrets (~/.ssh,
STIGMER_HOME) are out of reach by not being listed. From ABI 4 (6.7) it also restricts TCP bind and
connect by port, from ABI 6 (6.12) signals and abstract unix sockets to the process's own domain, and
at every ABI a sandboxed process cannot ptrace, nor read /proc/<pid>/environ or mem of, a process
outside its domain (the worker, the API).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import struct
import sys

from stigmer.sandbox import NONE, PORTS

# The policy arrives as the mapping of Policy.to_json() (policy.py). Nothing here imports typing, json,
# dataclasses or platform: under `python -I -S` they (and the `re` they pull in) would double the
# launcher's start-up, about 50 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    Spec = Mapping[str, Any]


def loads(text: str) -> Spec:
    """Policy.to_json()'s text as a mapping, with the JSON scanner's C part (the json package would
    import re)."""
    try:
        import _json
    except ImportError:  # not CPython
        import json

        return dict(json.loads(text))

    class Context:
        strict = True
        object_hook = object_pairs_hook = parse_constant = None
        parse_float, parse_int = float, int

    value, end = _json.make_scanner(Context())(text, 0)  # type: ignore[arg-type]
    if not isinstance(value, dict) or end != len(text):
        raise SandboxError("the policy is not a JSON object")
    return value


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Landlock system calls: the same numbers on every architecture (they came after the unification).
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # valid on a file


def fs_rights(abi: int) -> int:
    """Every filesystem right the kernel knows at this ABI (all of them handled: denied unless allowed)."""
    rights = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


class Applied:
    """What was enforced; `summary()` names it for the record."""

    def __init__(self, landlock: int = 0, net: bool = False, seccomp: bool = False) -> None:
        self.landlock = landlock  # the ABI used, 0 when none
        self.net = net  # TCP ports restricted by Landlock (ABI 4+)
        self.seccomp = seccomp

    def summary(self) -> str:
        if not self.landlock:
            done = ["NOT confined by Landlock (kernel without it)"]
        else:
            done = [f"landlock {self.landlock}" + (" fs+net" if self.net else " fs")]
        if self.seccomp:
            done.append("seccomp")
        return ", ".join(done)


class SandboxError(Exception):
    """The policy could not be applied as required (the launcher reports it and exits 126)."""


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or it is disabled at boot)."""
    if not sys.platform.startswith("linux"):
        return 0
    version = libc().syscall(
        SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)
    )
    return max(0, int(version))


def apply(policy: Spec) -> Applied:
    """Confine this process as `policy` (Policy.to_json()'s mapping) says. Raises SandboxError when
    the policy requires Landlock and there is none, or when a step that is available fails."""
    set_limits(policy.get("limits") or {})
    drop_capabilities()
    lib = libc()
    if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
    abi = landlock_abi()
    net = False
    if abi:
        net = restrict(policy, abi)
    elif policy.get("require"):
        raise SandboxError(
            "this kernel has no Landlock (Linux 5.13 or later, with landlock in the lsm= boot list), and "
            "tools.require_sandbox is true"
        )
    filtered = False
    if policy.get("seccomp", True):
        filtered = install_seccomp(policy.get("network", NONE))
    return Applied(landlock=abi, net=net, seccomp=filtered)


def drop_capabilities() -> None:
    """Empty the capability bounding set (and the ambient set), so that a program run as root gets no
    capability at exec: root's own power (CAP_SYS_PTRACE reads any /proc/<pid>/environ, CAP_DAC_OVERRIDE
    any file's permission bits) is not the tool's. Without CAP_SETPCAP (not root) there is none to drop."""
    lib = libc()
    lib.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        if lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
        # EPERM: not allowed to (not root): then nothing of it is ours to give away either


# -- rlimits -------------------------------------------------------------------------------------------
def set_limits(limits: Spec) -> None:
    if limits.get("memory"):
        _lower(resource.RLIMIT_DATA, int(limits["memory"]))
    if limits.get("cpu_seconds"):
        _lower(resource.RLIMIT_CPU, int(limits["cpu_seconds"]))
    if limits.get("file_size"):
        _lower(resource.RLIMIT_FSIZE, int(limits["file_size"]))
    if limits.get("processes"):
        # RLIMIT_NPROC counts every process of the user, not of this tree: what runs now plus the allowance.
        _lower(resource.RLIMIT_NPROC, user_processes() + int(limits["processes"]))
    _lower(resource.RLIMIT_CORE, 0)


def _lower(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value if hard == resource.RLIM_INFINITY else min(value, hard)))


def user_processes() -> int:
    """Processes (threads count too, as RLIMIT_NPROC sees them: roughly) of this user now."""
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


# -- Landlock ------------------------------------------------------------------------------------------
class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def restrict(policy: Spec, abi: int) -> bool:
    """Apply the policy's Landlock rules; True when TCP ports are restricted too (ABI 4+)."""
    handled_fs = fs_rights(abi)
    handled_net = 0
    network = policy.get("network", NONE)
    if abi >= 4:
        if network in (NONE, PORTS):
            handled_net |= NET_CONNECT_TCP
        if policy.get("bind") is not None:
            handled_net |= NET_BIND_TCP
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    buf = ctypes.create_string_buffer(attr[:size], size)
    lib = libc()
    fd = lib.syscall(SYS_CREATE_RULESET, buf, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        raise SandboxError(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path in policy.get("read", ()):
            _allow_path(fd, path, READ & handled_fs)
        for path in (*policy.get("write", ()), *policy.get("devices", ())):
            _allow_path(fd, path, handled_fs)
        if handled_net & NET_CONNECT_TCP:
            for port in policy.get("connect", ()) if network == PORTS else ():
                _allow_port(fd, NET_CONNECT_TCP, int(port))
        if handled_net & NET_BIND_TCP:
            for port in policy.get("bind") or ():
                _allow_port(fd, NET_BIND_TCP, int(port))
        if lib.syscall(SYS_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            raise SandboxError(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return bool(handled_net)


def _allow_path(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:  # not on this machine (a /lib64 on an arm64 box): nothing to allow
        return
    try:
        if not os.path.isdir(path):
            rights &= FILE_ONLY
        rule = _PathBeneath(rights, fd)
        if (
            libc().syscall(
                SYS_ADD_RULE,
                ctypes.c_int(ruleset),
                ctypes.c_int(RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            )
            != 0
        ):
            raise SandboxError(f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def _allow_port(ruleset: int, right: int, port: int) -> None:
    rule = _NetPort(right, port)
    if (
        libc().syscall(
            SYS_ADD_RULE,
            ctypes.c_int(ruleset),
            ctypes.c_int(RULE_NET_PORT),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
        )
        != 0
    ):
        raise SandboxError(f"landlock_add_rule port {port}: {os.strerror(ctypes.get_errno())}")


# -- seccomp -------------------------------------------------------------------------------------------
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_BIT = 0x40000000
# What a tool never needs, by architecture: tracing other processes, mounts and namespaces, kernel
# modules and kexec, the kernel keyring, BPF and perf, userfaultfd, another process's memory, io_uring
# (whose operations seccomp cannot see), reading the kernel log.
DENIED = {
    "x86_64": {
        "ptrace": 101, "syslog": 103, "acct": 163, "mount": 165, "umount2": 166, "pivot_root": 155,
        "swapon": 167, "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175,
        "delete_module": 176, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
        "unshare": 272, "perf_event_open": 298, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320,
        "bpf": 321, "userfaultfd": 323,
    },
    "aarch64": {
        "ptrace": 117, "syslog": 116, "acct": 89, "mount": 40, "umount2": 39, "pivot_root": 41,
        "swapon": 224, "swapoff": 225, "reboot": 142, "init_module": 105, "delete_module": 106,
        "kexec_load": 104, "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97,
        "perf_event_open": 241, "open_by_handle_at": 265, "setns": 268, "process_vm_readv": 270,
        "process_vm_writev": 271, "finit_module": 273, "kexec_file_load": 294, "bpf": 280,
        "userfaultfd": 282,
    },
}  # fmt: skip
# The same numbers on both (the generic table's newer calls).
COMMON_DENIED = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
                 "fspick": 433, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}  # fmt: skip
SYS_CLONE3 = 435  # its flags are behind a pointer seccomp cannot read: ENOSYS, and libc falls back to clone
SYS_SOCKET = {"x86_64": 41, "aarch64": 198}
SYS_CLONE = {"x86_64": 56, "aarch64": 220}
CLONE_NEWUSER = 0x10000000
AF_INET, AF_INET6, AF_PACKET = 2, 10, 17
SOCK_STREAM, SOCK_TYPE_MASK = 1, 0xF

RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K, AND_K = 0x20, 0x15, 0x35, 0x45, 0x06, 0x54


def seccomp_program(machine: str, network: str) -> list[tuple[int, int, int, int]] | None:
    """The BPF filter (code, jt, jf, k) for this machine, or None when the architecture is not known.
    IP sockets: none with network "none"; TCP only with "ports" (Landlock holds TCP to the ports, and
    has no rule for UDP, which would reach anything); any with "any"."""
    if machine not in AUDIT_ARCH:
        return None
    deny = {**DENIED[machine], **COMMON_DENIED}
    eperm, enosys, eacces = RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS, RET_ERRNO | errno.EACCES
    prog: list[tuple[int, int, int, int]] = []
    labels: dict[str, int] = {}
    jumps: list[tuple[int, str, str]] = []  # (index, true label, false label); "" = next

    def op(code: int, k: int, jt: str = "", jf: str = "") -> None:
        if jt or jf:
            jumps.append((len(prog), jt, jf))
        prog.append((code, 0, 0, k))

    def label(name: str) -> None:
        labels[name] = len(prog)

    op(LD_W_ABS, 4)  # seccomp_data.arch
    op(JEQ_K, AUDIT_ARCH[machine], "", "foreign")
    op(LD_W_ABS, 0)  # seccomp_data.nr
    if machine == "x86_64":
        op(JGE_K, X32_BIT, "enosys")  # the x32 ABI's numbers
    for nr in sorted(deny.values()):
        op(JEQ_K, nr, "eperm")
    op(JEQ_K, SYS_CLONE3, "enosys")
    op(JEQ_K, SYS_CLONE[machine], "clone")
    op(JEQ_K, SYS_SOCKET[machine], "socket")
    op(RET_K, RET_ALLOW)
    label("clone")  # clone(flags, ...): no new user namespace (flags is args[0]; x86_64 and arm64 alike)
    op(LD_W_ABS, 16)
    op(JSET_K, CLONE_NEWUSER, "eperm")
    op(RET_K, RET_ALLOW)
    label("socket")  # socket(domain, type, protocol)
    op(LD_W_ABS, 16)
    op(JEQ_K, AF_PACKET, "eperm")
    if network == NONE:
        op(JEQ_K, AF_INET, "eacces")
        op(JEQ_K, AF_INET6, "eacces")
    elif network == PORTS:
        op(JEQ_K, AF_INET, "inet")
        op(JEQ_K, AF_INET6, "inet")
    op(RET_K, RET_ALLOW)
    label("inet")
    op(LD_W_ABS, 24)
    op(AND_K, SOCK_TYPE_MASK)
    op(JEQ_K, SOCK_STREAM, "allow", "eacces")
    label("allow")
    op(RET_K, RET_ALLOW)
    label("eacces")
    op(RET_K, eacces)
    label("eperm")
    op(RET_K, eperm)
    label("enosys")
    op(RET_K, enosys)
    label("foreign")  # a 32-bit call on a 64-bit kernel (int 0x80): nothing, so nothing slips past
    op(RET_K, enosys)

    for index, jt, jf in jumps:
        code, _, _, k = prog[index]
        t = labels[jt] - index - 1 if jt else 0
        f = labels[jf] - index - 1 if jf else 0
        if not (0 <= t < 256 and 0 <= f < 256):
            raise SandboxError("seccomp program too long")
        prog[index] = (code, t, f, k)
    return prog


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def install_seccomp(network: str) -> bool:
    """Install the filter (no_new_privs must be set); False when this architecture has none."""
    prog = seccomp_program(os.uname().machine, network)
    if prog is None:
        return False
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filters)
    if libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS):  # a kernel built without seccomp filters: as no Landlock
            return False
        raise SandboxError(f"seccomp: {os.strerror(err)}")
    return True

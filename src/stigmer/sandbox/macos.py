"""macOS: a Policy as a sandbox-exec (Seatbelt, SBPL) profile, with the same intent as Landlock and seccomp
on Linux: deny by default, then allow running programs, the system's own files, the policy's folders
read-only or read-write, its devices, and its network. Secrets (Stigmer's home, ~/.ssh, ...) are denied
by not being allowed, as on Linux.

sandbox-exec is marked deprecated by Apple but ships with every macOS and is what other agent tools use;
the profile is given inline (-p), and every path in it is an escaped SBPL string literal, so a folder
named with `"`, `\\`, `)` or a newline cannot end the string and add rules of its own.

Also windows_note(): what is and is not isolated on Windows, where no such mechanism is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from stigmer.sandbox.policy import ANY, PORTS, Policy

SANDBOX_EXEC = "/usr/bin/sandbox-exec"

# What any program needs to read to start and run on macOS: the system, its libraries (the dyld shared
# cache lives in the Cryptexes on macOS 13+), configuration (/etc is /private/etc), time zones.
SYSTEM_READ = (
    "/System", "/usr", "/bin", "/sbin", "/Library/Apple", "/Library/Preferences", "/private/etc",
    "/private/var/db/dyld", "/private/var/db/timezone", "/System/Volumes/Preboot/Cryptexes",
    "/opt/homebrew", "/usr/local",
)  # fmt: skip
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/dtracehelper")
# The system services a program reaches at start or for the basics: user and group names, notifications,
# the log, preferences, the per-user temporary folder, certificates (TLS).
MACH_SERVICES = (
    "com.apple.system.opendirectoryd.libinfo",
    "com.apple.system.DirectoryService.libinfo_v1",
    "com.apple.system.notification_center",
    "com.apple.system.logger",
    "com.apple.logd",
    "com.apple.diagnosticd",
    "com.apple.cfprefsd.daemon",
    "com.apple.cfprefsd.agent",
    "com.apple.bsd.dirhelper",
    "com.apple.trustd",
    "com.apple.trustd.agent",
    "com.apple.SecurityServer",
    "com.apple.coreservices.launchservicesd",
)
# With network access: name resolution and the network configuration (proxies).
NETWORK_SERVICES = (
    "com.apple.mDNSResponder",
    "com.apple.SystemConfiguration.configd",
    "com.apple.dnssd.service",
)


def quote(text: str) -> str:
    """An SBPL (TinyScheme) string literal holding `text` exactly: backslash and double quote escaped,
    control characters as escapes, so nothing in a path ends the string."""
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _paths(paths: Sequence[str]) -> list[str]:
    """The paths as given and, where a symlink leads elsewhere (/tmp -> /private/tmp), as Seatbelt sees
    them: it matches the resolved path."""
    out: list[str] = []
    for path in paths:
        for p in (path, os.path.realpath(path)):
            if p not in out:
                out.append(p)
    return out


def _filters(paths: Sequence[str], kind: str = "subpath") -> str:
    return " ".join(f"({kind} {quote(p)})" for p in _paths(paths))


def profile(policy: Policy) -> str:
    """The SBPL profile for `policy` (macOS's sandbox-exec -p)."""
    lines = [
        f"; stigmer sandbox {quote(policy.name)}",  # quoted: a name cannot end the comment
        "(version 1)",
        "(deny default)",
        # Run programs; children inherit the profile. Signals and process information only within it.
        "(allow process-fork)",
        "(allow process-exec)",
        "(allow signal (target same-sandbox))",
        "(allow process-info* (target same-sandbox))",
        "(allow sysctl-read)",  # hw.ncpu, kern.osversion...: read-only, what libc and runtimes ask
        "(allow mach-lookup " + " ".join(f"(global-name {quote(s)})" for s in MACH_SERVICES) + ")",
        '(allow ipc-posix-shm-read-data (ipc-posix-name "apple.shm.notification_center"))',
        # Metadata only (stat, realpath, getcwd walk the parents): names and sizes, never contents.
        "(allow file-read-metadata)",
        "(allow file-read* " + _filters(SYSTEM_READ) + ")",
        "(allow file-read* file-write* file-ioctl " + _filters(DEVICES, "literal") + ")",
        '(allow file-read* file-write* file-ioctl (regex #"^/dev/fd/[0-9]+$") (regex #"^/dev/ttys[0-9]+$"))',
    ]
    if policy.read:
        lines.append("(allow file-read* " + _filters(policy.read) + ")")
    if policy.write:
        lines.append("(allow file-read* file-write* " + _filters(policy.write) + ")")
    if policy.devices:
        lines.append("(allow file-read* file-write* file-ioctl " + _filters(policy.devices, "literal") + ")")
    if policy.network == ANY:
        lines.append("(allow network*)")
        if policy.bind is not None:
            lines.append("(deny network-bind)")  # the last rule that matches wins: the ports below
        lines.append(
            "(allow mach-lookup " + " ".join(f"(global-name {quote(s)})" for s in NETWORK_SERVICES) + ")"
        )
    elif policy.network == PORTS:
        # Seatbelt names only "localhost" or "*" as a host: the ports are the tool's local proxy's.
        for port in policy.connect:
            lines.append(f'(allow network-outbound (remote tcp "localhost:{int(port)}"))')
    # network "none": no rule, nothing allowed (not even unix sockets)
    for port in policy.bind or ():
        lines.append(f'(allow network-bind network-inbound (local tcp "localhost:{int(port)}"))')
    return "\n".join(lines) + "\n"


def argv(policy: Policy, program: Sequence[str]) -> list[str]:
    """The command line that runs `program` under the policy's profile."""
    return [SANDBOX_EXEC, "-p", profile(policy), *program]


def windows_note() -> str:
    """What a tool on Windows is and is not kept from (said by doctor and the README)."""
    return (
        "Windows has no sandbox Stigmer can apply without administrator rights: a tool gets only the "
        "environment's allow-list (no keys or tokens in its variables) and its process tree is stopped "
        "with the call; its files and network are NOT confined (it can read what your user can, "
        "Stigmer's API token included); use WSL 2 for tools confined by the OS"
    )

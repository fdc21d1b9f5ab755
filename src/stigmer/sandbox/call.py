"""The sandbox of one tool process, as the worker sets it up: its policy (rules.py), a private
temporary folder, and, when the agent file grants hosts, the proxy that lets only those through.

    with call.tool_process("shell", options, write=(workspace,), timeout=60) as box:
        shell.run(argv, ..., policy=box.policy, extra_env=box.env)

`describe()` is the same policy as one line, for the record and the stream of every tool call.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stigmer.sandbox import rules
from stigmer.sandbox.policy import Policy


@dataclass
class Box:
    policy: Policy | None  # None where this platform has no sandbox for tools (Windows)
    env: dict[str, str] = field(default_factory=dict)  # TMPDIR, the proxy's variables
    tmp: Path | None = None


@functools.cache
def enforced() -> str:
    """How this machine enforces a policy, for the record: "landlock 7 fs+net, seccomp", or why not."""
    if sys.platform.startswith("linux"):
        from stigmer.sandbox import linux

        abi = linux.landlock_abi()
        parts = [
            f"landlock {abi}" + (" fs+net" if abi >= 4 else " fs")
            if abi
            else "NO landlock: files not confined"
        ]
        if linux.seccomp_program(os.uname().machine, "none") is not None and _kernel_has_seccomp():
            parts.append("seccomp")
        return ", ".join(parts)
    if sys.platform == "darwin":
        return "sandbox-exec"
    return "not confined on this platform (environment and process tree only)"


def _kernel_has_seccomp() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def confined_argv(argv: list[str], policy: Policy | None, platform: str = sys.platform) -> list[str]:
    """argv as started where the guardian does not apply the policy: under sandbox-exec on macOS (when
    it is there); as is elsewhere (Windows: not confined; Linux: the guardian does it)."""
    if policy is None or platform != "darwin":
        return argv
    from stigmer.sandbox import macos

    if not os.path.exists(macos.SANDBOX_EXEC):
        if policy.require:
            raise rules.SandboxOptionError(
                f"{macos.SANDBOX_EXEC} is missing and tools.require_sandbox is true"
            )
        return argv
    return macos.argv(policy, argv)


def require() -> bool:
    """tools.require_sandbox: refuse to run tools the kernel cannot confine."""
    from stigmer.config import store
    from stigmer.paths import Paths

    tools = getattr(store.load(Paths.from_env()), "tools", None)
    return bool(getattr(tools, "require_sandbox", False))


def policy_for(
    name: str,
    options: Any,
    *,
    write: tuple[Path, ...],
    timeout: float | None,
    proxy_port: int | None = None,
    extra_read: tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> Policy:
    from stigmer.paths import Paths

    return rules.tool_policy(
        name,
        options=options,
        write=tuple(str(w) for w in write),
        stigmer_home=Paths.from_env().home,
        environ=os.environ if environ is None else environ,
        timeout=timeout,
        proxy_port=proxy_port,
        extra_read=extra_read,
        require=require(),
    )


def describe(
    name: str,
    options: Any,
    *,
    write: tuple[Path, ...],
    timeout: float | None,
    extra_read: tuple[str, ...] = (),
) -> str:
    """The policy a call of this tool runs under, as one line (its temporary folder not shown)."""
    from stigmer.paths import Paths

    tmp = Paths.from_env().data_dir / "tmp" / "<call>"  # made for each call (each server) and removed after
    try:
        policy = policy_for(
            name, options, write=(*write, tmp), timeout=timeout, proxy_port=0, extra_read=extra_read
        )
    except rules.SandboxOptionError as e:
        return f"{name}: refused ({e})"
    return policy.summary(enforced())


@contextmanager
def tool_process(
    name: str,
    options: Any,
    *,
    write: tuple[Path, ...],
    timeout: float | None,
    extra_read: tuple[str, ...] = (),
    tmp_parent: Path | None = None,
) -> Iterator[Box]:
    """A private temporary folder (removed after), the host proxy when hosts are granted, the policy."""
    from stigmer.paths import Paths

    if sys.platform == "win32":
        yield Box(None)
        return
    parent = tmp_parent or Paths.from_env().data_dir / "tmp"
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix=f"{name.replace(' ', '-')}-", dir=parent))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        env = {"TMPDIR": str(tmp), "TMP": str(tmp), "TEMP": str(tmp)}
        granted = rules.grants(options, stigmer_home=Paths.from_env().home)
        port = None
        if granted.hosts:
            from stigmer.sandbox.proxy import HostProxy, proxy_env

            proxy = stack.enter_context(HostProxy(allow=list(granted.hosts)))
            port = proxy.port
            env.update(proxy_env(proxy.url))
        policy = policy_for(
            name, options, write=(*write, tmp), timeout=timeout, proxy_port=port, extra_read=extra_read
        )
        yield Box(policy, env, tmp)

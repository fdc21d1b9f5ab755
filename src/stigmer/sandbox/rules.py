"""Which policy a tool process gets: the narrowest that works, widened by the agent file's `sandbox:`.

    tools:
      - shell:
          sandbox:
            network: [pypi.org, files.pythonhosted.org]   # through a proxy that lets only these through
            paths: {ro: [~/datasets], rw: [~/reports]}
    mcp_servers:
      - name: notes
        command: [python, -m, notes_server]
        sandbox: {paths: {rw: [~/notes]}}

By default a shell command may read the system folders, this Python, the folders of its PATH (and the
tool manager folder above one under the home: ~/.pyenv, ~/.cargo), write its workspace and a private
temporary folder, and reach no network. An MCP server the same, with its own temporary folder instead
of a workspace (it serves every agent that lists it) and its program's files readable. Secrets
(Stigmer's home with the API token, the payload key and config.yaml; ~/.ssh, ~/.aws, ~/.config, ...)
are never granted: a `sandbox:` path that holds one is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stigmer.sandbox import system
from stigmer.sandbox.policy import ANY, NONE, PORTS, Limits, Policy

MAX_ENTRIES = 64
MAX_PATH = 4096
MAX_HOST = 253
FILE_SIZE = 4 << 30  # the largest file a tool may write
PROCESSES = 256  # processes a tool call may add
OPTIONS = ("network", "paths")


class SandboxOptionError(ValueError):
    """The agent file's `sandbox:` is malformed or grants a secret (the message says which)."""


@dataclass(frozen=True)
class Grants:
    """What the agent file widens: hosts (or any network) and extra folders."""

    hosts: tuple[str, ...] = ()
    any_network: bool = False
    ro: tuple[str, ...] = ()
    rw: tuple[str, ...] = ()


def grants(options: Any, *, stigmer_home: Path, home: Path | None = None) -> Grants:
    """The `sandbox:` option checked: a mapping of network (a list of hosts, or "any") and paths
    ({ro: [...], rw: [...]}, absolute or from ~). SandboxOptionError says what is wrong."""
    if options is None:
        return Grants()
    if not isinstance(options, dict):
        raise SandboxOptionError("sandbox: is a mapping, such as {network: [pypi.org], paths: {rw: [~/out]}}")
    unknown = [str(k) for k in options if k not in OPTIONS]
    if unknown:
        raise SandboxOptionError(f"sandbox: unknown option {unknown[0][:40]!r} (options: network, paths)")
    network = options.get("network", [])
    hosts: tuple[str, ...] = ()
    any_network = network == ANY
    if not any_network:
        if not isinstance(network, list) or len(network) > MAX_ENTRIES:
            raise SandboxOptionError(f'sandbox: network is a list of at most {MAX_ENTRIES} hosts, or "any"')
        for host in network:
            if (
                not isinstance(host, str)
                or not host
                or len(host) > MAX_HOST
                or any(c in host for c in " /\\\x00@\t\n")
            ):
                raise SandboxOptionError(
                    f"sandbox: network: {str(host)[:60]!r} is not a host name (host or host:port)"
                )
        hosts = tuple(network)
    paths = options.get("paths", {})
    if not isinstance(paths, dict) or any(k not in ("ro", "rw") for k in paths):
        raise SandboxOptionError("sandbox: paths is a mapping with ro: and rw: lists of folders")
    found: dict[str, tuple[str, ...]] = {}
    secrets = system.secret_locations(stigmer_home, home)
    stigmer = os.path.realpath(secrets[0])
    for mode in ("ro", "rw"):
        entries = paths.get(mode, [])
        if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
            raise SandboxOptionError(f"sandbox: paths: {mode} is a list of at most {MAX_ENTRIES} folders")
        out = []
        for entry in entries:
            if not isinstance(entry, str) or not entry or len(entry) > MAX_PATH or "\x00" in entry:
                raise SandboxOptionError(f"sandbox: paths: {mode}: {str(entry)[:60]!r} is not a path")
            path = os.path.expanduser(entry) if entry.startswith("~") else entry
            if not os.path.isabs(path):
                raise SandboxOptionError(
                    f"sandbox: paths: {mode}: {entry[:60]!r} must be absolute or start with ~"
                )
            path = os.path.realpath(path)
            if system.contains(stigmer, path) or system.contains(path, stigmer):
                raise SandboxOptionError(
                    f"sandbox: paths: {mode}: {entry[:60]!r} is or holds Stigmer's home ({stigmer}), "
                    "which no tool may open (its API token would let a tool approve its own calls)"
                )
            for secret in map(os.path.realpath, secrets[1:]):
                if system.contains(path, secret) and path != secret:  # naming ~/.aws itself is on purpose
                    raise SandboxOptionError(
                        f"sandbox: paths: {mode}: {entry[:60]!r} holds {secret}, which keeps secrets; "
                        "name the folders the tool needs below it instead"
                    )
            out.append(path)
        found[mode] = tuple(out)
    return Grants(hosts=hosts, any_network=any_network, ro=found["ro"], rw=found["rw"])


def tool_read(environ: Mapping[str, str], home: Path, secrets: tuple[str, ...]) -> tuple[str, ...]:
    """System folders, this Python, PATH's folders and, for one under the home, the folder of the tool
    manager it belongs to (~/.pyenv/shims -> ~/.pyenv: a shim runs what is beside it) unless that holds
    a secret."""
    out = list(system.system_read())
    home_real = os.path.realpath(home)
    for folder in system.path_dirs(environ):
        if any(system.contains(folder, s) or system.contains(s, folder) for s in secrets):
            continue
        out.append(folder)
        if system.contains(home_real, folder) and folder != home_real:
            top = os.path.join(home_real, os.path.relpath(folder, home_real).split(os.sep)[0])
            if not any(system.contains(top, s) for s in secrets):
                out.append(top)
    return tuple(dict.fromkeys(out))


def limits(timeout: float | None) -> Limits:
    """Generous for a build or a test run, finite for a runaway: memory half of this machine's (at most
    16 GB) per process, CPU time the call's timeout on every core, files up to 4 GB, 256 more processes."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    cpu = math.ceil(timeout * (os.cpu_count() or 1)) + 5 if timeout else None
    return Limits(memory=min(total // 2, 16 << 30), cpu_seconds=cpu, file_size=FILE_SIZE, processes=PROCESSES)


def tool_policy(
    name: str,
    *,
    options: Any,
    write: tuple[str, ...],
    stigmer_home: Path,
    environ: Mapping[str, str],
    timeout: float | None,
    proxy_port: int | None = None,
    extra_read: tuple[str, ...] = (),
    require: bool = False,
    home: Path | None = None,
) -> Policy:
    """The policy of one tool process. `write`: its workspace and temporary folder; `proxy_port`: the
    host proxy's, when the agent file grants hosts; `extra_read`: the program's own files (MCP)."""
    home = home or Path.home()
    granted = grants(options, stigmer_home=stigmer_home, home=home)
    secrets = system.secret_locations(stigmer_home, home)
    for folder in write:
        real = os.path.realpath(folder)
        for secret in secrets[:1]:
            if system.contains(real, os.path.realpath(secret)):
                raise SandboxOptionError(
                    f"the folder {folder} holds Stigmer's home; a tool cannot write there"
                )
    network = NONE
    connect: tuple[int, ...] = ()
    if granted.any_network:
        network = ANY
    elif granted.hosts:
        if proxy_port is None:
            raise SandboxOptionError("the host proxy is not running")
        network, connect = PORTS, (proxy_port,)
    readable = tuple(
        p for p in extra_read if not any(system.contains(p, s) or system.contains(s, p) for s in secrets)
    )
    return Policy(
        name=name,
        read=tuple(dict.fromkeys((*tool_read(environ, home, secrets), *readable, *granted.ro))),
        write=tuple(dict.fromkeys((*(os.path.realpath(w) for w in write), *granted.rw))),
        devices=system.DEVICES,
        network=network,
        connect=connect,
        hosts=granted.hosts,
        limits=limits(timeout),
        require=require,
        denied=secrets,
    )

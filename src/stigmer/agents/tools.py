"""The tools an agent file declares, checked: built-in tools (workspace files, shell, http fetch) with
their options, and MCP servers (stdio or streamable HTTP).

    tools:
      - workspace                     # list, read, write, search files in the agent's workspace
      - shell: {approval: required}   # run an argv in the workspace (off unless listed)
      - http: {allow: [docs.python.org]}
    mcp_servers:
      - name: notes
        command: [python, -m, notes_server]
      - name: search
        url: http://127.0.0.1:9000/mcp

Options every tool takes: approval (required | never), timeout (seconds, 1-3600), retries (0-10).
The shell tool and MCP servers run by command also take `sandbox:` (stigmer/sandbox/rules.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stigmer.agents.spec import AgentSpec

BUILTIN_TOOLS = ("workspace", "shell", "http")
APPROVALS = ("required", "never")
DEFAULT_APPROVAL = {"workspace": "never", "shell": "required", "http": "never", "mcp": "never"}
DEFAULT_TIMEOUT = {"workspace": 30, "shell": 60, "http": 30, "mcp": 120}
COMMON = ("approval", "timeout", "retries")
SPECIFIC = {
    "workspace": (),
    "shell": ("max_output", "allow_shell_string", "sandbox"),
    "http": ("allow", "max_bytes"),
}
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


@dataclass(frozen=True)
class ToolConfig:
    kind: str  # workspace | shell | http | mcp
    approval: str
    timeout: float
    retries: int
    options: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # an MCP server's name


def tool_configs(spec: AgentSpec) -> list[ToolConfig]:
    """The agent's tools as configurations (the spec was checked when it was stored)."""
    out = []
    for entry in spec.tools:
        kind, options = _entry(entry)
        out.append(_config(kind, options))
    for server in spec.mcp_servers:
        options = {k: v for k, v in server.items() if k not in ("name",)}
        out.append(_config("mcp", options, name=str(server["name"])))
    return out


def _entry(entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        kind, options = next(iter(entry.items()))
        if options is not None and not isinstance(options, dict):
            raise ValueError(
                f"the options of tool {str(kind)[:40]!r} are a mapping (- shell: {{approval: required}})"
            )
        return str(kind), dict(options or {})
    raise ValueError(
        "each tool is a name (- workspace) or a name with options (- shell: {approval: required})"
    )


def _config(kind: str, options: dict[str, Any], name: str = "") -> ToolConfig:
    return ToolConfig(
        kind=kind,
        approval=str(options.get("approval", DEFAULT_APPROVAL[kind])),
        timeout=float(options.get("timeout", DEFAULT_TIMEOUT[kind])),
        retries=int(options.get("retries", 2)),
        options={k: v for k, v in options.items() if k not in COMMON},
        name=name,
    )


def check_tools(spec: AgentSpec, at: Callable[[str], str]) -> None:
    """Raise a StigmerError naming the field for the first bad tool or server declaration."""
    from stigmer.agents.spec import invalid

    seen: set[str] = set()
    for entry in spec.tools:
        try:
            kind, options = _entry(entry)
        except ValueError as e:
            raise invalid(f"{at('tools')}: {e}.") from None
        if kind not in BUILTIN_TOOLS:
            raise invalid(
                f"{at('tools')}: unknown tool {kind!r}.", f"Built-in tools: {', '.join(BUILTIN_TOOLS)}."
            )
        if kind in seen:
            raise invalid(f"{at('tools')}: tool {kind!r} is listed twice.")
        seen.add(kind)
        _check_options(kind, options, at("tools"), allowed=(*COMMON, *SPECIFIC[kind]))
        if kind == "http":
            allow = options.get("allow")
            if not isinstance(allow, list) or not allow or not all(isinstance(h, str) and h for h in allow):
                raise invalid(
                    f"{at('tools')}: tool 'http' needs `allow:`, the list of hosts it may fetch from.",
                    "For example:  - http: {allow: [docs.python.org]}",
                )
    names: set[str] = set()
    for server in spec.mcp_servers:
        if not isinstance(server, dict):
            raise invalid(
                f"{at('mcp_servers')}: each MCP server is a mapping with name: and command: or url:."
            )
        name = server.get("name")
        if not isinstance(name, str) or not SERVER_NAME.fullmatch(name):
            raise invalid(f"{at('mcp_servers')}: an MCP server needs a name (letters, digits, - and _).")
        if name in names:
            raise invalid(f"{at('mcp_servers')}: MCP server {name!r} is listed twice.")
        names.add(name)
        command, url = server.get("command"), server.get("url")
        if (command is None) == (url is None):
            raise invalid(
                f"{at('mcp_servers')}: MCP server {name!r} needs exactly one of command: (stdio) or url:."
            )
        if command is not None and (
            not isinstance(command, list) or not command or not all(isinstance(a, str) and a for a in command)
        ):
            raise invalid(
                f"{at('mcp_servers')}: MCP server {name!r}: command: is a list of arguments, "
                "as in [python, -m, notes_server] (never a shell string)."
            )
        if url is not None and (not isinstance(url, str) or not re.match(r"https?://[^\s/]+", url)):
            raise invalid(f"{at('mcp_servers')}: MCP server {name!r}: url: must be an http(s) URL.")
        env = server.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise invalid(f"{at('mcp_servers')}: MCP server {name!r}: env: must map names to text.")
        if url is not None and "sandbox" in server:
            raise invalid(
                f"{at('mcp_servers')}: MCP server {name!r}: sandbox: is for servers this machine runs "
                "(command:), not for one at a url:."
            )
        rest = {k: v for k, v in server.items() if k not in ("name", "command", "url", "env")}
        _check_options("mcp", rest, at("mcp_servers"), allowed=(*COMMON, "sandbox"))


def _check_options(kind: str, options: dict[str, Any], where: str, *, allowed: tuple[str, ...]) -> None:
    from stigmer.agents.spec import invalid

    for key, value in options.items():
        if key not in allowed:
            raise invalid(f"{where}: {kind}: unknown option {key!r}.", f"Options: {', '.join(allowed)}.")
        if key == "approval" and value not in APPROVALS:
            raise invalid(f"{where}: {kind}: approval must be required or never, not {value!r}.")
        if key == "timeout" and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 3600
        ):
            raise invalid(f"{where}: {kind}: timeout must be 1 to 3600 seconds.")
        if key == "retries" and (type(value) is not int or not 0 <= value <= 10):
            raise invalid(f"{where}: {kind}: retries must be a whole number from 0 to 10.")
        if key in ("max_output", "max_bytes") and (
            type(value) is not int or not 1 <= value <= 100 * 1024 * 1024
        ):
            raise invalid(f"{where}: {kind}: {key} must be a number of bytes from 1 to 104857600.")
        if key == "allow_shell_string" and not isinstance(value, bool):
            raise invalid(f"{where}: {kind}: allow_shell_string must be true or false.")
        if key == "sandbox":
            from stigmer.paths import Paths
            from stigmer.sandbox.rules import SandboxOptionError, grants

            try:
                grants(value, stigmer_home=Paths.from_env().home)
            except SandboxOptionError as e:
                raise invalid(
                    f"{where}: {kind}: {e}.",
                    "For example:  sandbox: {network: [pypi.org], paths: {ro: [~/data], rw: [~/out]}}",
                ) from None

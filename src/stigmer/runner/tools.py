"""The tools an agent may call, built for each run from its agent file: the built-in ones (workspace
files, shell, http fetch; stigmer.tools) and the tools of its MCP servers.

They form one pydantic-ai dynamic toolset: under Temporal every tool call is its own activity (so a
retry after a crash never repeats a call that finished), and the toolset is built inside those
activities, where I/O is allowed. Each call enforces the tool's own timeout and retry count from the
agent file; a tool marked `approval: required` asks first (runner/approvals.py). What a tool reports
as a failure (no such file, host not allowed, timed out) is returned to the model as text, so the agent
can go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pydantic_ai import ApprovalRequired, FunctionToolset, RunContext
from pydantic_ai.toolsets import AbstractToolset, CombinedToolset
from temporalio import activity

from stigmer.agents.tools import ToolConfig
from stigmer.tools.errors import ToolFailure

log = logging.getLogger(__name__)

TOOLSET_ID = "stigmer_tools"
WORKSPACE_TOOLS = ("list_files", "read_file", "write_file", "search_files")


def configs(ctx: RunContext[Any]) -> list[ToolConfig]:
    return [ToolConfig(**c) for c in ctx.deps.tools]


def build(ctx: RunContext[Any]) -> AbstractToolset[Any] | None:
    """The run's toolset (called by pydantic-ai inside the toolset's activities)."""
    tools = configs(ctx)
    if not tools:
        return None
    builtin: FunctionToolset[Any] = FunctionToolset()
    for config in tools:
        if config.kind == "workspace":
            _add_workspace(builtin, config)
        elif config.kind == "shell":
            _add_shell(builtin, config, summary=sandbox_summary(ctx.deps, config))
        elif config.kind == "http":
            _add_http(builtin, config)
    servers = [
        mcp_toolset(c).with_metadata(
            temporal={"summary": f"call tool: mcp {c.name} [{sandbox_summary(ctx.deps, c)}]"[:400]}
        )
        for c in tools
        if c.kind == "mcp"
    ]
    return CombinedToolset([builtin, *servers]) if servers else builtin


def sandbox_summary(deps: Any, config: ToolConfig) -> str:
    """What a call of this tool could do, as one line: on every tool call's record and in its activity's
    summary (stigmer/sandbox: the OS enforces it for processes; the worker's own checks otherwise)."""
    from stigmer.sandbox import call

    if config.kind == "shell":
        from stigmer.paths import Paths
        from stigmer.tools.workspace import Workspace

        try:
            root = Workspace.for_agent(Paths.from_env().data_dir, deps.agent, deps.workspace).root
        except Exception as e:  # noqa: BLE001 - the call itself will report it
            return f"shell: no workspace ({e})"
        return call.describe("shell", config.options.get("sandbox"), write=(root,), timeout=config.timeout)
    if config.kind == "mcp":
        if not config.options.get("command"):
            return (
                f"mcp {config.name}: a server at {config.options.get('url')} (not a process of this worker)"
            )
        from stigmer.runner import mcp_servers

        return mcp_servers.sandbox_summary(config)
    if config.kind == "http":
        hosts = ", ".join(map(str, config.options.get("allow", [])))
        return f"http: GET from the worker, to {hosts} only; private addresses refused unless listed"
    return "workspace: files below the agent's workspace only (checked by the worker)"


def sandbox_of(deps: Any, tool_name: str) -> str:
    """sandbox_summary of the tool a call names (`run_command`, `<server>_<tool>`...); "" if unknown."""
    for config in (ToolConfig(**c) for c in deps.tools):
        if (
            (config.kind == "shell" and tool_name == "run_command")
            or (config.kind == "http" and tool_name == "http_get")
            or (config.kind == "workspace" and tool_name in WORKSPACE_TOOLS)
            or (config.kind == "mcp" and tool_name.startswith(f"{config.name}_"))
        ):
            return sandbox_summary(deps, config)
    return ""


def _workspace(ctx: RunContext[Any]) -> Any:
    from stigmer.paths import Paths
    from stigmer.tools.workspace import Workspace

    return Workspace.for_agent(Paths.from_env().data_dir, ctx.deps.agent, ctx.deps.workspace)


async def guarded(ctx: RunContext[Any], config: ToolConfig, work: Callable[[], Any]) -> Any:
    """Ask for approval when the agent file says so; run with the tool's timeout and retry count."""
    from stigmer.errors import StigmerError

    if config.approval == "required" and not ctx.tool_call_approved:
        raise ApprovalRequired(metadata={"tool": config.kind})
    note = await _retried_note(ctx, config)
    try:
        result = await asyncio.wait_for(asyncio.to_thread(work), timeout=config.timeout + 5)
        return f"{note}\n{result}" if note and isinstance(result, str) else result
    except ToolFailure as e:
        return f"error: {e}"
    except StigmerError as e:  # the agent file's own settings are wrong (its workspace folder, say)
        return f"error: {e.message}"
    except TimeoutError:
        return f"error: the tool did not finish within {config.timeout:.0f} seconds"
    except Exception as e:
        attempt = activity.info().attempt if activity.in_activity() else 1
        if attempt > config.retries:
            log.warning("%s failed on attempt %d, giving up: %s", config.kind, attempt, e)
            return f"error: the tool failed ({type(e).__name__}: {e})"
        raise  # Temporal tries the call again


async def _retried_note(ctx: RunContext[Any], config: ToolConfig) -> str:
    """A tool call tried again after its worker died (or its activity timed out) may have done part of
    its work already: say so in the stream, and in the result that the model and the record get."""
    attempt = activity.info().attempt if activity.in_activity() else 1
    if attempt <= 1:
        return ""
    note = (
        f"[note: this {config.kind} call is being run again (attempt {attempt}); an earlier attempt was "
        "interrupted and may have run partly]"
    )
    from stigmer.runner.publish import post_events

    await post_events(
        ctx.deps.execution_id,
        ctx.deps.ticket,
        [{"type": "notice", "attempt": attempt, "text": note.strip("[]"), "tool_call": ctx.tool_call_id}],
    )
    return note


def _add_workspace(toolset: FunctionToolset[Any], config: ToolConfig) -> None:
    async def list_files(ctx: RunContext[Any], path: str = ".", recursive: bool = False) -> Any:
        """List the files and folders in the workspace (folders end with /)."""
        return await guarded(ctx, config, lambda: _workspace(ctx).list(path, recursive=recursive))

    async def read_file(ctx: RunContext[Any], path: str) -> Any:
        """Read a text file from the workspace."""
        return await guarded(ctx, config, lambda: _workspace(ctx).read(path))

    async def write_file(ctx: RunContext[Any], path: str, content: str) -> Any:
        """Write a text file in the workspace (folders are created as needed)."""
        return await guarded(ctx, config, lambda: _workspace(ctx).write(path, content))

    async def search_files(ctx: RunContext[Any], pattern: str, path: str = ".", regex: bool = False) -> Any:
        """Search the workspace's files for a text (or a regular expression with regex=true); lines as
        path:line: text."""
        return await guarded(ctx, config, lambda: _workspace(ctx).search(pattern, path, regex=regex))

    for func in (list_files, read_file, write_file, search_files):
        toolset.add_function(func)


def _add_shell(toolset: FunctionToolset[Any], config: ToolConfig, *, summary: str) -> None:
    """`run_command(argv)`: a list of arguments; with `allow_shell_string: true` the same parameter also
    takes a command line, run with `sh -c` (one parameter either way, so that approvals and the record
    read alike, and a model that sends a list still works)."""
    allow_string = bool(config.options.get("allow_shell_string", False))

    def run(ctx: RunContext[Any], argv: list[str] | str) -> str:
        from stigmer.sandbox import call, rules
        from stigmer.tools import shell

        root = _workspace(ctx).root
        try:
            with call.tool_process(
                "shell", config.options.get("sandbox"), write=(root,), timeout=config.timeout
            ) as box:
                result = shell.run(
                    argv,
                    cwd=root,
                    timeout=config.timeout,
                    max_output=int(config.options.get("max_output", 64_000)),
                    allow_shell_string=allow_string,
                    policy=box.policy,
                    extra_env=box.env,
                )
        except rules.SandboxOptionError as e:
            raise ToolFailure(f"the agent file's sandbox for this tool is refused: {e}") from None
        status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
        return f"[{status}]\n{result.output}"

    async def run_command(ctx: RunContext[Any], argv: list[str]) -> Any:
        """Run a program in the workspace, given as a list of arguments, e.g. ["ls", "-l"]."""
        return await guarded(ctx, config, lambda: run(ctx, argv))

    async def run_shell_command(ctx: RunContext[Any], argv: list[str] | str) -> Any:
        """Run a program in the workspace: a list of arguments, e.g. ["ls", "-l"], or a shell command
        line, e.g. "ls -l | wc -l" (run with sh -c)."""
        return await guarded(ctx, config, lambda: run(ctx, argv))

    toolset.add_function(
        run_shell_command if allow_string else run_command,
        name="run_command",
        metadata={"temporal": {"summary": f"call tool: run_command [{summary}]"[:400]}},
    )


def _add_http(toolset: FunctionToolset[Any], config: ToolConfig) -> None:
    async def http_get(ctx: RunContext[Any], url: str) -> Any:
        """Fetch a web page (GET) from one of the allowed hosts; returns its text."""

        def work() -> str:
            from stigmer.tools import http_fetch

            result = http_fetch.fetch(
                url,
                allow=list(config.options.get("allow", [])),
                max_bytes=int(config.options.get("max_bytes", 1_000_000)),
                timeout=config.timeout,
            )
            note = " (truncated)" if result.truncated else ""
            return f"[HTTP {result.status}, {result.content_type}{note}]\n{result.text}"

        return await guarded(ctx, config, work)

    toolset.add_function(http_get)


# -- MCP servers ------------------------------------------------------------------------------------------
def mcp_toolset(config: ToolConfig) -> Any:
    """The MCP server's toolset, one server per worker process and server definition: started on first
    use, reused by later calls, stopped when the worker stops (close_servers), and kept from misbehaving
    (runner/mcp_servers.py). Its tools are offered to the model as `<server>_<tool>`."""
    from stigmer.runner import mcp_servers

    return mcp_servers.toolset(config)


async def close_servers() -> None:
    """Stop every MCP server process this worker started."""
    from stigmer.runner import mcp_servers

    await mcp_servers.close_all()

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
            _add_shell(builtin, config)
        elif config.kind == "http":
            _add_http(builtin, config)
    servers = [mcp_toolset(c) for c in tools if c.kind == "mcp"]
    return CombinedToolset([builtin, *servers]) if servers else builtin


def _workspace(ctx: RunContext[Any]) -> Any:
    from stigmer.paths import Paths
    from stigmer.tools.workspace import Workspace

    return Workspace.for_agent(Paths.from_env().data_dir, ctx.deps.agent, ctx.deps.workspace)


async def guarded(ctx: RunContext[Any], config: ToolConfig, work: Callable[[], Any]) -> Any:
    """Ask for approval when the agent file says so; run with the tool's timeout and retry count."""
    from stigmer.errors import StigmerError
    from stigmer.tools.errors import ToolFailure

    if config.approval == "required" and not ctx.tool_call_approved:
        raise ApprovalRequired(metadata={"tool": config.kind})
    try:
        return await asyncio.wait_for(asyncio.to_thread(work), timeout=config.timeout + 5)
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


def _add_shell(toolset: FunctionToolset[Any], config: ToolConfig) -> None:
    async def run_command(ctx: RunContext[Any], argv: list[str]) -> Any:
        """Run a program in the workspace, given as a list of arguments, e.g. ["ls", "-l"]."""

        def work() -> str:
            from stigmer.tools import shell

            result = shell.run(
                argv,
                cwd=_workspace(ctx).root,
                timeout=config.timeout,
                max_output=int(config.options.get("max_output", 64_000)),
                allow_shell_string=bool(config.options.get("allow_shell_string", False)),
            )
            status = "timed out" if result.timed_out else f"exit code {result.exit_code}"
            return f"[{status}]\n{result.output}"

        return await guarded(ctx, config, work)

    toolset.add_function(run_command)


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
_servers: dict[tuple[Any, ...], tuple[Any, Any]] = {}  # definition -> (toolset, transport)


def mcp_toolset(config: ToolConfig) -> Any:
    """The MCP server's toolset, one per worker process and server definition: the server process is
    started on first use, reused by later calls, and stopped when the worker stops (close_servers).
    Its tools are offered to the model as `<server>_<tool>`."""
    from pydantic_ai.mcp import MCPToolset

    options = config.options
    env_items = tuple(sorted((options.get("env") or {}).items()))
    key = (config.name, tuple(options.get("command") or ()), options.get("url"), env_items)
    if key in _servers:
        return _servers[key][0]
    transport: Any
    if options.get("command"):
        from fastmcp.client.transports import StdioTransport

        from stigmer.services.env import PYTHON, child_env

        argv = list(options["command"])
        env = child_env(PYTHON, extra=dict(options.get("env") or {}))  # no secrets unless declared
        transport = StdioTransport(command=argv[0], args=argv[1:], env=env, keep_alive=True)
    else:
        from fastmcp.client.transports import StreamableHttpTransport

        transport = StreamableHttpTransport(str(options["url"]))
    toolset: Any = MCPToolset(transport, id=f"mcp_{config.name}", max_retries=1).prefixed(config.name)
    if config.approval == "required":
        toolset = toolset.approval_required()
    _servers[key] = (toolset, transport)
    return toolset


async def close_servers() -> None:
    """Stop every MCP server process this worker started."""
    for _toolset, transport in list(_servers.values()):
        try:
            await transport.close()
        except Exception as e:  # noqa: BLE001 - stopping: report and go on
            log.warning("stopping an MCP server: %s", e)
    _servers.clear()

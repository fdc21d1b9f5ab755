"""A worker-like process for the tests of tool processes: it makes one tool call the way the agent
runner does (the shell in a thread of its event loop, an MCP server from the loop itself), writes what
it started to DIR, and waits to be killed.

    python tests/doubles/tool_worker.py shell DIR
        a shell command that starts a child in a session of its own (setsid); writes command.pid and
        escaped.pid
    python tests/doubles/tool_worker.py mcp DIR SERVER_SCRIPT
        the MCP server SERVER_SCRIPT (tests/doubles/mcp_faulty_server.py serve), whose `spawn` tool starts
        a process in a session of its own; writes server.pid and escaped.pid
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from stigmer.tools import procs

SETSID_CHILD = "setsid sh -c 'echo $$ > escaped.pid; exec sleep 1000' & echo $$ > command.pid; sleep 1000"


async def shell(folder: Path) -> None:
    from stigmer.tools import shell

    await asyncio.to_thread(shell.run, ["sh", "-c", SETSID_CHILD], cwd=folder, timeout=3000)


async def mcp(folder: Path, script: str) -> None:
    from pydantic_ai import RunContext
    from pydantic_ai.models.test import TestModel
    from pydantic_ai.usage import RunUsage

    from stigmer.agents.tools import ToolConfig
    from stigmer.runner import tools

    config = ToolConfig(
        kind="mcp",
        approval="never",
        timeout=60,
        retries=0,
        # the server writes its child's pid to DIR: granted, as an agent file would
        options={"command": [sys.executable, script, "serve"], "sandbox": {"paths": {"rw": [str(folder)]}}},
        name="faulty",
    )
    ctx = RunContext(deps=None, model=TestModel(), usage=RunUsage())
    toolset = tools.mcp_toolset(config)
    async with toolset:
        offered = await toolset.get_tools(ctx)
        await toolset.call_tool(
            "faulty_spawn", {"pid_file": str(folder / "escaped.pid")}, ctx, offered["faulty_spawn"]
        )
        pid = await toolset.call_tool("faulty_pid", {}, ctx, offered["faulty_pid"])
        (folder / "server.pid.tmp").write_text(str(pid))
        (folder / "server.pid.tmp").rename(folder / "server.pid")
        while True:
            await asyncio.sleep(3600)


def main() -> None:
    kind, folder = sys.argv[1], Path(sys.argv[2])
    procs.setup()
    if kind == "shell":
        asyncio.run(shell(folder))
    else:
        asyncio.run(mcp(folder, sys.argv[3]))
    time.sleep(3600)


if __name__ == "__main__":
    main()

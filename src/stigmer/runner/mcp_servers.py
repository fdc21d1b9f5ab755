"""The MCP servers of the agents' tools, as the worker runs them: one per server definition and worker,
started on first use, reused by later calls, stopped with the worker, and kept from misbehaving:

- Starting fails fast: a server that exits, or does not finish the MCP handshake within START_TIMEOUT
  seconds or list its tools within LIST_TIMEOUT, fails the execution (no Temporal retries: a retry cannot fix it) with an
  error that names the server and quotes the end of its stderr.
- Every call honours the tool's `timeout`: a call that does not finish in time is given up, the model
  is told, and the server is stopped (it may be stuck, or still working on the call): the next call
  starts it again. A cancelled call stops it too.
- Output is bounded: the server's stderr goes to a pipe that the worker reads at most STDERR_RATE bytes
  a second from (a flood then waits on its own writes), logs at most LOG_LINES lines of it a minute,
  and keeps its last STDERR_TAIL bytes to explain a failure; a server that writes more than BAD_LINES
  lines that are not MCP messages on stdout is stopped; the MCP library's own per-line error log is
  rate-limited.
- Nothing outlives the worker: on Linux a stdio server runs under a guardian (stigmer.tools.procs),
  which kills its whole process tree when the worker dies, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import threading
import time
from collections.abc import Callable
from typing import Any

from pydantic_ai import WrapperToolset
from pydantic_ai.exceptions import (
    ApprovalRequired,
    CallDeferred,
    ModelRetry,
    SkipToolExecution,
    ToolFailed,
    UserError,
)
from temporalio.exceptions import ApplicationError

from stigmer.agents.tools import ToolConfig

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0  # seconds to start a server and finish the MCP handshake
HANDSHAKE_TIMEOUT = 12.0
LIST_TIMEOUT = 10.0  # seconds to list its tools (so a start fails within ~20 s, whatever hangs)
GUARDIAN_GRACE = 0.5  # the MCP client kills the server's group 2 s after asking it to stop
STDERR_TAIL = 2000  # bytes of a server's stderr kept to explain a failure
STDERR_RATE = 256 * 1024  # bytes a second read from a server's stderr at most
LOG_LINES = 20  # lines of a server's stderr (and server log messages) logged per LOG_WINDOW
LOG_WINDOW = 60.0
LINE_CAP = 500  # characters of one logged line
BAD_LINES = 100  # lines on stdout that are not MCP messages before the server is stopped
FAILED = "McpServerFailed"  # the ApplicationError type of a server that cannot be started


class _Budget:
    """At most `n` events per `window` seconds; counts what it refuses."""

    def __init__(self, n: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.n, self.window, self.clock = n, window, clock
        self.start = clock()
        self.used = 0
        self.refused = 0

    def take(self) -> tuple[bool, int]:
        """(allowed, how many were refused since the last allowed one)."""
        now = self.clock()
        if now - self.start >= self.window:
            self.start, self.used = now, 0
        if self.used >= self.n:
            self.refused += 1
            return False, 0
        self.used += 1
        refused, self.refused = self.refused, 0
        return True, refused


class RateLimitedLog(logging.Filter):
    """For a logger that logs once per line a server sends (the MCP client's "Failed to parse JSONRPC
    message from server", with a traceback each): LOG_LINES records a minute, without tracebacks."""

    def __init__(self, n: int = LOG_LINES, window: float = LOG_WINDOW) -> None:
        super().__init__()
        self.budget = _Budget(n, window)
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self.lock:
            allowed, refused = self.budget.take()
        if not allowed:
            return False
        if record.exc_info and record.exc_info[1] is not None:
            error = " ".join(str(record.exc_info[1]).split())
            record.msg = f"{record.getMessage()}: {error[:LINE_CAP]}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        if refused:
            record.msg = f"{record.getMessage()} ({refused} similar messages not logged)"
            record.args = None
        return True


_filtered: set[str] = set()


def _limit_library_logs() -> None:
    for name in ("mcp.client.stdio", "fastmcp.client.from_server"):
        if name not in _filtered:
            logging.getLogger(name).addFilter(RateLimitedLog())
            _filtered.add(name)


class Stderr:
    """A server's stderr: a pipe the worker reads, rate-limited; its tail kept, a few lines logged."""

    def __init__(self, server: str, *, rate: int = STDERR_RATE) -> None:
        self.server = server
        self.rate = rate
        read_end, write_end = os.pipe()
        self.writer = os.fdopen(write_end, "w", encoding="utf-8")  # given to the server as its stderr
        self._tail = bytearray()
        self._pending = b""
        self._lock = threading.Lock()
        self.total = 0
        self.last_read = 0.0
        self._budget = _Budget(LOG_LINES, LOG_WINDOW)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name=f"mcp-{server}-stderr")
        self._thread.daemon = True
        self._thread.start()

    def _pump(self, fd: int) -> None:
        second, used = time.monotonic(), 0
        try:
            while chunk := os.read(fd, 65536):
                self._add(chunk)
                used += len(chunk)
                if used >= self.rate:  # a flood: let its writes wait (the pipe fills), not our CPU
                    time.sleep(max(0.0, second + 1.0 - time.monotonic()))
                    second, used = time.monotonic(), 0
                elif time.monotonic() - second >= 1.0:
                    second, used = time.monotonic(), 0
        except OSError:
            pass
        finally:
            os.close(fd)

    def _add(self, chunk: bytes) -> None:
        with self._lock:
            self.total += len(chunk)
            self.last_read = time.monotonic()
            self._tail += chunk
            del self._tail[:-STDERR_TAIL]
            *lines, rest = (self._pending + chunk).split(b"\n")
            self._pending = rest[-LINE_CAP:]
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            allowed, refused = self._budget.take()
            if allowed:
                note = f" ({refused} lines not logged)" if refused else ""
                log.info("MCP server %r: %s%s", self.server, line[:LINE_CAP], note)

    def tail(self) -> str:
        """The last lines the server wrote to stderr, on one line."""
        with self._lock:
            text = bytes(self._tail).decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-5:])[-600:]

    async def settle(self, quiet: float = 0.1, limit: float = 1.0) -> None:
        """Wait (at most `limit` s) until the server has written nothing for `quiet` s: its last words."""
        end = time.monotonic() + limit
        while time.monotonic() < end and time.monotonic() - self.last_read < quiet:
            await asyncio.sleep(quiet / 2)

    def close(self) -> None:
        """Close our end for writing; the reader stops once the server's copies are closed too."""
        self.writer.close()


class Server:
    """One MCP server definition's process (or URL), its MCP client and its state in this worker."""

    def __init__(self, config: ToolConfig) -> None:
        from pydantic_ai.mcp import MCPToolset

        _limit_library_logs()
        options = config.options
        self.name = config.name
        self.stderr: Stderr | None = None
        self.broken = ""  # why it was stopped, told with the failure of what it was doing
        self.bad_lines = 0
        self._stopping: set[asyncio.Task[None]] = set()
        self._sandbox = contextlib.ExitStack()
        transport: Any
        if options.get("command"):
            from fastmcp.client.transports import StdioTransport

            from stigmer.sandbox import call
            from stigmer.services.env import PYTHON, child_env
            from stigmer.tools import procs

            argv = [str(a) for a in options["command"]]
            self.shown = shlex.join(argv)[:200]
            # No secrets unless declared; the worker's mark (what a dead worker left is found by it).
            env = child_env(PYTHON, extra={**dict(options.get("env") or {}), **procs.marker()})
            # Its sandbox (a temporary folder, perhaps a host proxy) lives as long as this definition.
            box = self._sandbox.enter_context(
                call.tool_process(
                    f"mcp {self.name}",
                    options.get("sandbox"),
                    write=(),
                    timeout=None,
                    extra_read=program_files(argv, env),
                )
            )
            env.update(box.env)
            if procs.available():
                argv = procs.guarded_argv(argv, grace=GUARDIAN_GRACE, policy=box.policy)
            else:
                argv = call.confined_argv(argv, box.policy)
            self.stderr = Stderr(self.name)
            transport = StdioTransport(
                command=argv[0], args=argv[1:], env=env, keep_alive=True, log_file=self.stderr.writer
            )
        else:
            from fastmcp.client.transports import StreamableHttpTransport

            self.shown = str(options["url"])
            transport = StreamableHttpTransport(self.shown)
        self.transport = transport
        self.toolset: Any = MCPToolset(
            transport,
            id=f"mcp_{config.name}",
            max_retries=1,
            init_timeout=HANDSHAKE_TIMEOUT,
            read_timeout=float(config.timeout) + 30,  # our own timeout (the tool's) comes first
            message_handler=self._message,
            log_handler=self._server_log,
        )
        self._log_budget = _Budget(LOG_LINES, LOG_WINDOW)

    async def _message(self, message: Any) -> None:
        """Every message the server sends that is not an answer; exceptions are lines that are not MCP."""
        if isinstance(message, Exception):
            self.bad_lines += 1
            if self.bad_lines == BAD_LINES:
                self.stop_soon(f"it wrote {BAD_LINES} lines that are not MCP messages to its stdout")

    async def _server_log(self, message: Any) -> None:
        allowed, refused = self._log_budget.take()
        if allowed:
            note = f" ({refused} messages not logged)" if refused else ""
            log.info(
                "MCP server %r logs (%s): %s%s", self.name, message.level, str(message.data)[:LINE_CAP], note
            )

    def failure(self, what: str, reason: str) -> ApplicationError:
        """The error that fails the execution: names the server, says why, and quotes its stderr."""
        said = self.stderr.tail() if self.stderr else ""
        text = f"MCP server {self.name!r} ({self.shown}) {what}: {self.broken or reason}."
        if said:
            text += f" Its stderr ends with: {said}"
        return ApplicationError(text, type=FAILED, non_retryable=True)

    async def stop(self, why: str = "") -> None:
        """Stop the server's process (its whole tree); the next use starts it again."""
        if why:
            self.broken = self.broken or why
            log.warning("stopping MCP server %r: %s", self.name, why)
        try:
            await self.transport.close()
        except Exception as e:  # noqa: BLE001 - stopping: report and go on
            log.warning("stopping MCP server %r: %s", self.name, e)

    def stop_soon(self, why: str) -> None:
        """stop(), from where it cannot be awaited (a message handler of the connection; a cancelled call)."""
        self.broken = self.broken or why
        task = asyncio.get_running_loop().create_task(self.stop(why))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def started(self) -> None:
        """A fresh process answered: forget why the last one was stopped."""
        self.broken, self.bad_lines = "", 0

    async def close(self) -> None:
        for task in list(self._stopping):
            await asyncio.gather(task, return_exceptions=True)
        await self.stop()
        if self.stderr is not None:
            self.stderr.close()
        self._sandbox.close()


def program_files(argv: list[str], env: dict[str, str]) -> tuple[str, ...]:
    """What an MCP server's program needs to read besides the system: the files its command line names
    (and their folders: a script imports what is beside it), its PYTHONPATH, and the worker's folder
    (`python -m server` finds the module there). Secret locations are dropped by the policy."""
    out = [os.getcwd()]
    for arg in argv[1:]:
        if os.path.isabs(arg) and os.path.exists(arg):
            out.append(arg if os.path.isdir(arg) else os.path.dirname(arg))
    out.extend(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if os.path.isabs(p))
    return tuple(dict.fromkeys(os.path.realpath(p) for p in out))


def sandbox_summary(config: ToolConfig) -> str:
    """The policy an MCP server's process runs under, as one line."""
    from stigmer.sandbox import call
    from stigmer.services.env import PYTHON, child_env

    argv = [str(a) for a in config.options.get("command") or ()]
    env = child_env(PYTHON, extra=dict(config.options.get("env") or {}))
    return call.describe(
        f"mcp {config.name}",
        config.options.get("sandbox"),
        write=(),
        timeout=None,
        extra_read=program_files(argv, env),
    )


def describe(e: BaseException) -> str:
    """What went wrong, in words (the MCP library's messages are terse)."""
    text = str(e).strip()
    if isinstance(e, TimeoutError):
        return f"it did not answer within {START_TIMEOUT:g} seconds"
    if "Connection closed" in text:
        return "it exited, or closed its stdout"
    if "initialize" in text.lower():
        return f"it did not complete the MCP handshake within {HANDSHAKE_TIMEOUT:g} seconds ({text})"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _connection_lost(e: BaseException) -> bool:
    """pydantic-ai turns the MCP client's "Connection closed" into a ModelRetry: the server is gone."""
    cause = e.__cause__
    return (
        cause is not None
        and "Connection closed" in str(cause)
        and type(cause).__name__ in {"MCPError", "McpError"}
    )


# Exceptions that are pydantic-ai's control flow, not failures of the server.
_PASS = (ApprovalRequired, CallDeferred, ModelRetry, ToolFailed, SkipToolExecution, UserError)


class ServerToolset(WrapperToolset[Any]):
    """One server's tools for one agent's configuration: fail fast at start, a timeout on every call."""

    def __init__(self, server: Server, timeout: float) -> None:
        super().__init__(server.toolset)
        self.server = server
        self.timeout = timeout

    async def __aenter__(self) -> ServerToolset:
        server = self.server
        running = bool(server.toolset.is_running)
        try:
            await asyncio.wait_for(self.wrapped.__aenter__(), START_TIMEOUT)
        except _PASS:
            raise
        except Exception as e:
            await server.stop()
            if server.stderr:
                await server.stderr.settle()
            raise server.failure("could not be started", describe(e)) from None
        if not running:
            server.started()
        return self

    async def get_tools(self, ctx: Any) -> Any:
        server = self.server
        try:
            return await asyncio.wait_for(self.wrapped.get_tools(ctx), LIST_TIMEOUT)
        except _PASS:
            raise
        except Exception as e:
            await server.stop()
            if server.stderr:
                await server.stderr.settle()
            raise server.failure("did not list its tools", describe(e)) from None

    async def call_tool(self, name: str, tool_args: dict[str, Any], ctx: Any, tool: Any) -> Any:
        server = self.server
        try:
            return await asyncio.wait_for(self.wrapped.call_tool(name, tool_args, ctx, tool), self.timeout)
        except TimeoutError:
            await server.stop(f"a call to {name} did not finish within {self.timeout:g} seconds")
            return (
                f"error: MCP server {server.name!r} did not answer within {self.timeout:g} seconds; "
                "it was stopped (the next call starts it again)"
            )
        except asyncio.CancelledError:
            server.stop_soon(f"a call to {name} was cancelled")
            raise
        except ModelRetry as e:  # a tool's error, for the model to correct; or the connection's end
            if not server.broken and not _connection_lost(e):
                raise
            why = server.broken or describe(e.__cause__ or e)
        except _PASS:
            raise
        except Exception as e:
            why = server.broken or describe(e)
        await server.stop()
        return f"error: MCP server {server.name!r} failed: {why} (the next call starts it again)"


_servers: dict[tuple[Any, ...], Server] = {}  # definition -> its server in this worker


def toolset(config: ToolConfig) -> Any:
    """The server's tools for this configuration, offered to the model as `<server>_<tool>`."""
    options = config.options
    env_items = tuple(sorted((options.get("env") or {}).items()))
    key = (
        config.name,
        tuple(options.get("command") or ()),
        options.get("url"),
        env_items,
        repr(options.get("sandbox")),
    )
    server = _servers.get(key)
    if server is None:
        server = _servers[key] = Server(config)
    tools: Any = ServerToolset(server, float(config.timeout)).prefixed(config.name)
    if config.approval == "required":
        tools = tools.approval_required()
    return tools


async def close_all() -> None:
    """Stop every MCP server process this worker started."""
    servers = list(_servers.values())
    _servers.clear()
    for server in servers:
        await server.close()


def setup_failure(error: BaseException) -> str | None:
    """The message of an MCP server that could not be started, when that is what `error` (an activity's
    failure, as the workflow sees it) comes down to; else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ApplicationError) and seen.type == FAILED:
            return seen.message
        seen = seen.__cause__
    return None

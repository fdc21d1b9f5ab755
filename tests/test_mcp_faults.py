"""MCP servers that misbehave (issue 14, fault 5): one that exits or never answers fails fast, naming
the server; every call honours its timeout; output is bounded; nothing outlives the runner; the log
cap holds. With real server processes (tests/doubles/mcp_faulty_server.py) driven through the runner's
own toolsets (runner/tools.py, runner/mcp_servers.py), without the whole server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from pydantic_ai import RunContext
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RunUsage
from temporalio.exceptions import ApplicationError

from stigmer.agents.tools import ToolConfig
from stigmer.paths import Paths
from stigmer.runner import mcp_servers
from stigmer.runner import tools as runner_tools
from stigmer.services import spawn
from stigmer.tools import procs
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI

SERVER = Path(__file__).parent / "doubles" / "mcp_faulty_server.py"
WORKER = Path(__file__).parent / "doubles" / "tool_worker.py"
linux_only = pytest.mark.skipif(
    procs.mechanism() is None, reason=f"no guardian here: {procs.why_not() or 'not Linux'}"
)
T = TypeVar("T")


def _config(
    mode: str = "serve", *, timeout: float = 30, approval: str = "never", rw: Path | None = None
) -> ToolConfig:
    sandbox = {"sandbox": {"paths": {"rw": [str(rw)]}}} if rw else {}  # where it may write (a pid file)
    return ToolConfig(
        kind="mcp",
        approval=approval,
        timeout=timeout,
        retries=0,
        options={"command": [sys.executable, str(SERVER), mode], **sandbox},
        name="faulty",
    )


def _ctx() -> RunContext[Any]:
    return RunContext(deps=None, model=TestModel(), usage=RunUsage())


def _run(body: Callable[[], Awaitable[T]]) -> T:
    """Run `body` in a fresh event loop, and stop every MCP server it started in that same loop."""

    async def main() -> T:
        try:
            return await body()
        finally:
            await runner_tools.close_servers()

    return asyncio.run(main())


async def _call(toolset: Any, tool: str, **args: Any) -> Any:
    ctx = _ctx()
    async with toolset:
        offered = await toolset.get_tools(ctx)
        return await toolset.call_tool(f"faulty_{tool}", args, ctx, offered[f"faulty_{tool}"])


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def _written(path: Path) -> bool:
    return path.exists() and path.read_text().strip().isdigit()


def _servers_running() -> list[psutil.Process]:
    """The faulty servers (and their guardians) that this process's toolsets started, by the mark tool
    processes carry: not those of the tests that pytest-xdist runs in other processes meanwhile."""
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        if (
            str(SERVER) in " ".join(p.info["cmdline"] or [])
            and (p.info["environ"] or {}).get(procs.OWNER_ENV) == procs.owner()
            and not _gone(p.pid)
        ):
            found.append(p)
    return found


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    """Every test stops what it started; a failing one too."""
    yield
    for p in _servers_running():
        p.kill()


# -- start failures ----------------------------------------------------------------------------------
@pytest.mark.alone  # within 10 s: two Python start-ups, which other tests' CPU can stretch past it
def test_a_server_that_exits_fails_at_once_naming_it() -> None:
    async def body() -> None:
        await _call(runner_tools.mcp_toolset(_config("exit")), "echo", text="hi")

    started = time.monotonic()
    with pytest.raises(ApplicationError) as failed:
        _run(body)
    assert time.monotonic() - started < 10
    error = failed.value
    assert error.non_retryable and error.type == mcp_servers.FAILED  # Temporal does not try 11 times
    assert (
        error.message.startswith("MCP server 'faulty' (")
        and "could not be started: it exited" in error.message
    )
    assert "cannot open the database /nonexistent/notes.db" in error.message  # its own words, from stderr
    assert "LLM" not in error.message


@pytest.mark.alone  # within the timeout + 5 s: Python start-ups and a stop, stretched by other tests' CPU
def test_a_silent_server_fails_within_the_start_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real limits: a start fails within ~20 s (the handshake's, then the stop's ~3 s), < 30 s.
    assert mcp_servers.HANDSHAKE_TIMEOUT < mcp_servers.START_TIMEOUT <= 20
    assert mcp_servers.LIST_TIMEOUT <= 20
    monkeypatch.setattr(mcp_servers, "HANDSHAKE_TIMEOUT", 2.0)
    monkeypatch.setattr(mcp_servers, "START_TIMEOUT", 3.0)

    async def body() -> None:
        await _call(runner_tools.mcp_toolset(_config("silent")), "echo", text="hi")

    started = time.monotonic()
    with pytest.raises(ApplicationError, match="MCP server 'faulty' .* could not be started: it did not"):
        _run(body)
    assert time.monotonic() - started < 3.0 + 5
    _wait(lambda: not _servers_running(), 10, "the silent server stopped")


@pytest.fixture
def model(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """A scripted OpenAI-compatible model for the worker (as in test_tools_e2e.py)."""
    fake = FakeOpenAI(key="sk-tools")
    with fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-tools")
        yield fake


@pytest.mark.alone  # within 30 s, the CLI and the worker's start-ups included
@pytest.mark.usefixtures("stop_server")
def test_through_the_server_a_start_failure_fails_the_execution_at_once_naming_the_server(
    model: FakeOpenAI, tmp_path: Path
) -> None:
    spec = tmp_path / "agent.yaml"
    spec.write_text(
        f"name: broken\ninstructions: x\nmcp_servers:\n  - name: faulty\n    command: [{sys.executable}, {SERVER}, exit]\n"
    )
    assert run_cli("agent", "apply", "-f", str(spec), timeout=240).returncode == 0
    model.script += [{"content": "never asked"}]
    started = time.monotonic()
    r = run_cli("run", "broken", "-m", "go", timeout=240)
    assert time.monotonic() - started < 30  # not 11 attempts over 428 s
    assert r.returncode != 0
    assert "MCP server 'faulty'" in r.stdout and "cannot open the database" in r.stdout, r.stdout + r.stderr
    assert "LLM" not in r.stdout + r.stderr and not model.requests


def test_the_workflow_names_the_server_not_the_llm() -> None:
    failure = ApplicationError(
        "MCP server 'faulty' (x) could not be started: it exited.", type=mcp_servers.FAILED
    )
    activity_error = RuntimeError("Activity task failed")
    activity_error.__cause__ = failure
    assert (
        mcp_servers.setup_failure(activity_error)
        == "MCP server 'faulty' (x) could not be started: it exited."
    )
    assert mcp_servers.setup_failure(RuntimeError("the model failed")) is None


# -- calls ---------------------------------------------------------------------------------------------
@pytest.mark.alone  # within the timeout + 5 s
def test_a_call_that_hangs_honours_its_timeout_and_the_server_is_restarted() -> None:
    async def body() -> tuple[str, float, str, str]:
        toolset = runner_tools.mcp_toolset(_config(timeout=2))
        first = str(await _call(toolset, "pid"))
        started = time.monotonic()
        answer = str(await _call(toolset, "hang"))
        took = time.monotonic() - started
        return first, took, answer, str(await _call(toolset, "pid"))

    first, took, answer, second = _run(body)
    assert answer.startswith("error: MCP server 'faulty' did not answer within 2 seconds; it was stopped")
    assert took < 2 + 5  # the timeout, then stopping the server
    assert _gone(int(first)) and second != first  # the stuck server was stopped; the next call started one


def test_a_cancelled_call_stops_the_server() -> None:
    async def body() -> bool:
        toolset = runner_tools.mcp_toolset(_config(timeout=60))
        pid = int(await _call(toolset, "pid"))
        call = asyncio.ensure_future(_call(toolset, "hang"))
        await asyncio.sleep(1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(200):  # before the worker stops its servers (close_servers)
            if _gone(pid):
                return True
            await asyncio.sleep(0.05)
        return False

    assert _run(body), "the server of a cancelled call was not stopped within 10 s"


@pytest.mark.alone  # a wall-clock bound and this process's CPU time, measured
def test_a_server_that_floods_its_output_is_stopped_and_the_log_stays_small() -> None:
    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(self.format(record))

    handler = Keep()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    me = psutil.Process()
    try:

        async def body() -> tuple[str, float, float]:
            toolset = runner_tools.mcp_toolset(_config(timeout=60))
            started = time.monotonic()
            answer = str(await _call(toolset, "flood"))
            took = time.monotonic() - started
            busy = sum(me.cpu_times()[:2])
            await asyncio.sleep(2)
            return answer, took, sum(me.cpu_times()[:2]) - busy

        answer, took, cpu = _run(body)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert answer.startswith(
        "error: MCP server 'faulty' failed: it wrote 100 lines that are not MCP messages"
    )
    assert took < 30  # stopped for flooding, long before its 60 s timeout
    assert cpu < 0.5  # nothing keeps the runner busy afterwards
    assert not _servers_running()
    size = sum(len(line) for line in logged)
    assert size < 100_000, f"{size} bytes logged"
    parse_errors = [line for line in logged if "Failed to parse JSONRPC" in line]
    assert 0 < len(parse_errors) <= mcp_servers.LOG_LINES and all("Traceback" not in e for e in parse_errors)
    chatter = [line for line in logged if "MCP server 'faulty': a very chatty server" in line]
    assert 0 < len(chatter) <= mcp_servers.LOG_LINES


def test_stderr_is_read_at_a_bounded_rate_and_its_tail_kept() -> None:
    stderr = mcp_servers.Stderr("chatty", rate=100_000)
    writer = subprocess.Popen(
        [sys.executable, "-c", "import os\nwhile True: os.write(2, b'x' * 999 + b'\\n')"],
        stderr=stderr.writer,
    )
    try:
        time.sleep(2)
        assert stderr.total <= 100_000 * 3 + 65536 * 2  # ~2 s at the rate, not the pipe's speed
        assert stderr.tail().endswith("x" * 100)
    finally:
        writer.kill()
        writer.wait(10)
        stderr.close()


# -- nothing outlives the runner -----------------------------------------------------------------------
def test_stopping_the_servers_stops_what_they_started() -> None:
    out = Path(os.environ["STIGMER_HOME"]).parent / "out"
    out.mkdir(exist_ok=True)
    pid_file = out / "escaped.pid"

    async def body() -> tuple[str, str]:
        toolset = runner_tools.mcp_toolset(_config(rw=out))
        escaped = str(await _call(toolset, "spawn", pid_file=str(pid_file)))
        return str(await _call(toolset, "pid")), escaped

    server, escaped = (int(p) for p in _run(body))  # _run ends with close_servers, as the worker's stop
    try:
        if procs.mechanism():
            _wait(lambda: _gone(server) and _gone(escaped), 10, "the server and its setsid'd child stopped")
        else:
            _wait(lambda: _gone(server), 10, "the server stopped")
    finally:
        for pid in (server, escaped):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@linux_only
def test_a_killed_worker_takes_its_mcp_servers_with_it(tmp_path: Path) -> None:
    tmp_path = tmp_path / "out"  # a folder of its own: the server may write only what it is granted
    tmp_path.mkdir()
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), "mcp", str(tmp_path), str(SERVER)], stdin=subprocess.DEVNULL
    )
    pids: list[int] = []
    try:
        for name in ("server.pid", "escaped.pid"):
            path = tmp_path / name
            _wait(functools.partial(_written, path), 60, f"{name} written")
            pids.append(int(path.read_text()))
        assert not any(_gone(p) for p in pids)
        worker.kill()
        worker.wait(10)
        _wait(lambda: all(_gone(p) for p in pids), 5, "the dead worker's MCP server and its child gone")
    finally:
        worker.kill()
        worker.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# -- the log cap -----------------------------------------------------------------------------------------
def test_rotated_logs_hold_the_cap_and_are_private(tmp_path: Path) -> None:
    cap = spawn.LOG_MAX_BYTES
    assert cap == 10 * 1024 * 1024
    log = tmp_path / "agent-runner.log"
    line = b"x" * 99 + b"\n"
    log.write_bytes(line * 250_000)  # 25 MB: written faster than the supervisor looked
    log.chmod(0o644)
    assert spawn.rotate_running(log)
    rotated = log.with_name("agent-runner.log.1")
    assert cap - 100 < rotated.stat().st_size <= cap  # the newest 10 MB, from a line's start
    assert rotated.read_bytes().startswith(line) and stat.S_IMODE(rotated.stat().st_mode) == 0o600
    assert log.stat().st_size == 0

    log.write_bytes(line * 250_000)
    spawn.rotate_log(log)  # at a service's start
    assert not log.exists()
    for name in ("agent-runner.log.1", "agent-runner.log.2"):
        kept = log.with_name(name)
        assert kept.stat().st_size <= cap and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.part"))


def test_library_logs_of_each_line_are_rate_limited() -> None:
    limit = mcp_servers.RateLimitedLog(n=3, window=60)
    logger = logging.getLogger("stigmer.test.flood")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.addFilter(limit)
    logger.propagate = False
    try:
        for _ in range(1000):
            try:
                raise ValueError("not JSON\nat all")
            except ValueError:
                logger.exception("Failed to parse JSONRPC message from server")
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(limit)
    assert len(records) == 3
    assert all(r.exc_info is None and r.getMessage().endswith("not JSON at all") for r in records)

"""Processes started for tools never outlive their call nor their worker (issue 14, fault 4), and the
shell tool takes a command line when the agent file allows it (fault 8).

The guardian is tested for real: a worker-like process (tests/doubles/tool_worker.py) runs a command
whose child moves to a session of its own, and is killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    RetryPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.toolsets._dynamic import DynamicToolset

from stigmer.agents.tools import ToolConfig
from stigmer.runner import tools as runner_tools
from stigmer.tools import guardian, procs, shell
from stigmer.tools.errors import ToolFailure
from stigmer.tools.workspace import Workspace

linux_only = pytest.mark.skipif(
    procs.mechanism() is None, reason=f"no guardian here: {procs.why_not() or 'not Linux'}"
)
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX processes")
WORKER = Path(__file__).parent / "doubles" / "tool_worker.py"


def _gone(pid: int) -> bool:
    """No such process, or a zombie (an init that does not reap, as in some containers, keeps those)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took for check() to hold; fails the test after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def _pid(path: Path, timeout: float = 30) -> int:
    _wait(lambda: path.exists() and path.read_text().strip().isdigit(), timeout, f"{path.name} written")
    return int(path.read_text())


def _kill(pids: list[int]) -> None:
    """SIGKILL each, and the process group each leads (a setsid'd shell's sleep)."""
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    return Workspace(tmp_path / "shell-ws").root


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    """Pids to SIGKILL after the test, whatever it found (a failing test leaves nothing running)."""
    pids: list[int] = []
    yield pids
    _kill(pids)


# -- the platform's choice ---------------------------------------------------------------------------
def test_the_mechanism_is_chosen_by_platform() -> None:
    assert procs.mechanism("linux") == "guardian"
    assert procs.why_not("linux") == ""
    for platform in ("darwin", "win32"):
        assert procs.mechanism(platform) is None
        assert "subreaper" in procs.why_not(platform) and "next start" in procs.why_not(platform)
    argv = procs.guarded_argv(["echo", "hi"], grace=1.5)
    assert argv[:4] == [sys.executable, "-I", "-S", str(procs.GUARDIAN)]
    assert argv[4:] == [str(os.getpid()), "1.5", "--", "echo", "hi"]
    assert procs.GUARDIAN.is_file()


def test_without_a_guardian_commands_still_run_in_their_own_group(
    cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What macOS does (and Linux without a Python to run the guardian): the group is stopped."""
    monkeypatch.setattr(procs, "available", lambda: False)
    result = shell.run(["sh", "-c", 'sleep 100 & echo "$!"'], cwd=cwd, timeout=30)
    assert result.exit_code == 0 and _gone(int(result.output.split()[0]))
    with pytest.raises(ToolFailure, match="command not found"):
        shell.run(["no-such-program-xyz"], cwd=cwd, timeout=10)


# -- a worker killed during a call -------------------------------------------------------------------
@linux_only
def test_a_killed_worker_takes_its_command_and_setsid_children_with_it(
    tmp_path: Path, cleanup: list[int]
) -> None:
    worker = subprocess.Popen([sys.executable, str(WORKER), "shell", str(tmp_path)], stdin=subprocess.DEVNULL)
    try:
        command, escaped = _pid(tmp_path / "command.pid"), _pid(tmp_path / "escaped.pid")
        cleanup += [command, escaped]
        assert os.getsid(escaped) == escaped != os.getsid(command)  # it really left the command's session
        assert not _gone(command) and not _gone(escaped)
        worker.kill()  # SIGKILL: the worker cannot clean up anything itself
        worker.wait(10)
        took = _wait(lambda: _gone(command) and _gone(escaped), 5, "the dead worker's command tree gone")
        assert took < 5
    finally:
        worker.kill()
        worker.wait(10)


@linux_only
def test_a_guardian_whose_worker_is_already_gone_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(procs.GUARDIAN), "1", "1", "--", "touch", str(marker)],
        timeout=30,
    )
    assert done.returncode == 128 + signal.SIGKILL and not marker.exists()


# -- a call that ends ----------------------------------------------------------------------------------
@linux_only
@pytest.mark.parametrize(
    "script",
    [
        # moves to a session of its own and keeps its output open
        "setsid sh -c 'echo $$ > escaped.pid; exec sleep 100' & sleep 0.5; echo done",
        # the same, detached from the output
        "setsid sh -c 'echo $$ > escaped.pid; exec sleep 100' >/dev/null 2>&1 & sleep 0.5; echo done",
        # a double fork: its parent exits at once, and it ignores SIGTERM
        "(setsid sh -c 'trap \"\" TERM; echo $$ > escaped.pid; sleep 100; true' >/dev/null 2>&1 &); sleep 0.5; echo done",
    ],
    ids=["setsid", "setsid-detached", "double-fork-ignoring-sigterm"],
)
def test_what_a_command_left_running_in_another_session_is_stopped(
    cwd: Path, script: str, cleanup: list[int]
) -> None:
    started = time.monotonic()
    result = shell.run(["sh", "-c", script], cwd=cwd, timeout=30)
    escaped = int((cwd / "escaped.pid").read_text())
    cleanup.append(escaped)
    assert (result.exit_code, result.output, result.timed_out) == (0, "done\n", False)
    assert _gone(escaped)
    assert time.monotonic() - started < 0.5 + shell.TERM_GRACE + shell.DRAIN_AFTER_EXIT + 3


@linux_only
def test_a_timeout_stops_the_setsid_children_too(cwd: Path, cleanup: list[int]) -> None:
    script = "setsid sh -c 'trap \"\" TERM; echo $$ > escaped.pid; sleep 100; true' & echo $$; sleep 100"
    started = time.monotonic()
    result = shell.run(["sh", "-c", script], cwd=cwd, timeout=1)
    escaped = int((cwd / "escaped.pid").read_text())
    cleanup.append(escaped)
    assert result.timed_out and result.exit_code < 0
    assert _gone(int(result.output.split()[0])) and _gone(escaped)
    assert time.monotonic() - started < 1 + shell.TERM_GRACE + shell.DRAIN_AFTER_EXIT + 3


@linux_only
def test_the_guardian_is_invisible_to_the_command(cwd: Path) -> None:
    """Default signal handling and mask (Python ignores SIGPIPE; exec would pass that on), the exit code
    or the signal, and the errors of a program that cannot run read as without a guardian."""
    status = shell.run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"], cwd=cwd, timeout=10).output
    assert status.split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]
    assert shell.run(["sh", "-c", "exit 7"], cwd=cwd, timeout=10).exit_code == 7
    assert shell.run(["sh", "-c", "kill -USR1 $$"], cwd=cwd, timeout=10).exit_code == -signal.SIGUSR1
    assert not list(cwd.glob("core*"))  # re-raising the signal left no core dump
    assert shell.run(["sh", "-c", "yes | head -c 4"], cwd=cwd, timeout=10).output == "y\ny\n"
    script = cwd / "script.sh"
    script.write_text("#!/bin/sh\necho from the script\n")
    with pytest.raises(ToolFailure, match="'./script.sh' cannot be run: permission denied"):
        shell.run(["./script.sh"], cwd=cwd, timeout=10)
    script.chmod(0o700)
    assert shell.run(["./script.sh"], cwd=cwd, timeout=10).output == "from the script\n"
    with pytest.raises(ToolFailure, match="command not found: 'no-such-program-xyz'"):
        shell.run(["no-such-program-xyz"], cwd=cwd, timeout=10)
    with pytest.raises(ToolFailure, match="command not found: '/no/such/program'"):
        shell.run(["/no/such/program"], cwd=cwd, timeout=10)


@linux_only
def test_the_guardian_finds_every_descendant() -> None:
    child = subprocess.Popen(["sh", "-c", "sleep 100 & wait"])
    try:
        _wait(lambda: len(psutil.Process(child.pid).children()) == 1, 10, "the grandchild started")
        grandchild = psutil.Process(child.pid).children()[0].pid
        assert {child.pid, grandchild} <= set(guardian.descendants(os.getpid()))
    finally:
        _kill([child.pid, *[p.pid for p in psutil.Process(child.pid).children()]])
        child.wait(10)


# -- the backstop: what a dead worker left running is killed when a worker starts -----------------------
@posix_only
def test_leftovers_of_a_dead_worker_are_killed_at_the_next_start(tmp_path: Path, cleanup: list[int]) -> None:
    dead = subprocess.Popen(["sleep", "100"])
    dead_owner = f"{dead.pid}:{psutil.Process(dead.pid).create_time():.2f}"
    dead.kill()
    dead.wait(10)
    env = dict(os.environ)
    left = subprocess.Popen(
        ["sleep", "100"], env={**env, procs.OWNER_ENV: dead_owner}, start_new_session=True
    )
    mine = subprocess.Popen(["sleep", "100"], env={**env, **procs.marker()}, start_new_session=True)
    unmarked = subprocess.Popen(["sleep", "100"], env=env, start_new_session=True)
    cleanup += [left.pid, mine.pid, unmarked.pid]
    try:
        assert (left.pid, dead_owner) in procs.leftovers()
        assert procs.kill_leftovers() >= 1
        assert left.wait(10) == -signal.SIGKILL
        assert mine.poll() is None and unmarked.poll() is None  # a live owner's, and a stranger
    finally:
        for p in (left, mine, unmarked):
            p.kill()
            p.wait(10)


def test_tool_processes_carry_the_mark_of_their_worker(cwd: Path) -> None:
    assert procs.owner() == f"{os.getpid()}:{psutil.Process().create_time():.2f}"
    assert f"{procs.OWNER_ENV}={procs.owner()}" in shell.run(["env"], cwd=cwd, timeout=10).output.splitlines()


# -- allow_shell_string (fault 8), through the tool the model calls -------------------------------------
@dataclass
class _Deps:
    tools: list[dict[str, Any]]
    agent: str = "shell-test"
    workspace: str | None = None
    seen: list[str] = field(default_factory=list)


def _run_agent(options: dict[str, Any], argv: object) -> tuple[list[dict[str, Any]], str]:
    """One run of an agent whose model calls run_command(argv=...) once: the tool's JSON schema as the
    model saw it, and what the tool answered."""
    config = ToolConfig(kind="shell", approval="never", timeout=20, retries=0, options=options)
    schemas: list[dict[str, Any]] = []
    answers: list[str] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        schemas.extend(t.parameters_json_schema for t in info.function_tools if t.name == "run_command")
        for message in messages:
            for part in getattr(message, "parts", []):
                if isinstance(part, RetryPromptPart | ToolReturnPart):  # an answer, or the arguments refused
                    answers.append(str(part.content))
                    return ModelResponse(parts=[TextPart("done")])
        return ModelResponse(parts=[ToolCallPart("run_command", {"argv": argv})])

    agent = Agent(FunctionModel(model), deps_type=_Deps, toolsets=[DynamicToolset(runner_tools.build)])
    agent.run_sync("go", deps=_Deps(tools=[asdict(config)]))
    return schemas, answers[0]


def test_allow_shell_string_takes_a_command_line() -> None:
    schemas, answer = _run_agent({"allow_shell_string": True}, "echo hi | tr h H")
    assert answer == "[exit code 0]\nHi\n"
    accepted = schemas[0]["properties"]["argv"]["anyOf"]
    assert {"type": "string"} in accepted and {"items": {"type": "string"}, "type": "array"} in accepted
    _, answer = _run_agent({"allow_shell_string": True}, ["echo", "a list", "still works"])
    assert answer == "[exit code 0]\na list still works\n"


def test_without_allow_shell_string_a_command_line_is_refused() -> None:
    schemas, answer = _run_agent({}, "echo hi | tr h H")
    assert schemas[0]["properties"]["argv"] == {"items": {"type": "string"}, "type": "array"}
    assert "Input should be a valid list" in answer and "Hi" not in answer  # refused by the schema
    _, answer = _run_agent({}, ["echo", "hi"])
    assert answer == "[exit code 0]\nhi\n"

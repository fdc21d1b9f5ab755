"""Secrets out of reach of /proc/<pid>/environ (issue 19): the daemon, the agent runner and the API get
the LLM key through an inherited pipe, never in their initial environment (which is what
/proc/<pid>/environ shows, to any process of the user), and still use it; a runner the supervisor
restarts gets it again from the daemon's memory."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from stigmer.paths import Paths
from stigmer.services import secret_pipe, spawn
from stigmer.services.env import child_env
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI

posix_only = pytest.mark.skipif(os.name != "posix", reason="pipes passed by number, /proc")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/<pid>/environ")


def _environ(pid: int) -> bytes:
    """The initial environment block as any process of the user would read it; b"" when the kernel
    refuses (a non-dumpable process read by another user's process: out of reach too)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except PermissionError:
        return b""


_CHILD = r"""
import json, os, sys
from stigmer.services import secret_pipe
before = open("/proc/self/environ", "rb").read()
count = secret_pipe.receive()
after = open("/proc/self/environ", "rb").read()  # read as the process itself, before protect()
protected = secret_pipe.protect()
import ctypes
dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
fd_gone = True
try:
    os.fstat(int(sys.argv[1]))
    fd_gone = False
except OSError:
    pass
print(json.dumps({
    "count": count,
    "key": os.environ.get("MY_API_KEY"),
    "plain": os.environ.get("PLAIN"),
    "fd_var": os.environ.get("STIGMER_SECRETS_FD"),
    "in_block": b"sk-pipe" in before + after,
    "fd_gone": fd_gone,
    "protected": protected,
    "dumpable": dumpable,
}))
"""


@posix_only
@linux_only
def test_secrets_reach_a_child_through_the_pipe_not_its_environment(tmp_path: Path) -> None:
    env = child_env(
        extra={"MY_API_KEY": "sk-pipe-123", "PLAIN": "visible", "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    log = tmp_path / "child.log"
    # The pipe's number is what the parent gives; the child checks that it closed it.
    public, hidden = secret_pipe.split(env)
    assert "MY_API_KEY" in hidden and "MY_API_KEY" not in public and public["PLAIN"] == "visible"
    fd = secret_pipe.send({"X": "y"})
    os.close(fd)
    proc, _rec = spawn.start_detached(
        [sys.executable, "-c", _CHILD, str(fd)],
        env=env,
        log_path=log,
        pid_path=None,
        service="child",
        info={},
        secrets_by_pipe=True,
    )
    assert proc.wait(timeout=30) == 0, log.read_text()
    out = json.loads(log.read_text().strip().splitlines()[-1])
    assert out == {
        "count": 1,
        "key": "sk-pipe-123",  # in os.environ, for the code that reads settings
        "plain": "visible",
        "fd_var": None,  # read and forgotten
        "in_block": False,  # set after exec: not in /proc/<pid>/environ
        "fd_gone": True,
        "protected": True,
        "dumpable": 0,
    }


def test_without_the_pipe_nothing_changes(tmp_path: Path) -> None:
    environ = {"A": "1"}
    assert secret_pipe.receive(environ) == 0 and environ == {"A": "1"}
    environ = {secret_pipe.ENV: "999999"}  # not an open file: nothing read, nothing raised
    assert secret_pipe.receive(environ) == 0 and environ == {}
    with pytest.raises(ValueError):
        secret_pipe.send({"K_API_KEY": "x" * (secret_pipe.MAX_BYTES + 1)})


def _auth(headers: dict[str, str]) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == "authorization"), None)


def _status(env: dict[str, str]) -> dict[str, object]:
    r = run_cli("server", "status", "--json", env=env)
    data = json.loads(r.stdout)
    assert isinstance(data, dict)
    return data


def _pid(env: dict[str, str], service: str) -> int:
    svc = _status(env)["services"][service]  # type: ignore[index]
    return int(svc["pid"]) if svc.get("state") == "running" and svc.get("pid") else 0


@posix_only
@linux_only
@pytest.mark.usefixtures("stop_server")
def test_a_real_server_keeps_the_llm_key_out_of_environ(isolated_home: Paths) -> None:
    key = "sk-pipe-" + secrets.token_hex(8)
    with FakeOpenAI(key=key) as fake:
        env = {
            "STIGMER_LLM_PROVIDER": "openai",
            "STIGMER_LLM_BASE_URL": fake.url + "/v1",
            "STIGMER_LLM_API_KEY": key,
        }
        r = run_cli("server", env=env, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        from stigmer.server.state import daemon_record

        daemon = daemon_record(isolated_home)
        assert daemon is not None
        runner, api = _pid(env, "agent-runner"), _pid(env, "server")
        assert runner and api
        for pid in (daemon.pid, runner, api):
            block = _environ(pid)
            assert key.encode() not in block, pid
            # The rest of the environment is there, and the pipe's number (no secret) that said where.
            assert not block or (b"STIGMER_HOME=" in block and b"STIGMER_SECRETS_FD=" in block), pid

        r = run_cli("run", "-m", "ping pong", env=env, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "echo: ping pong" in r.stdout
        assert fake.headers and _auth(fake.headers[-1]) == f"Bearer {key}"
        seen = len(fake.headers)

        # The supervisor restarts a runner that dies: the daemon gives the new one the key again.
        os.kill(runner, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while (new := _pid(env, "agent-runner")) in (0, runner) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert new not in (0, runner), _status(env)
        assert psutil.pid_exists(new)
        assert key.encode() not in _environ(new)
        r = run_cli("run", "-m", "after restart", env=env, timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "echo: after restart" in r.stdout
        assert len(fake.headers) > seen and _auth(fake.headers[-1]) == f"Bearer {key}"


def test_our_python_services_take_secrets_by_pipe(isolated_home: Paths) -> None:
    from stigmer.config import store
    from stigmer.server import specs

    settings = store.load(isolated_home)
    assert specs.runner_spec(settings, isolated_home).secrets_by_pipe
    assert specs.api_spec(settings, isolated_home).secrets_by_pipe

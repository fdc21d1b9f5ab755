"""The Stigmer server end to end: the real `stigmer` command, the real Temporal dev server, the real
built-in engine on the starter model, real processes killed with SIGKILL. Every test stops everything it
started and checks, by pid, that nothing is left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from stigmer.paths import Paths
from stigmer.server.specs import temporal_binary
from tests.conftest import run_cli
from tests.doubles.archives import free_port
from tests.doubles.fake_llm_apis import FakeOpenAI


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _pids(status: dict[str, Any]) -> list[int]:
    pids = [status["pid"]] if status.get("pid") else []
    return pids + [s["pid"] for s in status.get("services", {}).values() if s.get("pid")]


def _status(env: dict[str, str]) -> dict[str, Any]:
    r = run_cli("server", "status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def _wait(cond: Callable[[], bool], timeout: float = 30, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError("condition not met in time")


def _base_env(isolated_home: Paths) -> dict[str, str]:
    return {
        "STIGMER_SERVER_PORT": str(free_port()),
        "STIGMER_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "STIGMER_TEMPORAL_UI_PORT": str(free_port()),
        "STIGMER_DAEMON_CHECK_INTERVAL": "0.25",
    }


@pytest.fixture
def cleanup() -> Iterator[Callable[[dict[str, str]], None]]:
    """Registers environments whose server must be stopped (and found gone) at the end."""
    envs: list[dict[str, str]] = []
    yield envs.append
    for env in envs:
        pids = []
        r = run_cli("server", "status", "--json", env=env)
        if r.returncode == 0 and r.stdout.strip():
            pids = _pids(json.loads(r.stdout))
        run_cli("server", "stop", env=env)
        for pid in pids:
            _wait(lambda pid=pid: _gone(pid), timeout=30)


@pytest.fixture
def engine_env(isolated_home: Paths, cleanup: Callable[[dict[str, str]], None]) -> dict[str, str]:
    env = {
        **_base_env(isolated_home),
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "1024",
    }
    cleanup(env)
    return env


@pytest.fixture
def remote_env(isolated_home: Paths, cleanup: Callable[[dict[str, str]], None]) -> Iterator[dict[str, str]]:
    """A remote LLM stand-in: for tests about the server itself, with no engine to load."""
    with FakeOpenAI(key="sk-e2e") as api:
        env = {
            **_base_env(isolated_home),
            "STIGMER_LLM_PROVIDER": "openai",
            "STIGMER_LLM_BASE_URL": api.url + "/v1",
            "STIGMER_LLM_API_KEY": "sk-e2e",
        }
        cleanup(env)
        yield env


def test_start_status_restart_logs_stop(isolated_home: Paths, engine_env: dict[str, str]) -> None:
    r = run_cli("server", env=engine_env, merged=True, timeout=180)
    assert r.returncode == 0, r.stdout
    out = r.stdout
    for phase in ("Starting: Temporal", "Starting: agent runner", "Starting: Stigmer API", "Ready: Temporal"):
        assert phase in out, phase
    assert out.index("✓ Ready!") > out.index("Ready: agent runner")  # Ready only once all are healthy
    for line in ("Stigmer Server Status:", "Status: ✓ Running", "LLM Configuration:", "Web UI:"):
        assert line in out, line
    assert f"Port:   {engine_env['STIGMER_SERVER_PORT']}" in out
    assert "Provider: Local (built-in engine) ✓ Running" in out
    assert f"Temporal:  http://127.0.0.1:{engine_env['STIGMER_TEMPORAL_UI_PORT']}" in out

    status = _status(engine_env)
    assert status["running"] and status["phase"] == "ready"
    assert set(status["services"]) == {"llm", "temporal", "agent-runner", "server"}
    for name, svc in status["services"].items():
        assert svc["state"] == "running" and psutil.pid_exists(svc["pid"]), name
    text = run_cli("server", "status", env=engine_env).stdout
    for name in ("llm", "temporal", "agent-runner", "server"):
        assert f"{name}" in text and f"PID {status['services'][name]['pid']}" in text
    llm_address = engine_env["STIGMER_LLM_BASE_URL"].removeprefix("http://")
    assert status["services"]["llm"]["address"] == llm_address  # every row says where it listens
    assert f"PID {status['services']['llm']['pid']}   {llm_address}" in text

    # the real Temporal CLI sees the namespace, and the worker polling our task queue
    temporal = temporal_binary(isolated_home)
    address = engine_env["STIGMER_TEMPORAL_ADDRESS"]
    ns = subprocess.run(
        [temporal, "operator", "namespace", "list", "--address", address], capture_output=True, text=True
    )
    assert ns.returncode == 0 and "default" in ns.stdout
    tq = subprocess.run(
        [temporal, "task-queue", "describe", "--task-queue", "agent_execution_runner", "--address", address],
        capture_output=True,
        text=True,
    )
    assert f"{status['services']['agent-runner']['pid']}@" in tq.stdout  # the poller's identity

    # a second start finds everything running and changes nothing
    again = run_cli("server", env=engine_env)
    assert again.returncode == 0 and "was already running" in again.stdout
    assert _pids(_status(engine_env)) == _pids(status)

    logs = run_cli("server", "logs", "-n", "5", env=engine_env).stdout
    for component in ("llm", "temporal", "agent-runner", "server", "daemon"):
        assert f"[{component}" in logs, component
    only = run_cli("server", "logs", "-c", "temporal", "-n", "3", env=engine_env).stdout
    assert only and "[" not in only.splitlines()[0][:2]

    restarted = run_cli("server", "restart", env=engine_env, timeout=180)
    assert restarted.returncode == 0, restarted.stderr
    after = _status(engine_env)
    assert after["running"] and not set(_pids(after)) & set(_pids(status))
    assert all(_gone(pid) for pid in _pids(status))

    stop = run_cli("server", "stop", env=engine_env)
    assert stop.returncode == 0 and "Stigmer server stopped" in stop.stdout
    for pid in _pids(after):
        _wait(lambda pid=pid: _gone(pid), timeout=10)
    stopped = run_cli("server", "status", env=engine_env)
    assert "Status: ✗ Stopped" in stopped.stdout and "To start: stigmer server" in stopped.stdout
    assert not list(isolated_home.run_dir.glob("*.pid"))


@pytest.mark.parametrize("service", ["llm", "temporal", "agent-runner", "server"])
def test_killed_service_is_restarted_and_counted(
    isolated_home: Paths, engine_env: dict[str, str], service: str
) -> None:
    assert run_cli("server", env=engine_env, timeout=180).returncode == 0
    before = _status(engine_env)["services"][service]
    os.kill(before["pid"], signal.SIGKILL)

    def back() -> bool:
        svc = _status(engine_env)["services"][service]
        return svc["state"] == "running" and svc["pid"] not in (None, before["pid"]) and svc["restarts"] == 1

    _wait(back, timeout=60)
    svc = _status(engine_env)["services"][service]
    assert "exited" in (svc["last_failure"] or "")
    text = run_cli("server", "status", env=engine_env).stdout
    assert "restarts 1" in text and "last failure:" in text


def test_killed_daemon_is_replaced_and_services_adopted(
    isolated_home: Paths, remote_env: dict[str, str]
) -> None:
    assert run_cli("server", env=remote_env, timeout=120).returncode == 0
    before = _status(remote_env)
    os.kill(before["pid"], signal.SIGKILL)
    _wait(lambda: _gone(before["pid"]))
    left = [s["pid"] for s in before["services"].values() if s.get("pid")]
    assert all(psutil.pid_exists(p) for p in left)  # the services outlive their supervisor
    # and status says so: they run, nothing supervises them, the next `stigmer server` adopts them
    orphaned = _status(remote_env)
    assert not orphaned["running"] and orphaned["unsupervised"] and orphaned["phase"] == "unsupervised"
    assert {n: s["pid"] for n, s in orphaned["services"].items()} == {
        n: s["pid"] for n, s in before["services"].items() if s.get("pid")
    }
    assert all(s["state"] == "running" for s in orphaned["services"].values())
    text = run_cli("server", "status", env=remote_env).stdout
    assert "Status: ⚠ Services running, not supervised (the daemon is not running)" in text, text
    assert "Stopped" not in text and "The next `stigmer server` adopts them" in text
    for svc in orphaned["services"].values():
        assert f"PID {svc['pid']}" in text
    r = run_cli("server", env=remote_env, timeout=120)
    assert r.returncode == 0, r.stderr
    after = _status(remote_env)
    assert after["pid"] != before["pid"]
    assert [s["pid"] for s in after["services"].values() if s.get("pid")] == left  # adopted, no duplicates
    temporals = [p for p in psutil.process_iter(["cmdline"]) if "start-dev" in (p.info["cmdline"] or [])]
    assert len([p for p in temporals if str(isolated_home.data_dir) in " ".join(p.info["cmdline"])]) == 1


def test_a_service_that_cannot_start_leaves_nothing(isolated_home: Paths, remote_env: dict[str, str]) -> None:
    port = int(remote_env["STIGMER_SERVER_PORT"])
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        r = run_cli("server", env=remote_env, timeout=120)
    finally:
        blocker.close()
    assert r.returncode == 8, r.stderr
    assert (
        "Stigmer API failed" in r.stderr and f"Port {port}" in r.stderr and "stigmer server logs" in r.stderr
    )
    _wait(lambda: not [p for p in isolated_home.run_dir.glob("*.pid")], timeout=15)
    temporals = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(isolated_home.data_dir) in " ".join(p.info["cmdline"] or [])
    ]
    assert temporals == []


def test_an_llm_that_cannot_start_leaves_nothing(isolated_home: Paths, engine_env: dict[str, str]) -> None:
    # The daemon starts Temporal, the API and the worker while the command sets the LLM up; when that
    # fails, the daemon is told so, stops them all and exits: nothing is left, the error is the LLM's.
    port = int(engine_env["STIGMER_LLM_BASE_URL"].rsplit(":", 1)[1])
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        r = run_cli("server", env=engine_env, timeout=120)
    finally:
        blocker.close()
    assert r.returncode == 7, r.stderr
    assert f"Port {port}" in r.stderr and "Traceback" not in r.stderr
    _wait(lambda: not list(isolated_home.run_dir.glob("*.pid")), timeout=30)
    home = str(isolated_home.home)

    def ours() -> list[int]:
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid != os.getpid() and p.environ().get("STIGMER_HOME") == home:
                    found.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    _wait(lambda: ours() == [], timeout=30)
    state = json.loads((isolated_home.run_dir / "state.json").read_text())
    assert state["phase"] == "failed" and "abandoned" in state["message"]
    assert json.loads(run_cli("server", "status", "--json", env=engine_env).stdout)["running"] is False


def _get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_needs_its_token_and_this_machine(isolated_home: Paths, remote_env: dict[str, str]) -> None:
    import stat

    assert run_cli("server", env=remote_env, timeout=120).returncode == 0
    token_file = isolated_home.home / "api.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    base = f"http://127.0.0.1:{remote_env['STIGMER_SERVER_PORT']}"
    assert _get(base + "/health", {})[0] == 200  # no token needed, nothing told
    code, body = _get(base + "/v1/status", {})
    assert code == 401 and body["error"]["code"] == "unauthorized"
    assert _get(base + "/v1/status", {"Authorization": "Bearer wrong"})[0] == 401
    code, body = _get(base + "/v1/status", {"Authorization": f"Bearer {token}"})
    assert code == 200 and body["running"] is True
    code, body = _get(base + "/v1/status", {"Authorization": f"Bearer {token}", "Host": "evil.example"})
    assert code == 403 and body["error"]["code"] == "access_denied"
    code, _ = _get(
        base + "/v1/status", {"Authorization": f"Bearer {token}", "Origin": "https://evil.example"}
    )
    assert code == 403
    code, _ = _get(base + "/nope", {"Authorization": f"Bearer {token}"})
    assert code == 404
    assert (
        "sk-e2e" not in json.dumps(body)
        and "sk-e2e" not in run_cli("server", "status", env=remote_env).stdout
    )
    worker = _status(remote_env)["services"]["agent-runner"]["pid"]
    assert "HF_TOKEN" not in psutil.Process(worker).environ()


def test_concurrent_starts_give_one_set_of_services(isolated_home: Paths, remote_env: dict[str, str]) -> None:
    results: list[subprocess.CompletedProcess[str]] = []

    def one() -> None:
        results.append(run_cli("server", env=remote_env, timeout=180))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results]
    status = _status(remote_env)
    for r in results:
        assert f"PID:    {status['pid']}" in r.stdout  # every run shows the one real daemon
    assert sum("Ready! Stigmer server is running" in r.stdout for r in results) == 1
    assert sum("was already running" in r.stdout for r in results) == 4
    mine = [
        p
        for p in psutil.process_iter(["cmdline", "environ"])
        if (p.info.get("environ") or {}).get("STIGMER_HOME") == str(isolated_home.home)
    ]
    daemons = [p for p in mine if "stigmer.server.daemon" in " ".join(p.info["cmdline"] or [])]
    assert len(daemons) == 1


def test_external_temporal_starts_none(isolated_home: Paths, remote_env: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    external = subprocess.Popen(
        [
            temporal_binary(isolated_home),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--headless",
            "--db-filename",
            str(tmp_path / "ext.db"),
            "--log-level",
            "error",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        env = {**remote_env, "TEMPORAL_SERVICE_ADDRESS": f"127.0.0.1:{port}", "STIGMER_TEMPORAL_ADDRESS": ""}
        r = run_cli("server", env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        status = _status(env)
        assert status["services"]["temporal"]["state"] == "external"
        assert status["temporal"] == {
            "managed": False,
            "address": f"127.0.0.1:{port}",
            "namespace": "default",
        }
        assert status["services"]["agent-runner"]["state"] == "running"
        assert not (isolated_home.data_dir / "temporal.db").exists()
        run_cli("server", "stop", env=env)
        assert external.poll() is None  # not ours: never stopped
    finally:
        external.terminate()
        external.wait(15)

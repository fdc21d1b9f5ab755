"""Everything Stigmer keeps is the user's alone (README, "Files and permissions"): folders 0700, files
0600, whatever the user's umask. Each test runs with the usual umask (022), under which anything left
to it would come out 0755/0644: what the services create (Temporal's temporal.db, the worker's health
stamp, the files tools write), the Temporal database lock, rotated logs, the agents' workspaces."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer.paths import Paths
from stigmer.services import spawn
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX modes")


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_services_start_with_a_private_umask(tmp_path: Path) -> None:
    made = tmp_path / "made"
    code = f"import os; open({str(made / 'file')!r}, 'w').close(); os.mkdir({str(made / 'folder')!r})"
    made.mkdir()
    proc, _rec = spawn.start_detached(
        [sys.executable, "-c", code],
        env=dict(os.environ),
        log_path=tmp_path / "logs" / "svc.log",
        pid_path=None,
        service="svc",
        info={},
    )
    assert proc.wait(timeout=60) == 0, (tmp_path / "logs" / "svc.log").read_text()
    assert _mode(made / "file") == 0o600
    assert _mode(made / "folder") == 0o700
    assert _mode(tmp_path / "logs" / "svc.log") == 0o600


def test_rotated_logs_are_private(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "svc.log"
    log.write_bytes(b"a line of the log\n" * 10)
    log.chmod(0o644)  # as an earlier version left it
    spawn.rotate_log(log, max_bytes=50)
    assert _mode(logs / "svc.log.1") == 0o600

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as writer:  # a running service's log
        writer.write(b"a line of the log\n" * 10)
        writer.flush()
        assert spawn.rotate_running(log, max_bytes=50)
    assert sorted(p.name for p in logs.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]
    assert {_mode(p) for p in logs.iterdir()} == {0o600}


def test_the_temporal_database_lock_is_private(tmp_path: Path) -> None:
    from stigmer.server.supervisor import open_lock

    lock = open_lock(str(tmp_path / "temporal.db.lock"))
    assert lock is not None
    lock.close()
    assert _mode(tmp_path / "temporal.db.lock") == 0o600


def test_what_the_workspace_tools_create_is_private(tmp_path: Path) -> None:
    from stigmer.tools.workspace import Workspace

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    ws = Workspace.for_agent(data, "poet")
    assert _mode(data / "workspace") == 0o700 and _mode(data / "workspace" / "poet") == 0o700
    ws.write("notes/today/poem.md", "The sea.")
    assert _mode(ws.root / "notes") == 0o700 and _mode(ws.root / "notes" / "today") == 0o700
    assert _mode(ws.root / "notes" / "today" / "poem.md") == 0o600
    # a file made otherwise keeps its mode when a tool replaces it
    (ws.root / "shared.txt").write_text("old")
    (ws.root / "shared.txt").chmod(0o644)
    ws.write("shared.txt", "new")
    assert _mode(ws.root / "shared.txt") == 0o644


def test_everything_a_running_server_keeps_is_private(isolated_home: Paths, stop_server: None) -> None:
    with FakeOpenAI(key="sk-modes") as api:
        env = {
            "STIGMER_LLM_PROVIDER": "openai",
            "STIGMER_LLM_BASE_URL": api.url + "/v1",
            "STIGMER_LLM_API_KEY": "sk-modes",
        }
        r = run_cli("server", env=env, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        home = isolated_home.home
        expected = [
            "config.yaml",
            "api.token",
            "data/stigmer.db",
            "data/temporal.db",
            "data/temporal.db.lock",
            "run/agent-runner.health",
            "run/state.json",
            "logs/temporal.log",
            "logs/daemon.log",
        ]
        deadline = time.monotonic() + 60  # the worker stamps its health once it polls
        while missing := [name for name in expected if not (home / name).exists()]:
            assert time.monotonic() < deadline, missing
            time.sleep(0.1)
        loose = []
        for folder, dirs, files in os.walk(home):
            for name in dirs:
                path = Path(folder) / name
                if not path.is_symlink() and _mode(path) != 0o700:
                    loose.append(f"{path.relative_to(home)}/ {_mode(path):o}")
            for name in files:
                path = Path(folder) / name
                if not path.is_symlink() and _mode(path) & 0o077:
                    loose.append(f"{path.relative_to(home)} {_mode(path):o}")
        assert loose == []
        assert _mode(home) == 0o700

"""Faults found by hostile testing of the built-in engine as a new user meets it, each with the real
engine and the real CLI: races, foreign homes, broken models, bad imports, secrets, file modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from stigmer.llm.gguf import GgufError, validate_file
from stigmer.llm.models.starter import starter_model_path
from stigmer.paths import Paths
from stigmer.services import record as records
from tests.conftest import run_cli
from tests.doubles.archives import free_port

pytestmark = pytest.mark.usefixtures("stop_server")


@pytest.fixture
def engine_env(isolated_home: Paths) -> dict[str, str]:
    return {
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "1024",
    }


def _engines(port: int) -> list[psutil.Process]:
    """Built-in engine processes serving on this test's port (whatever records say); never another
    test's, which pytest-xdist may run at the same time."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if (
            "stigmer.llm.llamacpp.engine" in cmd
            and "--port" in cmd[:-1]
            and cmd[cmd.index("--port") + 1] == str(port)
            and p.status() != psutil.STATUS_ZOMBIE
        ):
            out.append(p)
    return out


def test_concurrent_starts_leave_one_engine_with_its_record(
    isolated_home: Paths, engine_env: dict[str, str]
) -> None:
    port = int(engine_env["STIGMER_LLM_BASE_URL"].rsplit(":", 1)[1])
    before = {p.pid for p in _engines(port)}
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(run_cli("server", env=engine_env, timeout=240)))
        for _ in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results]
    rec = records.read(isolated_home.pid_file("llm"))
    assert rec is not None and records.is_ours(rec)
    ours = [p for p in _engines(port) if p.pid not in before]
    assert [p.pid for p in ours] == [rec.pid]  # exactly one engine, the recorded one
    for r in results:
        assert "Ready!" in r.stdout and f"PID:      {rec.pid}" in r.stdout  # the real pid, in every run
    stop = run_cli("server", "stop", env=engine_env)
    assert stop.returncode == 0 and f"llm: stopped (PID {rec.pid})" in stop.stdout
    psutil.Process(rec.pid).wait(10) if psutil.pid_exists(rec.pid) else None


def test_another_homes_engine_is_reported_never_reused(isolated_home: Paths, tmp_path: Path) -> None:
    port = free_port()
    other = {
        "STIGMER_HOME": str(tmp_path / "other-home"),
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{port}",
        "STIGMER_LLM_CONTEXT_SIZE": "1024",
        "STIGMER_SERVER_PORT": str(free_port()),
        "STIGMER_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "STIGMER_TEMPORAL_UI_PORT": str(free_port()),
    }
    try:
        assert run_cli("server", env=other, timeout=180).returncode == 0
        theirs = records.read(Paths(tmp_path / "other-home").pid_file("llm"))
        # this home, offline, with its fallback address set to the port the other home's engine holds
        mine = {
            "STIGMER_LLM_DOWNLOAD_URL": f"http://127.0.0.1:{free_port()}/releases",
            "STIGMER_LLM_FALLBACK_BASE_URL": f"http://127.0.0.1:{port}",
            "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        }
        r = run_cli("server", env=mine)
        assert r.returncode == 7, r.stderr
        assert f"Port {port}" in r.stderr and "did not start" in r.stderr and "not reused" in r.stderr
        assert records.is_ours(theirs)  # untouched
        assert not isolated_home.pid_file("llm").exists()
        # and with a free fallback port the setting is honoured
        fb = free_port()
        r = run_cli("server", env={**mine, "STIGMER_LLM_FALLBACK_BASE_URL": f"http://127.0.0.1:{fb}"})
        assert r.returncode == 0, r.stderr
        rec = records.read(isolated_home.pid_file("llm"))
        assert rec.info["base_url"] == f"http://127.0.0.1:{fb}"
        cmd = psutil.Process(rec.pid).cmdline()
        assert cmd[cmd.index("--port") + 1] == str(fb)
    finally:
        run_cli("server", "stop", env=other)


def _broken_gguf(path: Path) -> Path:
    """A file that starts like the starter model (a valid header) but lost its weights."""
    src = starter_model_path()
    assert src is not None
    with src.open("rb") as f:
        path.write_bytes(f.read(4 * 1024 * 1024))
    return path


def test_import_reads_the_whole_gguf(isolated_home: Paths, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(b"GGUF")
    r = run_cli("server", "llm", "import", str(tiny), "--name", "tiny:q4")
    assert r.returncode == 5 and "not a GGUF model file" in r.stderr and "truncated" in r.stderr
    r = run_cli("server", "llm", "import", str(_broken_gguf(tmp_path / "cut.gguf")), "--name", "cut:q4")
    assert r.returncode == 5 and "tensor data needs" in r.stderr
    folder = tmp_path / "a-folder"
    folder.mkdir()
    r = run_cli("server", "llm", "import", str(folder), "--name", "x:y")
    assert r.returncode == 2 and "is a folder" in r.stderr
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = run_cli("server", "llm", "import", str(fifo), "--name", "x:y", timeout=30)
    assert r.returncode == 2 and "not a regular file" in r.stderr
    r = run_cli("server", "llm", "import", str(tmp_path / "missing.gguf"), "--name", "x:y")
    assert r.returncode == 6 and "No such file" in r.stderr
    src = starter_model_path()
    r = run_cli("server", "llm", "import", str(src), "--name", "smollm2:135m")
    assert r.returncode == 2 and "starter model" in r.stderr
    assert "x:y" not in run_cli("server", "llm", "list").stdout


def test_a_broken_model_never_replaces_the_working_one(
    isolated_home: Paths, engine_env: dict[str, str], tmp_path: Path
) -> None:
    from stigmer.config import store as config_store

    assert run_cli("server", env=engine_env, timeout=180).returncode == 0
    before = records.read(isolated_home.pid_file("llm"))
    # A model that got into the store and was damaged afterwards (the import itself refuses such files).
    broken = _broken_gguf(tmp_path / "broken.gguf")
    with pytest.raises(GgufError):
        validate_file(broken)
    index = isolated_home.models_dir / "index.json"
    data = json.loads(index.read_text())
    data["models"]["registry.ollama.ai/library/broken:q4"] = {
        "name": "broken:q4", "source": "import", "size": broken.stat().st_size, "sha256": "0" * 64,
        "path": str(broken), "modified": "2026-11-26T00:00:00Z",
    }  # fmt: skip
    index.write_text(json.dumps(data))
    config_store.ensure_file(isolated_home)
    r = run_cli("server", env={**engine_env, "STIGMER_LLM_MODEL": "broken:q4"}, timeout=180)
    assert r.returncode == 5 and "broken:q4 cannot be served" in r.stderr and "not a usable GGUF" in r.stderr
    after = records.read(isolated_home.pid_file("llm"))
    assert after.pid == before.pid and records.is_ours(after)  # the working engine was never stopped
    st = run_cli("server", "llm", "status", env=engine_env)
    assert "✓ Running" in st.stdout and "smollm2:135m" in st.stdout


def test_removing_the_served_model_is_refused(isolated_home: Paths, engine_env: dict[str, str]) -> None:
    src = starter_model_path()
    assert run_cli("server", "llm", "import", str(src), "--name", "mine:q4", env=engine_env).returncode == 0
    env = {**engine_env, "STIGMER_LLM_MODEL": "mine:q4"}
    assert run_cli("server", env=env, timeout=180).returncode == 0
    r = run_cli("server", "llm", "rm", "mine:q4", env=env)
    assert r.returncode == 7 and "being served" in r.stderr and "stigmer server stop" in r.stderr
    assert "mine:q4" in run_cli("server", "llm", "list", env=env).stdout


def test_engine_gets_no_secrets_and_files_are_private(
    isolated_home: Paths, engine_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {"STIGMER_LLM_API_KEY": "sk-1", "STIGMER_CLOUD_TOKEN": "tok-2", "HF_TOKEN": "hf-3"}
    assert run_cli("server", env={**engine_env, **secrets}, timeout=180).returncode == 0
    rec = records.read(isolated_home.pid_file("llm"))
    environ = psutil.Process(rec.pid).environ()
    for name in secrets:
        assert name not in environ, name
    assert stat.S_IMODE(isolated_home.home.stat().st_mode) == 0o700
    for path in (
        isolated_home.pid_file("llm"),
        isolated_home.log_file("llm"),
        isolated_home.models_dir / "index.json",
        isolated_home.config_file,
        isolated_home.home / "api.token",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (isolated_home.logs_dir, isolated_home.run_dir, isolated_home.models_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder

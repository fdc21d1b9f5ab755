"""The built-in engine through the product: real llama.cpp, the real starter model, the real CLI."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from stigmer.config import store
from stigmer.llm.endpoint import OpenAICompatible
from stigmer.paths import Paths
from stigmer.services import record as records
from tests.conftest import run_cli
from tests.doubles.archives import free_port

pytestmark = pytest.mark.usefixtures("stop_server")


@pytest.fixture
def engine_env(isolated_home: Paths) -> dict[str, str]:
    port = free_port()
    return {
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{port}",
        "STIGMER_LLM_CONTEXT_SIZE": "1024",
    }


def test_server_serves_starter_model_and_answers(isolated_home: Paths, engine_env: dict[str, str]) -> None:
    r = run_cli("server", env=engine_env)
    assert r.returncode == 0, r.stderr
    assert "First-time setup" in r.stderr
    assert "✓ Ready!" in r.stdout and "Local (built-in engine) ✓ Running" in r.stdout
    assert "smollm2:135m" in r.stdout
    rec = records.read(isolated_home.pid_file("llm"))
    assert rec is not None and records.is_ours(rec) and rec.info["provider"] == "llamacpp"
    cmd = psutil.Process(rec.pid).cmdline()
    assert "--host" in cmd and cmd[cmd.index("--host") + 1] == "127.0.0.1"  # loopback only

    client = OpenAICompatible(engine_env["STIGMER_LLM_BASE_URL"] + "/v1", "smollm2:135m")
    prompt = [{"role": "user", "content": "Say hello in one short sentence."}]
    answer = client.chat(prompt, max_tokens=24, temperature=0, seed=1)
    assert answer.strip()
    chunks = list(client.stream(prompt, max_tokens=24, temperature=0, seed=1))
    assert len(chunks) > 1
    assert "".join(chunks) == answer  # same greedy answer, streamed piece by piece

    # served under its product name, not a file path
    models = json.loads(
        __import__("urllib.request")
        .request.urlopen(engine_env["STIGMER_LLM_BASE_URL"] + "/v1/models", timeout=5)
        .read()
    )
    assert models["data"][0]["id"] == "smollm2:135m"

    st = run_cli("server", "llm", "status", "--json", env=engine_env)
    data = json.loads(st.stdout)
    assert data["running"] is True and data["pid"] == rec.pid and data["model"] == "smollm2:135m"

    ls = run_cli("server", "llm", "list", env=engine_env)
    assert "smollm2:135m (current)" in ls.stdout

    again = run_cli("server", env=engine_env)
    assert again.returncode == 0 and "First-time setup" not in again.stdout + again.stderr
    assert records.read(isolated_home.pid_file("llm")).pid == rec.pid  # reused, not restarted

    stop = run_cli("server", "stop", env=engine_env)
    assert stop.returncode == 0 and f"PID {rec.pid}" in stop.stdout
    assert not psutil.pid_exists(rec.pid) or psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE
    assert not isolated_home.pid_file("llm").exists()
    st = run_cli("server", "llm", "status", env=engine_env)
    assert "✗ Not Running" in st.stdout


def test_import_switch_model_restarts_and_rm(
    isolated_home: Paths, engine_env: dict[str, str], tmp_path
) -> None:
    from stigmer.llm.models.starter import starter_model_path

    src = starter_model_path()
    assert src is not None
    r = run_cli("server", "llm", "import", str(src), "--name", "mine:q4", env=engine_env)
    assert r.returncode == 0, r.stderr
    assert "Imported" in r.stdout
    assert run_cli("server", env=engine_env).returncode == 0
    first = records.read(isolated_home.pid_file("llm"))
    env = {**engine_env, "STIGMER_LLM_MODEL": "mine:q4"}
    r = run_cli("server", env=env)
    assert r.returncode == 0, r.stderr
    second = records.read(isolated_home.pid_file("llm"))
    assert second.pid != first.pid and not records.is_ours(first)
    assert "Model:    mine:q4" in r.stdout
    ls = run_cli("server", "llm", "list", "--json", env=env)
    names = {m["name"]: m for m in json.loads(ls.stdout)}
    assert names["mine:q4"]["current"] is True and names["mine:q4"]["source"] == "import"
    r = run_cli("server", "llm", "rm", "smollm2:135m", env=env)
    assert r.returncode == 10 and "cannot be removed" in r.stderr
    run_cli("server", "stop", env=env)
    r = run_cli("server", "llm", "rm", "mine:q4", env=env)
    assert r.returncode == 0
    assert "mine:q4" not in run_cli("server", "llm", "list", env=env).stdout
    assert not list((isolated_home.models_dir / "blobs").glob("sha256-*"))


def test_import_refuses_non_gguf(isolated_home: Paths, engine_env: dict[str, str], tmp_path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    r = run_cli("server", "llm", "import", str(bad), "--name", "x:y", env=engine_env)
    assert r.returncode == 5 and "not a GGUF" in r.stderr


def test_killed_engine_is_replaced_by_a_new_one(isolated_home: Paths, engine_env: dict[str, str]) -> None:
    assert run_cli("server", env=engine_env).returncode == 0
    rec = records.read(isolated_home.pid_file("llm"))
    os.kill(rec.pid, signal.SIGKILL)
    psutil.Process(rec.pid).wait(5) if psutil.pid_exists(rec.pid) else None
    assert not records.is_ours(rec)  # the dead engine's record no longer counts
    r = run_cli("server", env=engine_env)  # the supervisor, or this start, brings a new engine
    assert r.returncode == 0, r.stderr
    new = records.read(isolated_home.pid_file("llm"))
    assert new is not None and new.pid != rec.pid and records.is_ours(new)
    st = run_cli("server", "llm", "status", env=engine_env)
    assert "✓ Running" in st.stdout and f"PID:      {new.pid}" in st.stdout


def test_port_taken_by_something_else(isolated_home: Paths, engine_env: dict[str, str]) -> None:
    import http.server
    import threading

    port = int(engine_env["STIGMER_LLM_BASE_URL"].rsplit(":", 1)[1])
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        r = run_cli("server", env=engine_env)
        assert r.returncode == 7
        assert f"Port {port}" in r.stderr and "not the Local LLM (built-in engine)" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        srv.shutdown()
        srv.server_close()


def test_settings_reach_the_engine(isolated_home: Paths, engine_env: dict[str, str]) -> None:
    store.ensure_file(isolated_home)
    env = {**engine_env, "STIGMER_LLM_THREADS": "1", "STIGMER_LLM_CONTEXT_SIZE": "512"}
    assert run_cli("server", env=env).returncode == 0
    cmd = psutil.Process(records.read(isolated_home.pid_file("llm")).pid).cmdline()
    assert cmd[cmd.index("--threads") + 1] == "1" and cmd[cmd.index("--ctx-size") + 1] == "512"

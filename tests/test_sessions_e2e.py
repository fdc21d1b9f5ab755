"""Conversations (issue 15), end to end through the real API, worker and Temporal, with a scripted
OpenAI-compatible model that records what it was sent: turns of a session are executions; the transcript
reaches the model by reference (never through Temporal); one turn at a time, atomically; forks."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stigmer.errors import StigmerError
from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import in_state, wait_until

pytestmark = pytest.mark.usefixtures("stop_server")


@pytest.fixture
def server(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(key="sk-chat") as fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-chat")
        r = run_cli("server", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        yield fake


def _api(paths: Paths) -> Any:
    from stigmer.server import control

    return control.api(paths)


def _turn(paths: Paths, message: str, **body: Any) -> dict[str, Any]:
    rec: dict[str, Any] = _api(paths).post("/v1/executions", {"message": message, **body})
    return wait_until(lambda: in_state(rec["id"], "COMPLETED", "FAILED", "CANCELLED"), 120)


def _user_messages(request: dict[str, Any]) -> list[str]:
    return [str(m.get("content")) for m in request.get("messages") or [] if m.get("role") == "user"]


def _history_bytes(paths: Paths, exec_id: str) -> int:
    from stigmer.server.specs import temporal_binary

    r = subprocess.run(
        [temporal_binary(paths), "workflow", "show", "-w", exec_id, "--output", "json",
         "--address", os.environ["STIGMER_TEMPORAL_ADDRESS"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return len(r.stdout)


def test_turns_remember_by_reference_and_forks_keep_their_past(
    isolated_home: Paths, server: FakeOpenAI
) -> None:
    first = _turn(isolated_home, "My name is Ada.", session="intro")
    assert first["state"] == "COMPLETED" and first["session"] == "intro" and first["turn"] == 1
    second = _turn(isolated_home, "What is my name?", session="intro")
    assert second["turn"] == 2
    # the model was sent the conversation: turn 1's question and answer, then turn 2's
    assert _user_messages(server.requests[-1]) == ["My name is Ada.", "What is my name?"]
    assert any("echo: My name is Ada." in str(m.get("content")) for m in server.requests[-1]["messages"])
    # each turn's record keeps its own messages only
    assert [m["content"] for m in second["messages"] if m["role"] == "user"] == ["What is my name?"]
    # continue: the most recently used session
    third = _turn(isolated_home, "And again?", **{"continue": True})
    assert third["session"] == "intro" and third["turn"] == 3

    fork = _api(isolated_home).post("/v1/sessions/intro/fork", {"at": 1, "name": "intro-b"})
    assert fork["name"] == "intro-b" and fork["turns"] == 1 and fork["forked_from"] == "intro"
    branch = _turn(isolated_home, "Who am I?", session="intro-b")
    assert branch["turn"] == 2
    assert _user_messages(server.requests[-1]) == ["My name is Ada.", "Who am I?"]
    original = _api(isolated_home).get("/v1/sessions/intro")
    assert [t["turn"] for t in original["turns"]] == [1, 2, 3]  # untouched
    listed = [s["name"] for s in _api(isolated_home).get("/v1/sessions")]
    assert listed[:2] == ["intro-b", "intro"]  # most recently used first


def test_a_turn_s_history_does_not_grow_with_its_session(isolated_home: Paths, server: FakeOpenAI) -> None:
    block = "lorem ipsum " * 170  # ~2 KB a turn, and as much again in each answer (the echo)
    sizes = [_history_bytes(isolated_home, _turn(isolated_home, f"{i}: {block}", session="long")["id"])
             for i in range(1, 11)]  # fmt: skip
    assert sizes[-1] <= 2 * sizes[0], sizes
    assert len(json.dumps(server.requests[-1]["messages"])) > 10 * len(block)  # yet the model got them all


def test_one_turn_at_a_time_even_asked_twenty_times_at_once(isolated_home: Paths, server: FakeOpenAI) -> None:
    server.delay = 0.3  # the first turn stays in progress a while
    answers: list[Any] = []

    def ask(i: int) -> None:
        try:
            answers.append(
                _api(isolated_home).post("/v1/executions", {"message": f"hi {i}", "session": "busy"})
            )
        except StigmerError as e:
            answers.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [a for a in answers if isinstance(a, dict)]
    refused = [a for a in answers if not isinstance(a, dict)]
    assert len(started) == 1 and len(refused) == 19, answers
    assert all(e.code.code == "busy" and started[0]["id"] in e.message for e in refused)
    # a session with a turn running cannot be removed either
    with pytest.raises(StigmerError) as e:
        _api(isolated_home).request("DELETE", "/v1/sessions/busy")
    assert e.value.code.code == "busy"
    wait_until(lambda: in_state(started[0]["id"], "COMPLETED"), 120)
    assert _api(isolated_home).request("DELETE", "/v1/sessions/busy") == {"removed": "busy"}


def test_bad_session_input_is_refused_with_the_rule(
    isolated_home: Paths, server: FakeOpenAI, tmp_path: Path
) -> None:
    api = _api(isolated_home)
    for name in ("has space", "x" * 65, "semi;colon", "$(id)"):
        with pytest.raises(StigmerError) as e:
            api.post("/v1/executions", {"message": "hi", "session": name})
        assert e.value.code.code == "invalid_input" and "letters, digits, - and _" in e.value.message
    _turn(isolated_home, "hello", session="mine")
    f = tmp_path / "other.yaml"
    f.write_text("name: other\ninstructions: Be brief.\n")
    assert run_cli("agent", "apply", "-f", str(f)).returncode == 0
    with pytest.raises(StigmerError) as e:
        api.post("/v1/executions", {"message": "hi", "session": "mine", "agent": "other"})
    assert "with the agent 'default', not 'other'" in e.value.message
    with pytest.raises(StigmerError) as e:
        api.post("/v1/sessions/mine/fork", {"at": 5})
    assert e.value.code.code == "invalid_input" and "choose 1 to 1" in e.value.message
    with pytest.raises(StigmerError) as e:
        api.get("/v1/sessions/nobody")
    assert e.value.code.code == "not_found"


def test_a_conversation_longer_than_the_engine_s_context_leaves_out_old_turns(
    isolated_home: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built-in engine with a 2048-token context and turns of ~700 tokens: the third turn no longer
    fits with the first two, and it completes anyway, without the oldest, saying so."""
    from tests.doubles.archives import free_port

    for k, v in {"STIGMER_LLM_PROVIDER": "llamacpp", "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
                 "STIGMER_LLM_CONTEXT_SIZE": "2048"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    assert run_cli("server", timeout=240).returncode == 0
    f = tmp_path / "brief.yaml"
    f.write_text("name: brief\ninstructions: Answer in one word.\ntemperature: 0\nmax_tokens: 8\n")
    assert run_cli("agent", "apply", "-f", str(f)).returncode == 0
    block = "The lighthouse keeper wrote in the log every night. " * 48  # ~2.5 KB, ~600-700 tokens
    records = [_turn(isolated_home, f"Part {i}. {block}", session="story", agent="brief") if i == 1
               else _turn(isolated_home, f"Part {i}. {block}", session="story") for i in range(1, 5)]  # fmt: skip
    assert [r["state"] for r in records] == ["COMPLETED"] * 4, [r.get("error") for r in records]
    assert records[0]["turns_left_out"] == 0 and records[-1]["turns_left_out"] >= 1
    logs = run_cli("execution", "logs", records[-1]["id"]).stdout
    assert "oldest" in logs and "left out of what the model was sent" in logs


def test_what_can_go_wrong_with_a_session_says_what_and_spares_the_others(
    isolated_home: Paths, server: FakeOpenAI, tmp_path: Path
) -> None:
    import sqlite3

    api = _api(isolated_home)
    # a message over 1 MB: 413, exit 2 at the CLI
    with pytest.raises(StigmerError) as e:
        api.post("/v1/executions", {"message": "x" * 1_000_001, "session": "big"})
    assert e.value.code.code == "too_large"
    # the session's agent removed: the session can be read; continuing it names the missing agent
    f = tmp_path / "gone.yaml"
    f.write_text("name: gone\ninstructions: Be brief.\n")
    assert run_cli("agent", "apply", "-f", str(f)).returncode == 0
    _turn(isolated_home, "hello", session="orphan", agent="gone")
    assert run_cli("agent", "rm", "gone").returncode == 0
    assert api.get("/v1/sessions/orphan")["agent"] == "gone"
    with pytest.raises(StigmerError) as e:
        api.post("/v1/executions", {"message": "again", "session": "orphan"})
    assert e.value.code.code == "not_found" and "'gone'" in e.value.message
    # a damaged transcript row: that session's next turn fails saying so; another session goes on
    first = _turn(isolated_home, "one", session="damaged")
    _turn(isolated_home, "fine", session="healthy")
    db = sqlite3.connect(isolated_home.data_dir / "stigmer.db")
    db.execute(
        "UPDATE messages SET data = '{not json' WHERE execution_id = ? AND role = 'assistant'", (first["id"],)
    )
    db.execute(
        "UPDATE messages SET data = '{not json' WHERE execution_id = ? AND role = 'user'", (first["id"],)
    )
    db.commit()
    db.close()
    broken = _turn(isolated_home, "two", session="damaged")
    assert broken["state"] == "FAILED" and "Turn 1 of session 'damaged'" in broken["error"], broken["error"]
    assert "LLM" not in broken["error"]
    assert _turn(isolated_home, "still fine", session="healthy")["state"] == "COMPLETED"


def test_a_session_survives_a_server_restart_and_a_killed_worker(
    isolated_home: Paths, server: FakeOpenAI
) -> None:
    import signal

    _turn(isolated_home, "My name is Ada.", session="durable")
    assert run_cli("server", "restart", timeout=240).returncode == 0
    second = _turn(isolated_home, "What is my name?", session="durable")
    assert second["state"] == "COMPLETED" and second["turn"] == 2
    assert _user_messages(server.requests[-1]) == ["My name is Ada.", "What is my name?"]
    # the worker killed in the middle of a turn: the turn completes on the restarted worker, with the past
    server.delay = 0.4
    rec = _api(isolated_home).post("/v1/executions", {"message": "Say it slowly", "session": "durable"})
    wait_until(lambda: in_state(rec["id"], "IN_PROGRESS"), 60)
    from stigmer.services.manager import Services

    worker = Services(isolated_home).record("agent-runner")
    assert worker is not None
    os.kill(worker.pid, signal.SIGKILL)
    server.delay = 0.0
    third = wait_until(lambda: in_state(rec["id"], "COMPLETED", "FAILED"), 180)
    assert third["state"] == "COMPLETED" and third["turn"] == 3
    assert _user_messages(server.requests[-1]) == ["My name is Ada.", "What is my name?", "Say it slowly"]

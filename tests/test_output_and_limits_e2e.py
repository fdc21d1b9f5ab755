"""Bounded model calls and structured output (issue 18), end to end through the real CLI, API, worker and
Temporal, with a scripted OpenAI-compatible model that records what it was sent. One server for the
module's checks (they run in one test: starting Stigmer costs more than all of them together)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer.paths import Paths
from stigmer.runner.llm import DEFAULT_MAX_TOKENS
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import in_state, record, tool_call, wait_until

pytestmark = pytest.mark.usefixtures("stop_server")

SCHEMA_AGENT = """\
name: extractor
instructions: You extract the title and the year.
output_schema:
  type: object
  properties:
    title: {type: string}
    year: {type: integer}
  required: [title, year]
  additionalProperties: false
"""


@pytest.fixture
def api(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(key="sk-out") as fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-out")
        yield fake


def _apply(tmp_path: Path, text: str) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text(text)
    r = run_cli("agent", "apply", "-f", str(f), timeout=240)
    assert r.returncode == 0, r.stderr


def _limit(body: dict[str, object]) -> object:
    return body.get("max_completion_tokens", body.get("max_tokens"))


def test_max_tokens_by_default_and_structured_output(api: FakeOpenAI, tmp_path: Path) -> None:
    # 1. An agent that sets no max_tokens: every model call still carries one (the remote model's context
    # window is unknown here, so the default itself).
    _apply(tmp_path, "name: talker\ninstructions: You talk.\n")
    r = run_cli("run", "talker", "-m", "Count to 300", "--json", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _limit(api.requests[-1]) == DEFAULT_MAX_TOKENS
    # ... and the agent file's own max_tokens wins
    _apply(tmp_path, "name: terse\ninstructions: You are brief.\nmax_tokens: 77\n")
    assert run_cli("run", "terse", "-m", "Hi", timeout=240).returncode == 0
    assert _limit(api.requests[-1]) == 77

    # 2. Structured output: the answer is a `final_result` call; one that does not match the schema is
    # sent back to the model, and the record's output is the object that matched.
    _apply(tmp_path, SCHEMA_AGENT)
    api.script += [
        tool_call("final_result", title="Dune", year="nineteen sixty-five"),  # not an integer
        tool_call("final_result", title="Dune", year=1965),
    ]
    sent = len(api.requests)
    r = run_cli("run", "extractor", "-m", "Dune, 1965", "--json", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(r.stdout)
    assert rec["state"] == "COMPLETED" and rec["output"] == {"title": "Dune", "year": 1965}
    asked = api.requests[sent:]
    assert len(asked) == 2
    assert any(t["function"]["name"] == "final_result" for t in asked[0]["tools"])
    retry = [m for m in asked[1]["messages"] if m.get("role") == "tool"]
    assert retry and "year" in str(retry[-1]["content"])  # the model was told what to fix
    assert record(rec["id"])["output"] == {"title": "Dune", "year": 1965}
    # the text view prints the object
    api.script += [tool_call("final_result", title="Emma", year=1815)]
    r = run_cli("run", "extractor", "-m", "Emma, 1815", timeout=240)
    assert r.returncode == 0 and '"title": "Emma"' in r.stdout, r.stdout + r.stderr

    # 3. An answer that never matches: the execution fails, saying why.
    api.script += [tool_call("final_result", title="X")] * 5
    r = run_cli("run", "extractor", "-m", "Nothing", "--json", timeout=240)
    rec = json.loads(r.stdout)
    assert rec["state"] == "FAILED", rec
    assert "did not match the agent's output_schema" in rec["error"]


def test_limits_pause_for_a_person_and_deny_keeps_what_was_made(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path
) -> None:
    # a bad flag is refused before anything starts
    r = run_cli("run", "-m", "hi", "--limit", "tool_calls=0")
    assert r.returncode != 0 and "tool_calls must be a whole number from 1" in r.stderr
    r = run_cli("run", "-m", "hi", "--limit", "naps=3")
    assert r.returncode != 0 and "unknown limit 'naps'" in r.stderr

    _apply(tmp_path, "name: lister\ninstructions: You list.\ntools: [workspace]\nlimits: {tool_calls: 2}\n")
    api.script += [tool_call("list_files", path=".")] * 3 + [{"content": "Listed."}]
    r = run_cli("run", "lister", "-m", "List thrice", "--detach", timeout=240)
    assert r.returncode == 0, r.stderr
    exec_id = r.stdout.strip()
    waiting = wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL"), 120)
    asked = waiting["approvals"][0]
    assert asked["tool"] == "limit" and asked["args"]["reason"] == "limit: tool_calls 2 of 2", asked
    shown = run_cli("execution", "get", exec_id).stdout
    assert "waiting for approval: limit: tool_calls 2 of 2 (approving grants 2 more tool calls)" in shown
    r = run_cli("execution", "approve", exec_id)
    assert r.returncode == 0, r.stdout + r.stderr
    done = wait_until(lambda: in_state(exec_id, "COMPLETED", "FAILED"), 120)
    assert done["state"] == "COMPLETED" and done["output"] == "Listed.", done
    assert done["tool_calls"] == 3

    # a run's own limit: the second model call would cross model_calls=1; denying ends it, keeping
    # the tool call it made
    api.script += [tool_call("list_files", path="."), {"content": "never"}]
    r = run_cli("run", "lister", "-m", "Once", "--limit", "model_calls=1", "--detach", timeout=240)
    exec_id = r.stdout.strip()
    waiting = wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL"), 120)
    assert waiting["approvals"][0]["args"]["reason"] == "limit: model_calls 1 of 1"
    assert run_cli("execution", "deny", exec_id).returncode == 0
    failed = wait_until(lambda: in_state(exec_id, "FAILED", "COMPLETED"), 120)
    assert failed["state"] == "FAILED" and failed["error_code"] == "limit_reached", failed
    assert "limit: model_calls 1 of 1" in failed["error"]
    assert [m["role"] for m in failed["messages"]] == ["system", "user", "assistant", "tool"]


def test_seconds_limit_ends_a_model_call_and_waiting_for_a_person_does_not_count(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path
) -> None:
    import time

    _apply(tmp_path, "name: slowpoke\ninstructions: You talk slowly.\nlimits: {seconds: 4}\n")
    slow = {"content": " ".join(["word"] * 60), "delay": 0.5}  # ~30 s of streaming
    api.script += [slow, {"content": "Done quickly."}]
    began = time.monotonic()
    r = run_cli("run", "slowpoke", "-m", "Talk", "--detach", timeout=240)
    assert r.returncode == 0, r.stderr
    exec_id = r.stdout.strip()
    # the model call still streaming when 4 s passed ends there: the execution asks, and the request ends
    waiting = wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL", "COMPLETED", "FAILED"), 120)
    assert waiting["state"] == "WAITING_APPROVAL", waiting
    assert waiting["approvals"][0]["args"]["reason"] == "limit: seconds 4 of 4", waiting
    assert time.monotonic() - began < 25  # not the ~30 s the answer would have taken
    wait_until(lambda: api.cut == 1, 30)  # the worker closed the model's stream
    # a person takes longer than the limit to answer: that time is not the agent's
    time.sleep(6)
    assert run_cli("execution", "approve", exec_id).returncode == 0
    done = wait_until(lambda: in_state(exec_id, "COMPLETED", "FAILED", "WAITING_APPROVAL"), 120)
    assert done["state"] == "COMPLETED" and done["output"] == "Done quickly.", done.get("error")

    # denied: FAILED, limit_reached, with what it had
    api.script += [slow]
    r = run_cli("run", "slowpoke", "-m", "Talk again", "--detach", timeout=240)
    exec_id = r.stdout.strip()
    waiting = wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL", "COMPLETED", "FAILED"), 120)
    assert waiting["approvals"][0]["args"]["reason"] == "limit: seconds 4 of 4", waiting
    assert run_cli("execution", "deny", exec_id).returncode == 0
    failed = wait_until(lambda: in_state(exec_id, "FAILED", "COMPLETED"), 120)
    assert failed["state"] == "FAILED" and failed["error_code"] == "limit_reached", failed
    assert "limit: seconds 4 of 4" in failed["error"]
    assert [m["role"] for m in failed["messages"]][:2] == ["system", "user"], failed["messages"]


def test_retried_model_attempts_count_against_the_limits(
    isolated_home: Paths, api: FakeOpenAI, tmp_path: Path
) -> None:
    """A model request whose first attempt broke off mid-answer (an error event after some text) is tried
    again by Temporal: both attempts are model calls, for the limits and the record."""
    _apply(tmp_path, "name: lister\ninstructions: You list.\ntools: [workspace]\nlimits: {model_calls: 2}\n")
    api.script += [
        {"content": "Let me look", "error": "The server had an error while processing your request."},
        tool_call("list_files", path="."),
        {"content": "Listed."},
    ]
    r = run_cli("run", "lister", "-m", "List", "--detach", timeout=240)
    assert r.returncode == 0, r.stderr
    exec_id = r.stdout.strip()
    # two attempts of the first request, so the second request would be the third model call
    waiting = wait_until(lambda: in_state(exec_id, "WAITING_APPROVAL", "COMPLETED", "FAILED"), 120)
    assert waiting["state"] == "WAITING_APPROVAL", waiting
    assert waiting["approvals"][0]["args"]["reason"] == "limit: model_calls 2 of 2", waiting
    assert len(api.requests) == 2
    assert run_cli("execution", "approve", exec_id).returncode == 0
    done = wait_until(lambda: in_state(exec_id, "COMPLETED", "FAILED"), 120)
    assert done["state"] == "COMPLETED" and done["output"] == "Listed.", done
    assert done["requests"] == 3 and done["tool_calls"] == 1 and done["attempts"] == 2, done

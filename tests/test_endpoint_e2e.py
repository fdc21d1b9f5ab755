"""Stigmer's OpenAI-compatible endpoint (issue 16), end to end: the real server (API, worker, Temporal),
the official `openai` client and pydantic-ai as its users, a remote provider stand-in that checks its own
key, and the real built-in engine with the real starter model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import in_state, tool_call, wait_until

pytestmark = pytest.mark.usefixtures("stop_server")


@pytest.fixture
def remote(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """The server with a remote OpenAI provider (a stand-in that refuses any key but its own)."""
    with FakeOpenAI(key="sk-provider") as fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
        monkeypatch.setenv("STIGMER_SERVER_APPROVAL_WAIT", "2")
        r = run_cli("server", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        yield fake


def _root(paths: Paths) -> tuple[str, str]:
    from stigmer.server import control

    api = control.api(paths)
    return api.base_url, api.token


def _client(paths: Paths, key: str | None = None) -> openai.OpenAI:
    root, token = _root(paths)
    return openai.OpenAI(base_url=root + "/v1", api_key=key or token, max_retries=0)


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_models_and_agents_through_the_openai_client(isolated_home: Paths, remote: FakeOpenAI) -> None:
    client = _client(isolated_home)
    ids = [m.id for m in client.models.list()]
    assert {"gpt-4o-mini", "local", "gpt-4o", "agent/default"} <= set(ids)
    assert client.models.retrieve("agent/default").owned_by == "stigmer-agent"

    # a model: passed through to the provider with the provider's key, never the client's
    said = client.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "hi"}], temperature=0.2, max_tokens=30,
        stop=["END"], seed=7, response_format={"type": "json_object"},
    )  # fmt: skip
    assert said.choices[0].message.content == "echo: hi" and said.object == "chat.completion"
    sent = remote.requests[-1]
    assert sent["model"] == "gpt-4o-mini"  # `local` is the configured model
    for name, value in (("temperature", 0.2), ("max_tokens", 30), ("stop", ["END"]), ("seed", 7)):
        assert sent[name] == value, name
    assert sent["response_format"] == {"type": "json_object"}
    assert _root(isolated_home)[1] not in json.dumps(remote.headers[-1])  # the API token stays here

    pieces = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "stream it"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: stream it"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]

    # an agent: the earlier messages are the transcript of a durable execution
    raw = client.chat.completions.with_raw_response.create(
        model="agent/default",
        messages=[
            {"role": "system", "content": "a chat client's own system prompt"},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    exec_id = raw.headers["X-Stigmer-Execution"]
    answer = raw.parse()
    assert answer.choices[0].message.content == "echo: What is my name?"
    assert answer.choices[0].finish_reason == "stop" and answer.usage and answer.usage.total_tokens > 0
    told = [m.get("content") for m in remote.requests[-1]["messages"]]
    assert "My name is Ada." in told and "Hello Ada." in told and "What is my name?" in told
    assert "a chat client's own system prompt" not in told  # the agent's instructions stand
    rec = in_state(exec_id, "COMPLETED")
    assert rec is not None and rec["history"][0] == {"role": "user", "content": "My name is Ada."}

    # streamed, in a stored session named by the header
    for message in ("I like tea.", "What do I like?"):
        stream = client.chat.completions.create(
            model="agent/default", messages=[{"role": "user", "content": message}], stream=True,
            stream_options={"include_usage": True}, extra_headers={"X-Stigmer-Session": "tea"},
        )  # fmt: skip
        got = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "echo: What do I like?"
    assert [c.choices[0].finish_reason for c in got if c.choices][-1] == "stop"
    assert got[-1].usage is not None
    told = [m.get("content") for m in remote.requests[-1]["messages"]]
    assert "I like tea." in told  # the session's first turn, from the server's own transcript

    # pydantic-ai pointed at the endpoint, for a model and for an agent
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    root, token = _root(isolated_home)
    provider = OpenAIProvider(base_url=root + "/v1", api_key=token)
    for model in ("local", "agent/default"):
        result = Agent(OpenAIChatModel(model, provider=provider)).run_sync("pydantic says hi")
        assert result.output == "echo: pydantic says hi", model


def test_tool_calls_approvals_and_a_client_that_goes_away(
    isolated_home: Paths, remote: FakeOpenAI, tmp_path: Path
) -> None:
    agent = tmp_path / "ops.yaml"
    agent.write_text("name: ops\ninstructions: You run commands.\ntools:\n  - shell\n")
    assert run_cli("agent", "apply", "-f", str(agent)).returncode == 0
    root, token = _root(isolated_home)
    auth = {"Authorization": f"Bearer {token}"}
    body = {"model": "agent/ops", "messages": [{"role": "user", "content": "list files"}], "stream": True}

    # streamed: the tool call waits for approval, the stream says how to answer, then goes on
    remote.script += [tool_call("run_command", argv=["echo", "hello"]), {"content": "It printed hello."}]
    text = ""
    with httpx.stream("POST", root + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        exec_id = r.headers["X-Stigmer-Execution"]
        lines = r.iter_lines()
        for event in _sse_events(lines):
            text += "".join(c["delta"].get("content") or "" for c in event["choices"])
            if "Waiting for approval" in text:
                break
        assert f"stigmer execution approve {exec_id}" in text
        assert run_cli("execution", "approve", exec_id).returncode == 0
        for event in _sse_events(lines):
            text += "".join(c["delta"].get("content") or "" for c in event["choices"])
    assert "> Tool: run_command" in text and "hello" in text and text.endswith("It printed hello.")

    # not streamed: past server.approval_wait (2 s here), 409 with the execution's id; it goes on
    remote.script += [tool_call("run_command", argv=["echo", "again"]), {"content": "Done again."}]
    r2 = httpx.post(root + "/v1/chat/completions", json={**body, "stream": False}, headers=auth, timeout=60)
    assert r2.status_code == 409, r2.text
    error = r2.json()["error"]
    waiting = r2.headers["X-Stigmer-Execution"]
    assert error["code"] == "approval_required" and waiting in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert in_state(waiting, "WAITING_APPROVAL") is not None
    assert run_cli("execution", "approve", waiting).returncode == 0
    assert wait_until(lambda: in_state(waiting, "COMPLETED"))["output"] == "Done again."

    # a client that disconnects mid-stream: the execution runs on to its end, and can be read back
    remote.delay = 0.2
    remote.script += [{"content": " ".join(f"word{i}" for i in range(30))}]
    body = {"model": "agent/default", "messages": [{"role": "user", "content": "talk"}], "stream": True}
    with httpx.stream("POST", root + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        gone = r.headers["X-Stigmer-Execution"]
        for event in _sse_events(r.iter_lines()):
            if any(c["delta"].get("content") for c in event["choices"]):
                break  # the first words arrived: hang up
    done = wait_until(lambda: in_state(gone, "COMPLETED", "FAILED", "CANCELLED"), 60)
    assert done["state"] == "COMPLETED" and done["output"].endswith("word29")


def test_errors_in_openai_shape_and_the_api_s_safety(isolated_home: Paths, remote: FakeOpenAI) -> None:
    root, token = _root(isolated_home)
    auth = {"Authorization": f"Bearer {token}"}
    url = root + "/v1/chat/completions"

    def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
        assert r.status_code == status, r.text
        err: dict[str, Any] = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err

    assert error_of(httpx.post(url, json={}), 401)["code"] == "invalid_api_key"
    assert error_of(httpx.get(root + "/v1/models", headers={"Authorization": "Bearer x"}), 401)
    assert error_of(httpx.post(url, content=b"{nope", headers=auth), 400)["code"] == "invalid_input"
    assert error_of(httpx.post(url, json={"messages": []}, headers=auth), 400)["param"] == "model"
    one = [{"role": "user", "content": "x"}]
    assert (
        error_of(httpx.post(url, json={"model": "agent/ghost", "messages": one}, headers=auth), 404)["code"]
        == "model_not_found"
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    bad = httpx.post(url, json={"model": "agent/default", "messages": one, "tools": tools}, headers=auth)
    assert error_of(bad, 400)["param"] == "tools"
    last_not_user = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert (
        error_of(
            httpx.post(url, json={"model": "agent/default", "messages": last_not_user}, headers=auth), 400
        )["param"]
        == "messages"
    )
    big = (
        b'{"model": "local", "messages": [{"role": "user", "content": "' + b"a" * (11 * 1024 * 1024) + b'"}]}'
    )
    assert error_of(httpx.post(url, content=big, headers=auth, timeout=60), 413)

    # the API's safety holds here: a foreign Host is refused; no CORS without server.origins
    evil = httpx.get(root + "/v1/models", headers={**auth, "Host": "evil.example"})
    assert evil.status_code == 403
    page = httpx.options(
        url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert page.status_code == 403 and "access-control-allow-origin" not in page.headers
    local_page = httpx.get(root + "/v1/models", headers={**auth, "Origin": "http://localhost:3000"})
    assert "access-control-allow-origin" not in local_page.headers


def test_the_real_engine_through_the_endpoint(isolated_home: Paths) -> None:
    """The built-in engine with the real starter model, through the endpoint, by the `openai` client."""
    from tests.doubles.archives import free_port

    env = {
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "1024",
    }
    r = run_cli("server", env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    client = _client(isolated_home)
    assert {"local", "smollm2:135m", "agent/default"} <= {m.id for m in client.models.list()}
    prompt = [{"role": "user", "content": "Say hello in one short sentence."}]
    whole = client.chat.completions.create(
        model="local", messages=prompt, max_tokens=16, temperature=0, seed=1
    )
    assert whole.model == "smollm2:135m" and whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    started = time.monotonic()
    chunks = list(
        client.chat.completions.create(
            model="smollm2:135m",
            messages=prompt,
            max_tokens=16,
            temperature=0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
    )
    assert time.monotonic() - started < 60
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content  # greedy: the same answer, piece by piece
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[-1].usage is not None


def test_keys_reach_only_their_scopes(isolated_home: Paths, remote: FakeOpenAI, tmp_path: Path) -> None:
    """Every kind of key against every kind of route."""
    agent = tmp_path / "ops.yaml"
    agent.write_text("name: ops\ninstructions: You help.\n")
    assert run_cli("agent", "apply", "-f", str(agent)).returncode == 0
    root, token = _root(isolated_home)

    def make(name: str, *flags: str) -> str:
        r = run_cli("key", "create", name, *flags, "--json")
        assert r.returncode == 0, r.stderr
        return str(json.loads(r.stdout)["secret"])

    keys = {
        "admin": token,
        "models": make("m", "--models"),
        "default-only": make("d", "--agents", "default"),
        "all-agents": make("a", "--all-agents"),
        "expired": make("x", "--all-agents", "--models", "--expires", "1h"),
        "removed": make("r", "--all-agents", "--models"),
        "unknown": "sk-stigmer-0123abcd_" + "A" * 43,
        "garbage": "not a key",
    }
    assert run_cli("key", "rm", "r").returncode == 0
    import sqlite3

    with sqlite3.connect(isolated_home.data_dir / "stigmer.db") as db:  # time passes for key x
        db.execute("UPDATE api_keys SET expires = ? WHERE name = 'x'", (time.time() - 1,))
    other = (
        _client(isolated_home)
        .chat.completions.with_raw_response.create(
            model="agent/default", messages=[{"role": "user", "content": "admin's own"}]
        )
        .headers["X-Stigmer-Execution"]
    )

    def chat(key: str, model: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(
            root + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    expected = {  # kind of key -> (local, agent/default, agent/ops)
        "admin": (200, 200, 200),
        "models": (200, 403, 403),
        "default-only": (403, 200, 403),
        "all-agents": (403, 200, 200),
        "expired": (401, 401, 401),
        "removed": (401, 401, 401),
        "unknown": (401, 401, 401),
        "garbage": (401, 401, 401),
    }
    for kind, key in keys.items():
        got = tuple(chat(key, model) for model in ("local", "agent/default", "agent/ops"))
        assert tuple(r.status_code for r in got) == expected[kind], kind
        for r in got:
            if r.status_code == 403:
                assert (
                    "missing:" in r.json()["error"]["message"]
                    and r.json()["error"]["code"] == "insufficient_scope"
                )
            if r.status_code == 401:
                assert r.json()["error"]["code"] == "invalid_api_key"
        listed = httpx.get(root + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        if expected[kind][0] == 401:
            assert listed.status_code == 401, kind
            continue
        ids = {m["id"] for m in listed.json()["data"]}
        assert ("local" in ids) == (expected[kind][0] == 200), kind
        assert ("agent/ops" in ids) == (expected[kind][2] == 200), kind
        auth = {"Authorization": f"Bearer {key}"}
        for path in (
            "/v1/status",
            "/v1/agents",
            "/v1/executions",
            "/v1/sessions",
            "/v1/keys",
            f"/v1/executions/{other}",
        ):
            status = httpx.get(root + path, headers=auth).status_code
            assert status == (200 if kind == "admin" else 401), (kind, path, status)
        assert httpx.post(root + "/v1/runner/hello", json={}, headers=auth).status_code == 401, kind
        started = [
            r.headers["X-Stigmer-Execution"]
            for r in got
            if r.status_code == 200 and "agent" in r.json()["model"]
        ]
        if started and kind != "admin":  # a key reads back what it started, and only that
            own = started[0]
            assert httpx.get(root + f"/v1/executions/{own}", headers=auth).json()["id"] == own
            with httpx.stream("GET", root + f"/v1/executions/{own}/events", headers=auth, timeout=30) as ev:
                assert ev.status_code == 200 and "event: completed" in list(ev.iter_lines())

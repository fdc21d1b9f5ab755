"""Remote providers against stand-ins that speak the real OpenAI and Anthropic APIs: status says whether
the endpoint answers and takes the key, chat and streaming work, the key is never shown."""

from __future__ import annotations

import json

import pytest

from stigmer.config import store
from stigmer.errors import ErrorCode, StigmerError
from stigmer.llm.provider import get_provider
from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeAnthropic, FakeOpenAI

KEY = "sk-test-very-secret-key"


def test_openai_status_chat_and_stream(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the key from the provider's own variable
    with FakeOpenAI(key=KEY) as api:
        env = {
            "STIGMER_LLM_PROVIDER": "openai",
            "STIGMER_LLM_BASE_URL": api.url + "/v1",
            "OPENAI_API_KEY": KEY,
        }
        r = run_cli("server", "llm", "status", env=env)
        assert r.returncode == 0, r.stderr
        assert "Provider: OpenAI ✓ Connected" in r.stdout and "gpt-4o-mini" in r.stdout
        assert f"Endpoint: {api.url}/v1" in r.stdout
        data = json.loads(run_cli("server", "llm", "status", "--json", env=env).stdout)
        assert data["running"] is True and data["model_available"] is True and data["remote"] is True
        for out in (r.stdout, r.stderr, json.dumps(data)):
            assert KEY not in out
        settings = store.load(isolated_home, env)
        endpoint = get_provider(settings, isolated_home).endpoint()
        messages = [{"role": "user", "content": "hello there"}]
        assert endpoint.chat(messages) == "echo: hello there"
        assert "".join(endpoint.stream(messages)) == "echo: hello there"
        assert len(list(endpoint.stream(messages))) > 1
        assert api.requests[-1]["model"] == "gpt-4o-mini"


def test_wrong_key_is_reported_not_shown(isolated_home: Paths) -> None:
    with FakeOpenAI(key=KEY) as api:
        env = {
            "STIGMER_LLM_PROVIDER": "openai-compatible",
            "STIGMER_LLM_BASE_URL": api.url + "/v1",
            "STIGMER_LLM_MODEL": "gpt-4o",
            "STIGMER_LLM_API_KEY": "sk-wrong-key-123",
        }
        r = run_cli("server", "llm", "status", env=env)
        assert r.returncode == 0
        assert (
            "OpenAI-compatible ✗ Not Reachable" in r.stdout and "refused the API key (HTTP 401)" in r.stdout
        )
        assert "sk-wrong-key-123" not in r.stdout + r.stderr
        settings = store.load(isolated_home, env)
        with pytest.raises(StigmerError) as e:
            get_provider(settings, isolated_home).endpoint().chat([{"role": "user", "content": "x"}])
        assert e.value.code is ErrorCode.UNAUTHORIZED and "sk-wrong" not in str(e.value)


def test_anthropic_status_chat_and_stream(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with FakeAnthropic(key=KEY) as api:
        env = {"STIGMER_LLM_PROVIDER": "anthropic", "STIGMER_LLM_BASE_URL": api.url, "ANTHROPIC_API_KEY": KEY}
        r = run_cli("server", "llm", "status", env=env)
        assert r.returncode == 0 and "Provider: Anthropic ✓ Connected" in r.stdout, r.stdout + r.stderr
        assert KEY not in r.stdout + r.stderr
        endpoint = get_provider(store.load(isolated_home, env), isolated_home).endpoint()
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi you"}]
        assert endpoint.chat(messages, max_tokens=50) == "echo: hi you"
        assert "".join(endpoint.stream(messages)) == "echo: hi you"
        assert api.requests[-1]["system"] == "be brief" and api.requests[-1]["model"] == "claude-sonnet-4-5"
        bad = {**env, "ANTHROPIC_API_KEY": "nope"}
        r = run_cli("server", "llm", "status", env=bad)
        assert "✗ Not Reachable" in r.stdout and "refused the API key" in r.stdout


def test_openai_compatible_needs_its_endpoint(isolated_home: Paths) -> None:
    r = run_cli("server", "llm", "status", env={"STIGMER_LLM_PROVIDER": "openai-compatible"})
    assert "llm.base_url is not set" in r.stdout


def test_remote_provider_has_no_models_to_pull(isolated_home: Paths) -> None:
    r = run_cli("server", "llm", "pull", "llama3.2", env={"STIGMER_LLM_PROVIDER": "openai"})
    assert r.returncode == 10 and "no models to pull" in r.stderr

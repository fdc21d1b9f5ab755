"""The provider contract: every registered provider, running against the real engine or a stand-in that
speaks its real API, keeps the same promises (capabilities that match what it implements, a status that
never raises, a chat endpoint that lists its model, answers and streams the same answer), and says
plainly when nothing is there."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stigmer.config import store
from stigmer.events import silent
from stigmer.llm.names import same_model
from stigmer.llm.provider import (
    CATALOG,
    RUNTIME,
    LocalRuntime,
    ModelCatalog,
    ModelInfo,
    Provider,
    get_provider,
    registered,
    stop_llm,
)
from stigmer.llm.status import LlmStatus
from stigmer.paths import Paths
from tests.doubles.archives import free_port
from tests.doubles.fake_llm_apis import FakeAnthropic, FakeOpenAI
from tests.doubles.fake_ollama import FakeOllama, install_model

MESSAGES = [{"role": "user", "content": "Say hi in three words."}]


def _provider(paths: Paths, name: str, base_url: str, model: str, api_key: str = "") -> Provider:
    s = store.load(paths, {})
    llm = dataclasses.replace(s.llm, provider=name, base_url=base_url, model=model, api_key=api_key)
    return get_provider(dataclasses.replace(s, llm=llm), paths)


@pytest.fixture(params=["ollama", "llamacpp", "openai", "openai-compatible", "anthropic"])
def running(request: pytest.FixtureRequest, isolated_home: Paths, tmp_path: Path) -> Iterator[Provider]:
    name = request.param
    if name == "ollama":
        install_model(tmp_path / "models", "llama3.2")
        with FakeOllama(tmp_path / "models") as fake:
            yield _provider(isolated_home, name, fake.url, "llama3.2")
    elif name == "llamacpp":
        p = _provider(isolated_home, name, f"http://127.0.0.1:{free_port()}", "smollm2:135m")
        assert isinstance(p, LocalRuntime)
        p.start(silent)
        try:
            yield p
        finally:
            stop_llm(isolated_home)
    elif name == "anthropic":
        with FakeAnthropic(key="sk-c") as api:
            yield _provider(isolated_home, name, api.url, "claude-sonnet-4-5", "sk-c")
    else:
        with FakeOpenAI(key="sk-c") as api:
            yield _provider(isolated_home, name, api.url + "/v1", "gpt-4o-mini", "sk-c")


def test_every_built_in_provider_is_covered() -> None:
    assert set(registered()) >= {"ollama", "llamacpp", "openai", "openai-compatible", "anthropic"}


def test_contract_while_running(running: Provider) -> None:
    p = running
    assert p.capabilities == {
        c for c, part in ((RUNTIME, LocalRuntime), (CATALOG, ModelCatalog)) if isinstance(p, part)
    }
    st = p.status()
    assert isinstance(st, LlmStatus) and st.provider == p.name and st.running, st
    assert st.model == p.model and st.model_available
    endpoint = p.endpoint()
    assert any(same_model(listed, p.model) or listed == p.model for listed in endpoint.list_models())
    options: dict[str, Any] = {"max_tokens": 16, "temperature": 0, "seed": 1} if p.name == "llamacpp" else {}
    answer = endpoint.chat(MESSAGES, **options)
    pieces = list(endpoint.stream(MESSAGES, **options))
    assert answer.strip() and len(pieces) >= 1 and "".join(pieces) == answer
    if isinstance(p, LocalRuntime):
        assert p.healthy() and p.is_running()
    if isinstance(p, ModelCatalog):
        models = p.list_models()
        assert models and all(isinstance(m, ModelInfo) for m in models)


@pytest.mark.parametrize("name", ["ollama", "llamacpp", "openai", "openai-compatible", "anthropic"])
def test_contract_with_nothing_there(isolated_home: Paths, name: str) -> None:
    base = f"http://127.0.0.1:{free_port()}" + ("/v1" if name.startswith("openai") else "")
    p = _provider(isolated_home, name, base, "some-model:1b" if name in ("ollama", "llamacpp") else "m")
    st = p.status()  # never raises
    assert st.running is False and st.provider == name
    if isinstance(p, LocalRuntime):
        assert not p.healthy() and not p.is_running()
        assert p.managed_record() is None and p.stop() is False


def test_status_crosses_the_api_in_both_directions(isolated_home: Paths) -> None:
    # The CLI rebuilds the status the daemon sent; a daemon of another version adds or lacks fields.
    p = _provider(isolated_home, "ollama", f"http://127.0.0.1:{free_port()}", "some-model:1b")
    sent = dataclasses.asdict(p.status())
    assert LlmStatus.from_dict(sent) == p.status()
    newer = {**sent, "field_from_a_newer_daemon": 1}
    older = {k: v for k, v in sent.items() if k not in ("runs_on", "context", "notes")}
    assert LlmStatus.from_dict(newer).model == "some-model:1b"
    assert LlmStatus.from_dict(older).runs_on == "" and LlmStatus.from_dict(older).context == 0

"""The setup orchestration (running? -> runtime -> start -> model), driven through a fake provider that is
registered exactly as the real ones are; and what it promises about the record and the order of steps."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar

import pytest

from stigmer.config import store
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import Event, Reporter
from stigmer.llm import setup as llm_setup
from stigmer.llm.provider import (
    CATALOG,
    RUNTIME,
    LocalRuntime,
    ModelCatalog,
    ModelInfo,
    Provider,
    get_provider,
    register,
)
from stigmer.llm.status import LlmStatus
from stigmer.paths import Paths
from stigmer.services.env import PYTHON, child_env
from stigmer.services.manager import Services
from stigmer.services.spec import ServiceSpec

CALLS: list[str] = []
STATE: dict[str, Any] = {}


class FakeProvider(Provider, LocalRuntime, ModelCatalog):
    """A local runtime whose 'server' is a sleeping Python process: real records, no network."""

    name: ClassVar[str] = "fake"
    label: ClassVar[str] = "Fake"
    noun: ClassVar[str] = "fake LLM"

    def is_running(self) -> bool:
        CALLS.append("is_running")
        return self.managed_record() is not None  # a real one probes its base URL

    def healthy(self) -> bool:
        return self.managed_record() is not None

    def ensure_runtime(self, report: Reporter) -> None:
        CALLS.append("ensure_runtime")
        report(Event("Installing", "fake runtime"))
        if STATE.get("runtime_error"):
            raise STATE["runtime_error"]

    def service_spec(self, report: Reporter, model: str | None = None) -> ServiceSpec:
        CALLS.append(f"spec:{model or self.model}")
        fail = STATE.get("start_fails", False)
        code = "import sys; sys.exit(2)" if fail else "import time; time.sleep(60)"
        return ServiceSpec(
            name="llm",
            argv=[sys.executable, "-c", code],
            env=child_env(PYTHON),
            ready=lambda: True if not fail else False,
            ready_timeout=5,
            info={
                "provider": self.name,
                "base_url": self.base_url,
                "model": model or self.model,
                **self.extra,
            },
        )

    def ensure_model(self, model: str, report: Reporter) -> None:
        CALLS.append(f"ensure_model:{model}")

    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(self.model, 1, "2026-01-01T00:00:00Z")]

    def pull(self, model: str, report: Reporter) -> None:
        CALLS.append(f"pull:{model}")

    def remove(self, model: str) -> None:
        CALLS.append(f"remove:{model}")

    def status(self) -> LlmStatus:
        rec = self.managed_record()
        return LlmStatus(
            self.name, self.label, rec is not None, rec.pid if rec else None, rec is not None,
            self.model, True, [self.model], self.base_url,
        )  # fmt: skip


class RemoteFake(Provider):
    name: ClassVar[str] = "remote-fake"
    label: ClassVar[str] = "Remote"
    noun: ClassVar[str] = "remote LLM"

    def status(self) -> LlmStatus:
        return LlmStatus(self.name, self.label, True, None, False, self.model, True, [], self.base_url)


register("fake", f"{__name__}:FakeProvider")
register("remote-fake", f"{__name__}:RemoteFake")


def settings_for(paths: Paths, provider: str) -> Settings:
    s = store.load(paths, {})
    return dataclasses.replace(s, llm=dataclasses.replace(s.llm, provider=provider))


@pytest.fixture(autouse=True)
def _reset(isolated_home: Paths):  # type: ignore[no-untyped-def]
    CALLS.clear()
    STATE.clear()
    yield
    Services(isolated_home).stop("llm", timeout=5)


def test_not_running_installs_starts_then_ensures_model(isolated_home: Paths) -> None:
    events: list[Event] = []
    result = llm_setup.setup(settings_for(isolated_home, "fake"), isolated_home, events.append)
    assert result.started and result.status.running
    assert CALLS[:2] == ["is_running", "ensure_runtime"]
    assert CALLS.index("spec:qwen2.5-coder:7b") < CALLS.index("ensure_model:qwen2.5-coder:7b")
    assert [e.message for e in events][:2] == ["Setting up local LLM", "fake runtime"]
    rec = Services(isolated_home).record("llm")
    assert rec is not None and rec.info["provider"] == "fake" and result.status.pid == rec.pid


def test_running_server_is_reused_and_only_its_model_ensured(isolated_home: Paths) -> None:
    s = settings_for(isolated_home, "fake")
    first = llm_setup.setup(s, isolated_home)
    CALLS.clear()
    second = llm_setup.setup(s, isolated_home)
    assert not second.started and second.status.pid == first.status.pid
    assert CALLS == ["is_running", "ensure_model:qwen2.5-coder:7b"]


def test_start_failure_leaves_no_record(isolated_home: Paths) -> None:
    STATE["start_fails"] = True
    with pytest.raises(StigmerError) as e:
        llm_setup.setup(settings_for(isolated_home, "fake"), isolated_home)
    assert e.value.code is ErrorCode.START_FAILED
    assert Services(isolated_home).record("llm") is None and not isolated_home.pid_file("llm").exists()


def test_network_failure_without_fallback_is_raised(isolated_home: Paths) -> None:
    from stigmer.errors import NetworkUnreachable

    STATE["runtime_error"] = NetworkUnreachable("no network", code=ErrorCode.NETWORK_UNREACHABLE)
    with pytest.raises(NetworkUnreachable):  # the fallback applies to the ollama runtime only
        llm_setup.setup(settings_for(isolated_home, "fake"), isolated_home)
    assert "spec:qwen2.5-coder:7b" not in CALLS


def test_a_server_of_another_provider_is_stopped_before_starting(isolated_home: Paths) -> None:
    s = settings_for(isolated_home, "fake")
    other = get_provider(s, isolated_home, name="fake", base_url="http://127.0.0.1:1")
    assert isinstance(other, LocalRuntime)
    old = other.start(lambda _e: None)
    result = llm_setup.setup(s, isolated_home)
    assert result.started and result.status.pid != old.pid
    from stigmer.services import record as records

    assert not records.is_ours(old)  # no orphan left behind


def test_remote_provider_starts_nothing(isolated_home: Paths) -> None:
    result = llm_setup.setup(settings_for(isolated_home, "remote-fake"), isolated_home)
    assert not result.started and CALLS == []
    assert get_provider(settings_for(isolated_home, "remote-fake"), isolated_home).capabilities == frozenset()


def test_capabilities_follow_what_a_provider_implements(isolated_home: Paths) -> None:
    fake = get_provider(settings_for(isolated_home, "fake"), isolated_home)
    assert fake.capabilities == {RUNTIME, CATALOG}
    assert fake.endpoint().base_url == "http://127.0.0.1:11434/v1"

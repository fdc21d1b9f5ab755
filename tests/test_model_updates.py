"""Model updates: the weekly check against the registry stand-in (a changed manifest -> a notice; offline
-> no delay and no error), and `llm update` fetching only the layers that changed, with the store's entry
replaced and the old blob gone."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer.config import store as config_store
from stigmer.config.store import Settings
from stigmer.events import silent
from stigmer.llm.models import updates
from stigmer.llm.models.registry import pull_from_registry
from stigmer.llm.models.sources import store_for
from stigmer.llm.names import parse_model_name
from stigmer.net import retry
from stigmer.paths import Paths
from tests.doubles import gguf_writer as gw
from tests.doubles.archives import free_port
from tests.doubles.fake_ollama import FakeOllama, install_model
from tests.doubles.fake_registry import FakeRegistry

NAME = "tiny-coder:q8"
WEEK = updates.CHECK_EVERY
TEMPLATE = "{{ .Prompt }}"
PARAMS = {"stop": ["<|im_end|>"]}


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "DOWNLOADS", retry.RetryPolicy(first_delay=0.01, max_delay=0.05))


def tiny_gguf(path: Path, name: str) -> Path:
    """A whole, loadable-shaped GGUF of a few hundred KB; `name` changes its bytes (a new version)."""
    metadata, tensors = gw.tiny_llama()
    metadata["general.name"] = name
    return gw.write_gguf(path, metadata, tensors)


@pytest.fixture
def versions(tmp_path: Path) -> tuple[Path, Path]:
    return tiny_gguf(tmp_path / "v1.gguf", "tiny v1"), tiny_gguf(tmp_path / "v2.gguf", "tiny v2")


@pytest.fixture
def registry(versions: tuple[Path, Path]) -> Iterator[FakeRegistry]:
    with FakeRegistry({NAME: {"model": versions[0], "template": TEMPLATE, "params": PARAMS}}) as reg:
        yield reg


def settings_for(paths: Paths, registry_url: str, provider: str = "llamacpp", **extra: str) -> Settings:
    env = {"STIGMER_LLM_PROVIDER": provider, "STIGMER_LLM_REGISTRY_URL": registry_url, **extra}
    return config_store.load(paths, env)


def pull(paths: Paths, registry_url: str) -> None:
    paths.ensure(paths.downloads_dir)
    pull_from_registry(
        parse_model_name(NAME),
        registry_url=registry_url,
        store=store_for(paths),
        downloads=paths.downloads_dir,
        report=silent,
    )


def check(
    settings: Settings, paths: Paths, now: float, provider: str = "llamacpp", base_url: str = ""
) -> str | None:
    return updates.check_on_start(settings, paths, provider=provider, model=NAME, base_url=base_url, now=now)


def test_the_pull_records_the_manifest_digest_and_the_small_layers(
    isolated_home: Paths, registry: FakeRegistry
) -> None:
    pull(isolated_home, registry.url)
    entry = store_for(isolated_home).get(NAME)
    assert entry is not None
    assert entry.manifest_digest == hashlib.sha256(registry.manifest(NAME)).hexdigest()
    assert entry.layers == {
        "application/vnd.ollama.image.template": registry.digest(NAME, "template"),
        "application/vnd.ollama.image.params": registry.digest(NAME, "params"),
    }


def test_a_changed_manifest_is_offered_once_a_week(
    isolated_home: Paths, registry: FakeRegistry, versions: tuple[Path, Path]
) -> None:
    settings = settings_for(isolated_home, registry.url)
    pull(isolated_home, registry.url)
    asked = len(registry.registry_log)
    now = time.time()
    assert check(settings, isolated_home, now) is None  # just pulled: that counts as a check
    assert len(registry.registry_log) == asked  # and the registry was not asked

    a_week_later = now + WEEK + 60
    assert check(settings, isolated_home, a_week_later) is None  # nothing new yet
    assert len(registry.registry_log) == asked + 1
    assert check(settings, isolated_home, a_week_later + 3600) is None
    assert len(registry.registry_log) == asked + 1  # checked: not again for a week

    registry.add_model(NAME, {"model": versions[1], "template": TEMPLATE, "params": PARAMS})  # a new version
    two_weeks = a_week_later + WEEK + 60
    found = check(settings, isolated_home, two_weeks)
    assert found == f"An update of {NAME} is available: stigmer server llm update {NAME}"
    state = json.loads((isolated_home.data_dir / updates.STATE).read_text())
    entry = next(iter(state["models"].values()))
    assert (
        entry["update_available"] and entry["remote"] == hashlib.sha256(registry.manifest(NAME)).hexdigest()
    )
    assert updates.offered(isolated_home, "llamacpp", NAME)

    # remembered: offered again at the next start without asking the registry, until updated
    registry.close()
    assert check(settings, isolated_home, two_weeks + 60) == found

    # never with llm.update_check false
    off = settings_for(isolated_home, registry.url, STIGMER_LLM_UPDATE_CHECK="false")
    assert check(off, isolated_home, two_weeks + 60) is None


def test_offline_costs_no_delay_and_no_error(isolated_home: Paths, registry: FakeRegistry) -> None:
    pull(isolated_home, registry.url)
    dead = settings_for(isolated_home, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    later = time.time() + WEEK + 60
    t = time.monotonic()
    assert check(dead, isolated_home, later) is None
    assert time.monotonic() - t < 0.5
    state = next(iter(json.loads((isolated_home.data_dir / updates.STATE).read_text())["models"].values()))
    assert state["failed_at"] == later  # and it is not tried again for a day
    t = time.monotonic()
    assert check(dead, isolated_home, later + 60) is None
    assert time.monotonic() - t < 0.1


def test_a_registry_that_never_answers_costs_two_seconds_at_most(
    isolated_home: Paths, registry: FakeRegistry
) -> None:
    pull(isolated_home, registry.url)
    silent_server = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent_server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(silent_server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = silent_server.getsockname()[1]
        settings = settings_for(isolated_home, f"http://127.0.0.1:{port}")
        t = time.monotonic()
        assert check(settings, isolated_home, time.time() + WEEK + 60) is None
        assert time.monotonic() - t < updates.CHECK_TIMEOUT + 1.0
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        silent_server.close()


def test_the_start_offers_the_update_on_stderr(
    isolated_home: Paths,
    registry: FakeRegistry,
    versions: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stigmer.cli.render import Out
    from stigmer.cli.server_cmd import _offer_update

    pull(isolated_home, registry.url)
    registry.add_model(NAME, {"model": versions[1], "template": TEMPLATE, "params": PARAMS})
    monkeypatch.setenv("STIGMER_LLM_REGISTRY_URL", registry.url)
    monkeypatch.setenv("STIGMER_LLM_UPDATE_CHECK", "true")  # the test home turns it off
    real_time = time.time
    monkeypatch.setattr(updates.time, "time", lambda: real_time() + WEEK + 60)
    status = {
        "llm": {"provider": "llamacpp", "model": NAME, "base_url": "http://127.0.0.1:1", "running": True}
    }
    _offer_update(Out(), status)
    out, err = capsys.readouterr()
    assert out == "" and f"An update of {NAME} is available: stigmer server llm update {NAME}" in err


# -- llm update ------------------------------------------------------------------------------------------
def test_update_fetches_only_the_changed_model_layer(
    isolated_home: Paths, registry: FakeRegistry, versions: tuple[Path, Path]
) -> None:
    settings = settings_for(isolated_home, registry.url)
    pull(isolated_home, registry.url)
    old = store_for(isolated_home).get(NAME)
    assert old is not None
    up_to_date = updates.update_model(
        settings, isolated_home, provider="llamacpp", model=NAME, base_url="", report=silent
    )
    assert not up_to_date.updated and up_to_date.message == f"{NAME} is up to date."

    registry.add_model(NAME, {"model": versions[1], "template": TEMPLATE, "params": PARAMS})
    registry.cdn_log.clear()
    result = updates.update_model(
        settings, isolated_home, provider="llamacpp", model=NAME, base_url="", report=silent
    )
    assert result.updated
    new_model = registry.digest(NAME)
    assert result.fetched == [new_model]
    assert sorted(result.reused) == sorted(
        [registry.digest(NAME, "template"), registry.digest(NAME, "params")]
    )
    fetched = {r.digest for r in registry.cdn_log}
    assert fetched == {new_model}  # template and params: no request at all
    assert registry.sent(new_model) >= versions[1].stat().st_size
    new = store_for(isolated_home).get(NAME)
    assert new is not None and new.sha256 == new_model.removeprefix("sha256:")
    assert new.manifest_digest == hashlib.sha256(registry.manifest(NAME)).hexdigest()
    assert new.template == TEMPLATE and new.params == PARAMS
    assert not Path(old.path).exists()  # the old version's blob is gone, the index points at the new one
    assert [m.name for m in store_for(isolated_home).list()] == [NAME]


def test_update_fetches_only_a_changed_small_layer(
    isolated_home: Paths, registry: FakeRegistry, versions: tuple[Path, Path]
) -> None:
    settings = settings_for(isolated_home, registry.url)
    pull(isolated_home, registry.url)
    old = store_for(isolated_home).get(NAME)
    assert old is not None
    registry.add_model(
        NAME, {"model": versions[0], "template": "{{ .System }} {{ .Prompt }}", "params": PARAMS}
    )
    registry.cdn_log.clear()
    result = updates.update_model(
        settings, isolated_home, provider="llamacpp", model=NAME, base_url="", report=silent
    )
    assert result.updated and result.fetched == [registry.digest(NAME, "template")]
    model_requests = registry.requests_for(registry.digest(NAME))
    # the model layer: only the fit check's look at its header, never a download
    assert all(r.range is not None for r in model_requests) and len(model_requests) <= 1
    new = store_for(isolated_home).get(NAME)
    assert new is not None and new.path == old.path and new.template == "{{ .System }} {{ .Prompt }}"


def test_update_of_an_imported_model_says_there_is_nothing_to_fetch(
    isolated_home: Paths, versions: tuple[Path, Path]
) -> None:
    from stigmer.errors import ErrorCode, StigmerError
    from stigmer.llm.models.sources import import_file

    import_file(isolated_home, versions[0], "mine:q8")
    settings = settings_for(isolated_home, "http://127.0.0.1:1")
    with pytest.raises(StigmerError) as e:
        updates.update_model(
            settings, isolated_home, provider="llamacpp", model="mine:q8", base_url="", report=silent
        )
    assert e.value.code is ErrorCode.UNSUPPORTED and "not from a registry" in e.value.message


# -- the Local LLM runtime's models ----------------------------------------------------------------------
def test_the_runtime_model_is_compared_by_its_manifest_digest(isolated_home: Paths, tmp_path: Path) -> None:
    models = tmp_path / "ollama-models"
    manifest = install_model(models, "qwen2.5-coder:7b")
    with FakeOllama(models) as fake, FakeRegistry({}) as reg:
        reg.set_manifest("qwen2.5-coder:7b", manifest.read_bytes())  # the same version as here
        settings = settings_for(isolated_home, reg.url, provider="ollama")
        later = time.time() + WEEK + 60
        run = updates.check_on_start
        assert (
            run(
                settings,
                isolated_home,
                provider="ollama",
                model="qwen2.5-coder:7b",
                base_url=fake.url,
                now=later,
            )
            is None
        )
        assert len(reg.registry_log) == 1
        reg.set_manifest("qwen2.5-coder:7b", manifest.read_bytes() + b" ")  # the registry moved on
        found = run(
            settings,
            isolated_home,
            provider="ollama",
            model="qwen2.5-coder:7b",
            base_url=fake.url,
            now=later + WEEK + 60,
        )
        assert (
            found == "An update of qwen2.5-coder:7b is available: stigmer server llm update qwen2.5-coder:7b"
        )

"""`stigmer server llm status` with nothing running, from a few files (issue 14: it must answer in under
100 ms): the light settings reader, and the quick status that must say what the providers say."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest

from stigmer.config import light, schema, store
from stigmer.errors import StigmerError
from stigmer.llm import active
from stigmer.llm.quick_status import DEFAULT_CHOICE, FALLBACK_URL, LOCAL, quick_status
from stigmer.paths import Paths
from tests.doubles.archives import free_port

# -- config.light: exactly what ruamel reads, or None ---------------------------------------------------
SIMPLE = [
    "",
    "# only a comment\n",
    "backend:\n  local:\n    llm:\n      provider: llamacpp\n",
    "backend:\n  local:\n    llm:\n      provider: 'ollama'   # quoted\n      model: \"llama3.2:3b\"\n",
    "backend:\n  type: local\n  local:\n    llm:\n      model: it''s\n      base_url: http://127.0.0.1:5/\n"
    "    server:\n      port: 7234\n  cloud:\n    endpoint: ''\n",
    "backend:\n  local:\n    llm:\n      model: 'it''s'\n      offline_fallback: false\n      threads: 0\n",
    "backend:\n  local:\n    llm:\n    temporal:\n      managed: TRUE\n      address: localhost:7233\n",
    "backend:\n    local:\n        llm:\n            model: qwen2.5-coder:7b  # four spaces\n",
    "backend:\n  local:\n    llm:\n      model: ~\n      base_url: null\n",
]
OUTSIDE = [
    "backend: {local: {llm: {provider: llamacpp}}}\n",  # flow mapping
    "backend:\n  local:\n    llm:\n      origins:\n        - https://a.example\n",  # a list
    "backend:\n  local:\n    llm:\n      model: &m llama3.2\n      other: *m\n",  # anchor
    "backend:\n  local:\n    llm:\n      model: !!str llama3.2\n",  # tag
    "backend:\n  local:\n    llm:\n      model: |\n        llama3.2\n",  # block scalar
    "backend:\n  local:\n    llm:\n      model: llama3.2\n        continued\n",  # multi-line
    "backend:\n\tlocal: {}\n",  # tab
    "backend:\n  local:\n    llm:\n      model: a\n      model: b\n",  # duplicate key
    "---\nbackend:\n  type: local\n",  # document marker
    'backend:\n  local:\n    llm:\n      model: "a\\tb"\n',  # an escape
    "backend:\n  local:\n     llm:\n    server: {}\n",  # misaligned
    "'backend':\n  type: local\n",  # quoted key
]


def ruamel(text: str) -> object:
    from ruamel.yaml import YAML

    doc = YAML(typ="rt").load(text)
    return json.loads(json.dumps(doc if doc is not None else {}))


@pytest.mark.parametrize("text", SIMPLE)
def test_the_subset_reads_as_ruamel_reads_it(text: str) -> None:
    assert light.parse(text) == ruamel(text)


@pytest.mark.parametrize("text", OUTSIDE)
def test_anything_else_is_left_to_the_full_loader(text: str) -> None:
    assert light.parse(text) is None


def test_numbers_yaml_may_read_otherwise_are_never_given_out(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("backend:\n  local:\n    llm:\n      runtime_version: 0.33.0\n      model: 010\n")
    assert light.read_file(cfg) is not None  # the file reads...
    assert light.read(cfg, ("llm.provider",), {}) == {"llm.provider": ("", "default")}
    assert light.read(cfg, ("llm.model",), {}) is None  # ...but not a value YAML would type itself


def test_the_default_file_and_set_values_read_as_the_full_loader_reads_them(isolated_home: Paths) -> None:
    store.ensure_file(isolated_home)
    store.set_value(isolated_home, "llm.provider", "llamacpp")
    store.set_value(isolated_home, "llm.base_url", "http://127.0.0.1:12345")
    store.set_value(isolated_home, "llm.runtime_version", "0.33.0")
    store.set_value(isolated_home, "llm.origins", "https://a.example.com,http://localhost:*")
    assert light.read_file(isolated_home.config_file) == ruamel(isolated_home.config_file.read_text())
    env = {"STIGMER_LLM_MODEL": "llama3.2:3b", "STIGMER_LLM_BASE_URL": ""}  # empty: not set
    assert light.read(isolated_home.config_file, tuple(light.KEYS), env) == {
        "llm.provider": ("llamacpp", "file"),
        "llm.model": ("llama3.2:3b", "env"),
        "llm.base_url": ("http://127.0.0.1:12345", "file"),
        "llm.fallback_base_url": ("http://127.0.0.1:11435", "file"),
    }


def test_the_tables_agree_with_the_schema_and_the_providers() -> None:
    from stigmer.llm.provider import provider_class

    for name, (path, env) in light.KEYS.items():
        key = schema.BY_NAME[name]
        assert (key.path, key.env, key.aliases) == (path, env, ())
    for provider, (label, model, url) in LOCAL.items():
        assert provider_class(provider).label == label
        assert schema.PROVIDER_DEFAULTS[provider] == {"model": model, "base_url": url}
    assert schema.BY_NAME["llm.fallback_base_url"].default == FALLBACK_URL


def test_a_large_or_unreadable_file_is_left_to_the_full_loader(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(b"backend:\n  type: \xff\n")
    assert light.read_file(cfg) is None
    cfg.write_text("# x\n" * 20_000)
    assert light.read_file(cfg) is None
    assert light.read_file(tmp_path / "none.yaml") == {}


# -- quick_status says what the provider says ---------------------------------------------------------
def full(paths: Paths) -> dict[str, object]:
    return dataclasses.asdict(active.status(store.load(paths), paths))


def quick(paths: Paths) -> dict[str, object] | None:
    st = quick_status(paths)
    return None if st is None else dataclasses.asdict(st)


def remember(paths: Paths, model: str = "qwen2.5-coder:1.5b", tps: float = 10.1) -> None:
    paths.ensure(paths.data_dir)
    reason = f"2 CPU cores, no GPU: {model} should generate about 10 tokens/s here"
    (paths.data_dir / DEFAULT_CHOICE).write_text(
        json.dumps({"model": model, "reason": reason, "tokens_per_second": tps})
    )


@pytest.fixture
def closed_port() -> int:
    return free_port()  # not the OS's pick: no other test's server can take it meanwhile


def test_the_runtime_with_its_remembered_default(isolated_home: Paths, closed_port: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STIGMER_LLM_BASE_URL", f"http://127.0.0.1:{closed_port}")
    remember(isolated_home)
    got = quick(isolated_home)
    assert got is not None and got == full(isolated_home)
    assert got["model"] == "qwen2.5-coder:1.5b" and got["expected_tokens_per_second"] == 10.1
    # an older version remembered no speed: 0, as the provider says
    (isolated_home.data_dir / DEFAULT_CHOICE).write_text(json.dumps({"model": "m:1", "reason": "why"}))
    assert quick(isolated_home) == full(isolated_home)


@pytest.mark.parametrize(
    "settings",
    [
        {"llm.model": "llama3.2:3b"},  # set by the user: no machine choice
        {"llm.model": ""},  # written empty: the provider's default, but not the machine's choice
        {"llm.provider": "llamacpp"},  # the built-in engine: its store and the starter model
        {"llm.provider": "llamacpp", "llm.model": "hf.co/org/repo:Q4_K_M"},
        {"llm.provider": "LlamaCpp", "llm.base_url": "http://localhost:PORT/"},  # as the loader takes them
    ],
)
def test_configured_in_the_file(isolated_home: Paths, closed_port: int, settings: dict[str, str]) -> None:
    store.ensure_file(isolated_home)
    store.set_value(isolated_home, "llm.base_url", f"http://127.0.0.1:{closed_port}")
    doc = isolated_home.config_file.read_text()
    for name, value in settings.items():
        value = value.replace("PORT", str(closed_port))
        field = name.split(".")[1]
        line = f"      {field}: '{value}'\n"
        if f"      {field}: " in doc:
            doc = "".join(line if ln.startswith(f"      {field}: ") else ln for ln in doc.splitlines(True))
        else:
            doc = doc.replace("    llm:\n", "    llm:\n" + line, 1)
    isolated_home.config_file.write_text(doc)
    remember(isolated_home)  # there, but only for a model the machine chose
    got = quick(isolated_home)
    assert got is not None and got == full(isolated_home)


def test_unsure_means_the_provider_answers(isolated_home: Paths, closed_port: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STIGMER_LLM_BASE_URL", f"http://127.0.0.1:{closed_port}")
    assert quick_status(isolated_home) is None  # no default chosen yet: the provider chooses it
    remember(isolated_home)
    assert quick_status(isolated_home) is not None

    isolated_home.ensure(isolated_home.run_dir)
    isolated_home.pid_file("llm").write_text("{}")  # a recorded server: ours may run
    assert quick_status(isolated_home) is None
    isolated_home.pid_file("llm").unlink()

    with socket.socket() as s:  # something listens on the port: the provider says what it is
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
        assert quick_status(isolated_home) is None
    monkeypatch.setenv("STIGMER_LLM_BASE_URL", f"http://127.0.0.1:{closed_port}")

    for bad in (
        {"STIGMER_LLM_PROVIDER": "openai"},  # remote
        {"STIGMER_LLM_BASE_URL": "http://10.0.0.7:11434"},  # another machine
        {"STIGMER_LLM_BASE_URL": "http://127.0.0.1:11435"},  # the fallback's port: the loader refuses it
    ):
        assert quick_status(isolated_home, bad) is None
    monkeypatch.setenv("STIGMER_LLM_MODEL", "bad name!")
    assert quick_status(isolated_home) is None
    with pytest.raises(StigmerError, match="STIGMER_LLM_MODEL"):
        store.load(isolated_home)  # the full loader says what is wrong


def test_the_starter_model_is_found_as_models_starter_finds_it() -> None:
    from stigmer.llm.models.starter import starter_model_path
    from stigmer.llm.quick_status import _starter_installed

    assert _starter_installed() == (starter_model_path() is not None)


def test_an_empty_provider_in_the_file_is_the_full_loaders_to_refuse(isolated_home: Paths) -> None:
    isolated_home.ensure_home()
    isolated_home.config_file.write_text("backend:\n  local:\n    llm:\n      provider: ''\n")
    assert quick_status(isolated_home, {}) is None
    with pytest.raises(StigmerError, match="llm.provider"):
        store.load(isolated_home, {})

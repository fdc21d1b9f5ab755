from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stigmer.config import store
from stigmer.config.schema import KEYS
from stigmer.errors import StigmerError
from stigmer.paths import Paths
from tests.conftest import run_cli


def test_first_run_creates_defaults_with_mode_0600(isolated_home: Paths) -> None:
    assert store.ensure_file(isolated_home) is True
    mode = stat.S_IMODE(isolated_home.config_file.stat().st_mode)
    assert mode == 0o600
    text = isolated_home.config_file.read_text()
    assert "provider: ollama" in text and "backend:" in text
    assert store.ensure_file(isolated_home) is False


def test_partial_file_is_merged_with_defaults(isolated_home: Paths) -> None:
    isolated_home.home.mkdir(parents=True)
    isolated_home.config_file.write_text("backend:\n  local:\n    llm:\n      model: llama3.2\n")
    s = store.load(isolated_home, {})
    assert s.llm.model == "llama3.2"
    assert s.llm.provider == "ollama"
    assert s.llm.base_url == "http://127.0.0.1:11434"
    assert s.llm.download_url == "https://github.com/ollama/ollama/releases"
    assert s.source("llm.model") == "file" and s.source("llm.provider") == "default"


def test_environment_beats_file_beats_default(isolated_home: Paths) -> None:
    store.set_value(isolated_home, "llm.model", "llama3.2")
    s = store.load(isolated_home, {"STIGMER_LLM_MODEL": "qwen2.5-coder:1.5b"})
    assert s.llm.model == "qwen2.5-coder:1.5b" and s.source("llm.model") == "env"
    s = store.load(isolated_home, {"STIGMER_LLM_PROVIDER": "llamacpp"})
    assert s.llm.provider == "llamacpp" and s.llm.model == "llama3.2"
    # provider-dependent defaults follow the provider while the key is unset
    assert s.llm.base_url == "http://127.0.0.1:11435"


def test_bad_env_value_is_refused(isolated_home: Paths) -> None:
    with pytest.raises(StigmerError, match="STIGMER_LLM_PROVIDER"):
        store.load(isolated_home, {"STIGMER_LLM_PROVIDER": "nope"})


def test_set_keeps_comments_and_is_atomic(isolated_home: Paths) -> None:
    isolated_home.home.mkdir(parents=True)
    original = "# my precious comment\nbackend:\n  local:\n    llm:\n      provider: ollama  # keep me\n"
    isolated_home.config_file.write_text(original)
    store.set_value(isolated_home, "llm.model", "llama3.2")
    text = isolated_home.config_file.read_text()
    assert "# my precious comment" in text and "# keep me" in text and "model: llama3.2" in text
    assert not [p for p in isolated_home.home.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "content",
    ["backend:\n  local: [unclosed\n", "backend:\n\tlocal: x\n", "backend: {\n"],
)
def test_malformed_file_is_never_overwritten(isolated_home: Paths, content: str) -> None:
    isolated_home.home.mkdir(parents=True)
    isolated_home.config_file.write_bytes(content.encode())
    r = run_cli("config", "set", "llm.model", "llama3.2")
    assert r.returncode == 3  # a configuration error
    assert f"{isolated_home.config_file}:" in r.stderr  # file:line:column
    assert "Traceback" not in r.stderr
    assert isolated_home.config_file.read_bytes() == content.encode()
    r = run_cli("server")
    assert r.returncode == 3 and "Malformed config file" in r.stderr
    assert isolated_home.config_file.read_bytes() == content.encode()


def test_wrong_shape_and_bad_value_in_file(isolated_home: Paths) -> None:
    isolated_home.home.mkdir(parents=True)
    isolated_home.config_file.write_text("backend: 5\n")
    with pytest.raises(StigmerError, match="'backend' must be a mapping"):
        store.load(isolated_home, {})
    isolated_home.config_file.write_text("backend:\n  local:\n    llm:\n      provider: gpt\n")
    with pytest.raises(StigmerError, match=r"llm.provider.*line 4"):
        store.load(isolated_home, {})


def test_cli_get_set_list_path(isolated_home: Paths) -> None:
    r = run_cli("config", "set", "llm.model", "deepseek-coder:6.7b")
    assert r.returncode == 0, r.stderr
    assert "✓ Configuration updated: llm.model = deepseek-coder:6.7b" in r.stdout
    assert f"Saved to: {isolated_home.config_file}" in r.stdout
    assert run_cli("config", "get", "llm.model").stdout.strip() == "deepseek-coder:6.7b"
    assert run_cli("config", "path").stdout.strip() == str(isolated_home.config_file)
    listing = run_cli("config", "list").stdout
    for key in KEYS:
        assert key.name in listing


def test_unknown_key_and_bad_values_list_what_is_valid(isolated_home: Paths) -> None:
    r = run_cli("config", "set", "llm.modle", "x")
    assert r.returncode == 2 and "Unknown config key" in r.stderr and "llm.model" in r.stderr
    r = run_cli("config", "set", "llm.provider", "openai-ish")
    assert r.returncode == 3 and "ollama, llamacpp" in r.stderr
    r = run_cli("config", "set", "llm.model", "bad name!")
    assert r.returncode == 3 and "Invalid" in r.stderr
    r = run_cli("config", "set", "llm.base_url", "ftp://x")
    assert r.returncode == 3
    r = run_cli("config", "set", "llm.runtime_version", "v0.33.0")
    assert r.returncode == 0 and run_cli("config", "get", "llm.runtime_version").stdout.strip() == "0.33.0"
    assert not isolated_home.config_file.read_text().count("openai-ish")


def test_secrets_are_masked(isolated_home: Paths) -> None:
    r = run_cli("config", "set", "llm.api_key", "sk-very-secret")
    assert r.returncode == 0 and "sk-very-secret" not in r.stdout
    assert "sk-very-secret" not in run_cli("config", "list").stdout
    assert "sk-very-secret" not in run_cli("config", "get", "llm.api_key").stdout


def test_every_key_and_env_var_is_documented_in_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for key in KEYS:
        assert f"`{key.name}`" in readme, key.name
        assert f"`{key.env}`" in readme, key.env


def test_every_edit_is_seen_even_same_size_with_mtime_restored(isolated_home: Paths) -> None:
    store.set_value(isolated_home, "llm.model", "llama3.2")
    assert store.load(isolated_home, {}).llm.model == "llama3.2"
    path = isolated_home.config_file
    st = path.stat()
    text = path.read_text().replace("llama3.2", "llama3.3")  # same size
    with path.open("w") as f:  # in place: same inode
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime put back
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert store.load(isolated_home, {}).llm.model == "llama3.3"
    path.write_text("backend: [broken\n")
    with pytest.raises(StigmerError, match="Malformed"):
        store.load(isolated_home, {})
    path.write_text("backend:\n  local:\n    llm:\n      offline_fallback: false\n")
    assert store.load(isolated_home, {}).llm.offline_fallback is False


def test_stigmer_home_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    r = run_cli("server", env={"STIGMER_HOME": str(not_a_dir)})
    assert r.returncode == 9 and "STIGMER_HOME" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--debug", "config", "set", "llm.model", "x", env={"STIGMER_HOME": str(not_a_dir)})
    assert r.returncode == 9 and "Traceback" in r.stderr  # tracebacks only with --debug
    assert not_a_dir.read_text() == "x"

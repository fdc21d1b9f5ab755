"""Hostile and careless config input: alias bombs, huge or binary files, values without bounds, loose
YAML types, a secret left readable. Each is refused with a message naming the valid range, and the file
is never touched."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from stigmer.config import store
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from tests.conftest import run_cli


def _write(paths: Paths, text: str | bytes) -> bytes:
    paths.home.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    paths.config_file.write_bytes(data)
    return data


def test_billion_laughs_is_refused_at_once(isolated_home: Paths) -> None:
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    for prev, cur in zip("abcdefg", "bcdefgh", strict=True):
        bomb += f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    data = _write(isolated_home, bomb)
    assert len(data) < 400  # a few hundred bytes that expand to 9**8 (43 million) strings
    started = time.monotonic()
    r = run_cli("config", "list", timeout=30)
    assert time.monotonic() - started < 10  # (the bug: hung at 400 MB)
    assert r.returncode == 3 and "Malformed config file" in r.stderr and "aliases" in r.stderr
    assert f"{isolated_home.config_file}:1:" in r.stderr
    assert isolated_home.config_file.read_bytes() == data


def test_not_utf8_is_a_malformed_config_error(isolated_home: Paths) -> None:
    data = _write(isolated_home, b"backend:\n  type: local\n  x: \xff\xfe\n")
    r = run_cli("config", "list")
    assert r.returncode == 3 and "not UTF-8" in r.stderr and f"{isolated_home.config_file}:3:" in r.stderr
    assert "bug in Stigmer" not in r.stderr
    assert isolated_home.config_file.read_bytes() == data


def test_huge_file_is_refused_quickly(isolated_home: Paths) -> None:
    line = "# " + "x" * 98 + "\n"
    data = _write(isolated_home, "backend:\n  type: local\n" + line * 50_000)  # 5 MB of valid YAML
    started = time.monotonic()
    for args in (("config", "list"), ("config", "set", "llm.threads", "2")):
        r = run_cli(*args)
        assert r.returncode == 3 and "larger than 64 KB" in r.stderr
    assert time.monotonic() - started < 20  # (the bug: 79 s to list, 149 s to set)
    assert isolated_home.config_file.read_bytes() == data


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("llm.threads", "99999", "1-256"),
        ("llm.threads", "-1", "1-256"),
        ("llm.context_size", "99999999999", "512-1048576"),
        ("llm.context_size", "100", "512-1048576"),
        ("llm.base_url", "http://127.0.0.1:0", "port 0"),
        ("llm.base_url", "http://127.0.0.1:99999", "not a valid URL"),
        ("llm.base_url", "https://127.0.0.1:11434", "http://"),
        ("llm.base_url", "http://127.0.0.1:11434/api", "path"),
        ("llm.base_url", "http://user:pw@127.0.0.1:11434", "password"),
        ("llm.fallback_base_url", "http://192.168.1.5:11435", "loopback"),
        ("temporal.address", "localhost:70000", "1-65535"),
    ],
)
def test_values_out_of_bounds_are_refused_at_set(
    isolated_home: Paths, key: str, value: str, expected: str
) -> None:
    r = run_cli("config", "set", key, value)
    assert r.returncode == 3, r.stderr
    assert expected in r.stderr and "bug in Stigmer" not in r.stderr
    assert not isolated_home.config_file.exists() or value not in isolated_home.config_file.read_text()


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [("99999", "1-256"), ("2.7", "whole number"), ("true", "whole number"), ("0x10", "whole number")],
)
def test_values_out_of_bounds_or_loose_types_are_refused_at_load(
    isolated_home: Paths, yaml_value: str, expected: str
) -> None:
    data = _write(isolated_home, f"backend:\n  local:\n    llm:\n      threads: {yaml_value}\n")
    with pytest.raises(StigmerError) as e:
        store.load(isolated_home, {})
    assert e.value.code is ErrorCode.CONFIG_INVALID
    assert "llm.threads" in e.value.message and expected in e.value.message and "line 4" in e.value.message
    r = run_cli("config", "list")
    assert r.returncode == 3 and expected in r.stderr
    assert isolated_home.config_file.read_bytes() == data


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STIGMER_LLM_THREADS": "99999"}, "1-256"),
        ({"STIGMER_LLM_CONTEXT_SIZE": "99999999999"}, "512-1048576"),
        ({"STIGMER_LLM_BASE_URL": "http://127.0.0.1:0"}, "port 0"),
        ({"STIGMER_LLM_BASE_URL": "https://127.0.0.1:11434"}, "http://"),
        ({"STIGMER_LLM_PROVIDER": "llamacpp", "STIGMER_LLM_BASE_URL": "http://10.0.0.2:11435"}, "loopback"),
    ],
)
def test_values_out_of_bounds_in_environment(
    isolated_home: Paths, env: dict[str, str], expected: str
) -> None:
    r = run_cli("server", env=env, timeout=30)
    assert r.returncode == 3 and expected in r.stderr, r.stderr
    assert not isolated_home.pid_file("llm").exists()


def test_cross_key_rules_hold_at_set(isolated_home: Paths) -> None:
    assert run_cli("config", "set", "llm.provider", "llamacpp").returncode == 0
    r = run_cli("config", "set", "llm.base_url", "http://192.168.0.9:11435")
    assert r.returncode == 3 and "loopback" in r.stderr


def test_config_list_json_has_typed_values(isolated_home: Paths) -> None:
    store.set_value(isolated_home, "llm.threads", "2")
    store.set_value(isolated_home, "llm.origins", "https://app.example.com,http://*.lan")
    store.set_value(isolated_home, "llm.api_key", "sk-secret")
    rows = {row["key"]: row for row in json.loads(run_cli("config", "list", "--json").stdout)}
    assert rows["llm.threads"]["value"] == 2 and rows["llm.threads"]["source"] == "file"
    assert rows["llm.offline_fallback"]["value"] is True
    assert rows["llm.origins"]["value"] == ["https://app.example.com", "http://*.lan"]
    assert rows["llm.api_key"]["value"] == "********"
    assert store.load(isolated_home, {}).llm.origins == ("https://app.example.com", "http://*.lan")


def test_secret_in_a_readable_config_is_made_private(isolated_home: Paths) -> None:
    _write(isolated_home, 'backend:\n  local:\n    llm:\n      api_key: "sk-leaky"\n')
    os.chmod(isolated_home.config_file, 0o644)
    r = run_cli("config", "get", "llm.model")
    assert r.returncode == 0
    assert "readable by other users" in r.stderr and "600" in r.stderr and "sk-leaky" not in r.stderr
    assert stat.S_IMODE(isolated_home.config_file.stat().st_mode) == 0o600


def test_json_command_reports_failure_as_json_on_stderr(isolated_home: Paths) -> None:
    _write(isolated_home, "backend: [broken\n")
    r = run_cli("config", "list", "--json")
    assert r.returncode == 3 and r.stdout == ""
    err = json.loads(r.stderr)["error"]
    assert err["code"] == "config_malformed" and "Malformed config file" in err["message"] and err["hint"]

"""`stigmer server llm upgrade-runtime`: against the release stand-in, a good new version is switched to
(the running Local LLM restarted on it, the old folder removed only then); a new version whose runtime
exits at once is rolled back and the old one serves again."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stigmer.config import store as config_store
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import silent
from stigmer.install import installer
from stigmer.llm.ollama import install
from stigmer.llm.ollama.provider import OllamaProvider
from stigmer.llm.ollama.upgrade import current_folder, upgrade_runtime
from stigmer.net import http
from stigmer.paths import Paths
from stigmer.services.manager import Services
from tests.conftest import run_cli
from tests.doubles.archives import build_release, free_port
from tests.doubles.release_server import ReleaseServer

pytestmark = pytest.mark.usefixtures("stop_server")

PLATFORMS = ("linux-amd64", "linux-arm64")
# A runtime that cannot start: it says why on stderr and exits 1 before binding, as a broken build does.
BROKEN = b"#!/bin/sh\necho 'Error: llama runner process has terminated: exit status 2' >&2\nexit 1\n"


@pytest.fixture
def releases(tmp_path: Path) -> Iterator[ReleaseServer]:
    root = tmp_path / "releases"
    for version in ("0.33.0", "0.34.0"):
        build_release(root, version, platforms=PLATFORMS)
    build_release(root, "0.35.0", platforms=PLATFORMS, program=BROKEN)
    with ReleaseServer(root, latest="0.34.0") as srv:
        yield srv


@pytest.fixture
def env(releases: ReleaseServer) -> dict[str, str]:
    return {
        "STIGMER_LLM_PROVIDER": "ollama",
        "STIGMER_LLM_DOWNLOAD_URL": releases.url,
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_MODEL": "llama3.2",
    }


def settings(paths: Paths, env: dict[str, str]) -> Settings:
    return config_store.load(paths, env)


def install_first(paths: Paths, env: dict[str, str], version: str = "0.33.0") -> None:
    installer.install(install.release(env["STIGMER_LLM_DOWNLOAD_URL"], version), paths, silent)


def answering(provider: OllamaProvider) -> str:
    return str(http.get_json(provider.url("/api/version"), timeout=5)["version"])


def test_a_good_version_replaces_the_running_one(isolated_home: Paths, env: dict[str, str]) -> None:
    install_first(isolated_home, env)
    s = settings(isolated_home, env)
    runtime = OllamaProvider(s, isolated_home)
    runtime.start(silent)
    old_pid = Services(isolated_home).record("llm").pid  # type: ignore[union-attr]
    assert answering(runtime) == "0.33.0"
    root = install.runtime_root(isolated_home)

    result = upgrade_runtime(s, isolated_home, silent)  # latest: 0.34.0
    assert (result.previous, result.version, result.outcome, result.restarted) == (
        "0.33.0",
        "0.34.0",
        "upgraded",
        True,
    )
    assert current_folder(root) == "v0.34.0"
    assert result.removed == str(root / "v0.33.0") and not (root / "v0.33.0").exists()
    rec = Services(isolated_home).record("llm")
    assert rec is not None and rec.pid != old_pid and answering(runtime) == "0.34.0"
    assert (isolated_home.bin_dir / "ollama").resolve() == (root / "v0.34.0" / "bin" / "ollama").resolve()

    again = upgrade_runtime(s, isolated_home, silent, version="0.34.0")
    assert again.outcome == "current" and not again.restarted
    assert Services(isolated_home).record("llm").pid == rec.pid  # type: ignore[union-attr]


def test_a_version_that_exits_at_once_is_rolled_back_and_the_old_one_serves_again(
    isolated_home: Paths, env: dict[str, str]
) -> None:
    install_first(isolated_home, env, "0.34.0")
    s = settings(isolated_home, env)
    runtime = OllamaProvider(s, isolated_home)
    runtime.start(silent)
    root = install.runtime_root(isolated_home)

    with pytest.raises(StigmerError) as e:
        upgrade_runtime(s, isolated_home, silent, version="0.35.0")
    err = e.value
    assert err.code is ErrorCode.START_FAILED
    assert "0.35.0 failed its health check" in err.message
    assert "rolled back: version 0.34.0 is current again and serves again" in err.message
    assert "llama runner process has terminated" in err.hint  # the new runtime's own words, from its log
    assert current_folder(root) == "v0.34.0" and (root / "v0.34.0").is_dir()
    assert (root / "v0.35.0").is_dir()  # kept: a later try does not download it again
    assert runtime.healthy() and answering(runtime) == "0.34.0"


def test_a_runtime_not_running_is_checked_alone_on_a_free_port(
    isolated_home: Paths, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Any] = []  # the specs really started (a spy: the start itself is the real one)
    real_start = Services.start
    def spy(self: Services, spec: Any, *args: Any, **kwargs: Any) -> Any:
        started.append(spec)
        return real_start(self, spec, *args, **kwargs)

    monkeypatch.setattr(Services, "start", spy)
    install_first(isolated_home, env)
    s = settings(isolated_home, env)
    root = install.runtime_root(isolated_home)
    with pytest.raises(StigmerError) as e:
        upgrade_runtime(s, isolated_home, silent, version="0.35.0")
    assert "version 0.33.0 is current again" in e.value.message and "serves again" not in e.value.message
    assert current_folder(root) == "v0.33.0"
    assert (
        Services(isolated_home).record("llm") is None
        and Services(isolated_home).record("llm-upgrade-check") is None
    )

    result = upgrade_runtime(s, isolated_home, silent, version="0.34.0")
    assert result.outcome == "upgraded" and not result.restarted and current_folder(root) == "v0.34.0"
    assert not OllamaProvider(s, isolated_home).is_running()  # the check's runtime was stopped again
    assert Services(isolated_home).record("llm-upgrade-check") is None
    checks = [spec for spec in started if spec.name == "llm-upgrade-check"]
    assert checks and all(spec.sandbox is not None and spec.sandbox.name == "ollama" for spec in checks)


def test_upgrade_refuses_what_is_not_its_to_change(isolated_home: Paths, env: dict[str, str]) -> None:
    pinned = settings(isolated_home, {**env, "STIGMER_LLM_RUNTIME_VERSION": "0.33.0"})
    with pytest.raises(StigmerError) as e:
        upgrade_runtime(pinned, isolated_home, silent, version="0.34.0")
    assert (
        e.value.code is ErrorCode.CONFIG_INVALID
        and "stigmer config set llm.runtime_version 0.34.0" in e.value.hint
    )
    engine = settings(isolated_home, {**env, "STIGMER_LLM_PROVIDER": "llamacpp", "STIGMER_LLM_MODEL": ""})
    with pytest.raises(StigmerError) as e:
        upgrade_runtime(engine, isolated_home, silent)
    assert e.value.code is ErrorCode.UNSUPPORTED


def test_upgrade_through_the_cli(isolated_home: Paths, env: dict[str, str]) -> None:
    install_first(isolated_home, env)
    runtime = OllamaProvider(settings(isolated_home, env), isolated_home)
    runtime.start(silent)
    bad = run_cli("server", "llm", "upgrade-runtime", "0.35.0", env=env)
    assert bad.returncode == ErrorCode.START_FAILED.exit_code, bad.stdout
    assert "rolled back" in bad.stderr and answering(runtime) == "0.33.0"
    good = run_cli("server", "llm", "upgrade-runtime", env=env)
    assert good.returncode == 0, good.stderr
    assert "✓ Local LLM runtime upgraded from 0.33.0 to 0.34.0." in good.stdout
    assert "restarted on 0.34.0 and passed its health check" in good.stdout
    assert answering(runtime) == "0.34.0"
    status = json.loads(run_cli("doctor", "--json", env=env).stdout)
    assert status["runtime"]["source"] == "stigmer" and status["runtime"]["version"] == "0.34.0"
    assert status["runtime"]["serving"] == "0.34.0"
    assert os.path.realpath(status["runtime"]["path"]).endswith(os.path.join("v0.34.0", "bin", "ollama"))

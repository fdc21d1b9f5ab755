"""Every test runs with STIGMER_HOME and HOME in a temp dir: the real home directory is never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer.paths import Paths

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    home = tmp_path / "stigmer-home"
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    monkeypatch.setenv("STIGMER_HOME", str(home))
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.setenv("OLLAMA_MODELS", str(user_home / ".ollama" / "models"))
    monkeypatch.setenv("NO_COLOR", "1")
    for var in [v for v in os.environ if v.startswith("STIGMER_") and v != "STIGMER_HOME"]:
        monkeypatch.delenv(var)
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "TEMPORAL_SERVICE_ADDRESS", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # A server started by a test never takes the real ports (7233, 7234, 8233): free ones instead.
    from tests.doubles.archives import free_port

    monkeypatch.setenv("STIGMER_SERVER_PORT", str(free_port()))
    monkeypatch.setenv("STIGMER_TEMPORAL_ADDRESS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("STIGMER_TEMPORAL_UI_PORT", str(free_port()))
    monkeypatch.setenv("STIGMER_DAEMON_CHECK_INTERVAL", "0.25")
    # Nothing reaches the internet from a test: the real registry, release server and Hugging Face are
    # replaced by dead local addresses unless a test points them at its stand-in.
    monkeypatch.setenv("STIGMER_LLM_REGISTRY_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("STIGMER_LLM_DOWNLOAD_URL", f"http://127.0.0.1:{free_port()}/releases")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("STIGMER_LLM_UPDATE_CHECK", "false")  # tests of the check turn it on
    return Paths(home)


def stigmer_exe() -> list[str]:
    exe = shutil.which("stigmer")
    return [exe] if exe else [sys.executable, "-m", "stigmer"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, merged: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the installed `stigmer` command for real, in a subprocess, with the test's environment.

    merged=True interleaves stderr (progress, notices) into stdout (results) as a terminal shows them.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [*stigmer_exe(), *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli() -> object:
    return run_cli


@pytest.fixture
def stop_server(isolated_home: Paths) -> Iterator[None]:
    """Stops whatever a test started through the product (the daemon and every service, the LLM too),
    even when the test fails."""
    yield
    from stigmer.server.control import stop

    stop(isolated_home)

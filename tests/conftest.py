"""Every test runs with STIGMER_HOME and HOME in a temp dir: the real home directory is never touched."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stigmer.paths import Paths

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
# pytest-xdist workers for `-n auto` (pyproject.toml's addopts). The end-to-end tests spend most of their
# time waiting for subprocesses to start (Temporal, the API, the worker, the engine), so 3 workers pay off
# even on CI's 2 cores. Not more: every managed Temporal takes two of the 11 browser-blocked ports
# (server/api/temporal_ui.py), so at most 5 servers fit on a machine at once (a test may run two), and a
# 4th worker adds more CPU contention on 2 cores than it saves.
TEST_WORKERS = 3


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: no error where it is not installed
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own reading of it
    named = config.option.file_or_dir or []
    if named and all("::" in arg for arg in named):
        return 0  # single tests: run them here, without starting workers
    return TEST_WORKERS


# -- tests that run alone -----------------------------------------------------------------------------------
# @pytest.mark.alone: a test whose wall-clock bound is tight next to what it measures (a CLI that must
# answer in under a second, say). With pytest-xdist it runs while no other test of this run does: each test
# holds a shared lock on <basetemp>/room.lock, an `alone` test an exclusive one. Before taking the room a
# test passes the turnstile (turnstile.lock): an `alone` test keeps the turnstile until it is done, so the
# others cannot crowd it out, and new tests wait while the running ones end. The `alone` tests are moved to
# the end of the run, where they cost the least waiting.
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "alone: runs while no other test of this run does (pytest-xdist): a tight time bound"
    )


# tryfirst: before pytest-xdist's own, which reads the xdist_group marks added here
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (the same in every worker, as it requires): the `alone` tests go last; the tests
    of a module that has a fixture of its own set up once per module (a server, an engine) share a worker
    (an xdist_group), which then sets it up once rather than once per worker."""
    if not hasattr(config, "workerinput"):
        return
    items.sort(key=lambda item: item.get_closest_marker("alone") is not None)  # the others keep their order
    for item in items:
        if item.get_closest_marker("alone") or item.get_closest_marker("xdist_group"):
            continue
        info = getattr(item, "_fixtureinfo", None)
        defs = [d for ds in (info.name2fixturedefs.values() if info else []) for d in ds]
        if any(d.scope != "function" and d.baseid.endswith(".py") for d in defs):  # defined in a test module
            item.add_marker(pytest.mark.xdist_group(f"module:{item.nodeid.split('::')[0]}"))


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # and the lock with it


# tryfirst: outside pytest-timeout's timer, which is for the test, not for its wait here
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    if not hasattr(item.config, "workerinput") or sys.platform == "win32":
        return (yield)
    import fcntl

    run = Path(item.config.option.basetemp).parent  # the run's folder: each worker's is inside it
    alone = item.get_closest_marker("alone") is not None
    with contextlib.ExitStack() as held:
        with _flock(run / "turnstile.lock", fcntl.LOCK_EX):
            held.enter_context(_flock(run / "room.lock", fcntl.LOCK_EX if alone else fcntl.LOCK_SH))
            if alone:
                return (yield)  # with the turnstile kept
        return (yield)


def isolated_env(root: Path) -> dict[str, str]:
    """The environment of a test's own Stigmer: its home and user home under `root`; free ports, never the
    real ones (7233, 7234, 8233); nothing that reaches the internet: the real registry, release server and
    Hugging Face are dead local addresses unless a test points them at its stand-in."""
    from tests.doubles.archives import free_port

    user_home = root / "user-home"
    user_home.mkdir(exist_ok=True)
    return {
        "STIGMER_HOME": str(root / "stigmer-home"),
        "HOME": str(user_home),
        "OLLAMA_MODELS": str(user_home / ".ollama" / "models"),
        "NO_COLOR": "1",
        "STIGMER_SERVER_PORT": str(free_port()),
        "STIGMER_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "STIGMER_TEMPORAL_UI_PORT": str(free_port()),
        "STIGMER_DAEMON_CHECK_INTERVAL": "0.25",
        "STIGMER_LLM_REGISTRY_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_DOWNLOAD_URL": f"http://127.0.0.1:{free_port()}/releases",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_UPDATE_CHECK": "false",  # tests of the check turn it on
    }


KEY_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "TEMPORAL_SERVICE_ADDRESS", "HF_TOKEN")


def module_env(root: Path) -> dict[str, str]:
    """For a server a test module starts once (run_cli(env=...)): this process's environment without
    Stigmer's settings, proxies or keys, plus isolated_env(root)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STIGMER_") and k not in PROXY_VARS and k not in KEY_VARS
    }
    return {**env, **isolated_env(root)}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    for var in [v for v in os.environ if v.startswith("STIGMER_")]:
        monkeypatch.delenv(var)
    for var in (*PROXY_VARS, *KEY_VARS):
        monkeypatch.delenv(var, raising=False)
    for key, value in isolated_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    return Paths(tmp_path / "stigmer-home")


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


# -- processes left running -------------------------------------------------------------------------------
LEFT_RUNNING = pytest.StashKey[list[str]]()


def _started_by_this_run(basetemp: Path) -> list[psutil.Process]:
    """Live processes that this run's tests started: their command line, or the HOME or STIGMER_HOME they
    were started with, is under the run's temp folder (every test's HOME is, isolated_home). Not another
    pytest run's on the same machine, nor a process that a test's fixture adopted from elsewhere."""
    root = str(basetemp)
    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.parents())}  # pytest and what started it (--basetemp is in its argv)
    found = []
    for p in psutil.process_iter(["cmdline", "environ", "status"]):
        if p.pid in ours or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        env = p.info["environ"] or {}
        named = [*(p.info["cmdline"] or []), env.get("HOME", ""), env.get("STIGMER_HOME", "")]
        if any(s == root or root + os.sep in s for s in named):  # the folder or a path inside it
            found.append(p)
    return found


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Once every test is done (in the controller, with pytest-xdist): a process a test started and did not
    stop is reported, then stopped, so that it cannot hold ports or files for the next run."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if hasattr(session.config, "workerinput") or factory is None:
        return
    basetemp = factory.getbasetemp()
    deadline = time.monotonic() + 10  # one that is stopping as the last test ends
    while (left := _started_by_this_run(basetemp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"pid {p.pid}: {' '.join(p.cmdline())[:300]}")
            p.terminate()
    _gone, alive = psutil.wait_procs(left, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    session.config.stash[LEFT_RUNNING] = described


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    left = config.stash.get(LEFT_RUNNING, [])
    if left:
        terminalreporter.section("processes left running by tests (now stopped)", sep="-", yellow=True)
        for line in left:
            terminalreporter.line(line)

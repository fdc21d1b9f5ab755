"""Download, verify and install a release into a versioned folder, switched to atomically.

runtime/<name>/<version>/   one unpacked release each
runtime/<name>/current  ->  <version>       (symlink, replaced atomically; a pointer file on Windows,
                                             current.txt, where symlinks need privileges)
bin/<link>              ->  ../runtime/<name>/current/<path of the executable>   (not on Windows)

The checksum file is fetched first and an asset without a checksum is never downloaded. For "latest" the
version is read from the redirect, so the checksum and the archive come from one release. A failure at
any point leaves the previous version as it was: the new one is unpacked into a staging folder, renamed
into place, and only then does `current` move.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from stigmer import archive
from stigmer.errors import ErrorCode, IntegrityError, StigmerError
from stigmer.events import INSTALLING, Event, Reporter
from stigmer.fsutil import atomic_write
from stigmer.install.platform import Platform
from stigmer.install.release import (
    LATEST,
    Release,
    is_archive,
    latest_url,
    parse_checksums,
    release_url,
    version_folder,
    version_from_url,
)
from stigmer.net import download as dl
from stigmer.net import failures, http
from stigmer.net.fetch import fetch_small
from stigmer.paths import Paths

log = logging.getLogger(__name__)

MAX_CHECKSUMS = 1024 * 1024  # a checksum file lists a few dozen assets; anything longer is cut here
POINTER = "current.txt"


def runtime_root(release: Release, paths: Paths) -> Path:
    return paths.runtime_dir / release.name


def installed_binary(release: Release, paths: Paths, plat: Platform) -> Path | None:
    """The executable of the current version, when one is installed (uses name, binary and link only)."""
    root = runtime_root(release, paths)
    if plat.system == "windows":
        folder = _read_pointer(root)
        exe = release.binary(root / folder, plat) if folder else None
        return exe if exe is not None and exe.exists() else None
    link = paths.bin_dir / release.link
    return link if link.exists() else None  # exists() follows the links to the real file


def installed_version(release: Release, paths: Paths) -> str | None:
    root = runtime_root(release, paths)
    with contextlib.suppress(OSError):
        return os.readlink(root / "current").removeprefix("v")
    folder = _read_pointer(root)
    return folder.removeprefix("v") if folder else None


def _read_pointer(root: Path) -> str | None:
    try:
        folder = (root / POINTER).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return folder if folder and Path(folder).name == folder else None  # one folder name, never a path


def install(release: Release, paths: Paths, report: Reporter, *, plat: Platform | None = None) -> Path:
    """Install release for plat (this machine by default) unless its version is already there; switch to
    it and return the path of its executable."""
    from filelock import FileLock

    plat = plat or Platform.current()
    root = runtime_root(release, paths)
    paths.ensure(root, paths.downloads_dir, paths.bin_dir)
    with FileLock(str(root / ".install.lock")):
        return _install_locked(release, paths, report, plat, root)


def _install_locked(release: Release, paths: Paths, report: Reporter, plat: Platform, root: Path) -> Path:
    report(Event(INSTALLING, f"Checking the {release.what} release"))
    version, sums_text, sums_url = _checksums(release)
    asset = release.asset(version, plat)
    expected = parse_checksums(sums_text).get(asset)
    if expected is None:
        raise IntegrityError(
            f"The release has no checksum for {asset}: refusing to install an unverified {release.what}.",
            hint=failures.join(
                f"Checked {http.redact(sums_url)}. Pin a version whose release publishes one, or use a "
                "mirror that serves the release's checksum file.",
                release.hint,
            ),
            code=ErrorCode.CHECKSUM_MISSING,
        )
    folder = version_folder(version, expected)
    target = root / folder
    if not release.binary(target, plat).exists():
        key = release.name

        def progress(done: int, total: int | None) -> None:
            report(Event(INSTALLING, f"Downloading {release.what}", key=key, done=done, total=total))

        got = dl.download(
            release_url(release.base_url, version, asset),
            paths.downloads_dir / f"{expected[:12]}-{asset}",
            sha256=expected,
            what=release.what,
            on_progress=progress,
            hint=release.hint,
        )
        report(Event(INSTALLING, f"Unpacking {release.what}"))
        _unpack(release, got.path, asset, target, plat)
        got.path.unlink(missing_ok=True)
    switch(release, paths, folder, plat)
    found = installed_binary(release, paths, plat)
    if found is None:
        raise StigmerError(
            f"{release.what} was installed but {release.binary(target, plat)} is missing.",
            code=ErrorCode.INSTALL_FAILED,
            hint=f"Remove {target} and run the command again.",
        )
    return found


def _checksums(release: Release) -> tuple[str, str, str]:
    """(version, text of the checksum file, its URL after redirects), for the version the release names."""
    version = release.version
    if version == LATEST and release.checksums_name_has_version:
        version = _latest_version(release)
    url = release_url(release.base_url, version, release.checksums_file(version))
    try:
        fetched = fetch_small(url, what=release.what, limit=MAX_CHECKSUMS, hint=release.hint)
    except failures.HttpStatusError as e:
        if e.status != 404:
            raise
        raise IntegrityError(
            f"The release has no {release.checksums_file(version)} ({http.redact(url)} answered 404): "
            f"refusing to install an unverified {release.what}.",
            hint=release.hint,
            code=ErrorCode.CHECKSUM_MISSING,
        ) from None
    if version == LATEST:
        # Pin the asset to the release the checksums came from, so that both are of one release.
        version = version_from_url(fetched.final_url) or LATEST
    return version, fetched.data.decode("utf-8", "replace"), fetched.final_url


def _latest_version(release: Release) -> str:
    url = latest_url(release.base_url)
    # Nothing of the page is needed: only where the redirect led.
    final = fetch_small(url, what=release.what, limit=0, hint=release.hint).final_url
    version = version_from_url(final)
    if version is None:
        raise StigmerError(
            f"Could not tell the newest version of {release.what}: {http.redact(url)} led to "
            f"{http.redact(final)}, which names none.",
            hint=failures.join("Pin a version instead of latest.", release.hint),
            code=ErrorCode.INSTALL_FAILED,
        )
    return version


def _unpack(release: Release, archive_path: Path, asset: str, target: Path, plat: Platform) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        if is_archive(asset):
            archive.extract(archive_path, staging)
        else:  # a bare executable (early Ollama releases): laid out where the archives put it
            exe = release.binary(staging, plat)
            exe.parent.mkdir(parents=True, exist_ok=True)
            archive_path.replace(exe)
            exe.chmod(0o755)
        if not release.binary(staging, plat).exists():
            raise StigmerError(
                f"The downloaded {asset} does not contain the executable of {release.what}.",
                hint=failures.join("Nothing was installed.", release.hint),
                code=ErrorCode.INSTALL_FAILED,
            )
        if target.exists():  # a folder left by an interrupted earlier attempt without the executable
            shutil.rmtree(target)
        os.replace(staging, target)
    except StigmerError as e:
        if e.code in (ErrorCode.UNSAFE_ARCHIVE, ErrorCode.ARCHIVE_DAMAGED):
            e.hint = failures.join(e.hint, release.hint)
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def switch(release: Release, paths: Paths, folder: str, plat: Platform) -> None:
    """Point `current` at folder atomically, and make sure bin/<link> leads through it."""
    root = runtime_root(release, paths)
    if plat.system == "windows" or sys.platform == "win32":
        # Symlinks need privileges on Windows: a pointer file, replaced atomically, is read instead.
        atomic_write(root / POINTER, folder.encode())
        return
    tmp = root / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(folder, tmp)
    os.replace(tmp, root / "current")
    link = paths.bin_dir / release.link
    rel = os.path.relpath(release.binary(root / "current", plat), paths.bin_dir)
    if not (link.is_symlink() and os.readlink(link) == rel):
        tmp_link = paths.bin_dir / f".{release.link}-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(rel, tmp_link)
        os.replace(tmp_link, link)

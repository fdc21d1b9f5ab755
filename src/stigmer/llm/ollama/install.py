"""Download, verify and install the Local LLM runtime into a versioned folder, switched atomically.

runtime/ollama/<version>/   one unpacked release each
runtime/ollama/current  ->  <version>      (symlink, replaced atomically)
bin/ollama              ->  ../runtime/ollama/current/bin/ollama

A failure at any point leaves the previous runtime as it was: the new one is unpacked into a staging
folder, renamed into place, and only then does `current` move.
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
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.events import INSTALLING, Event, Reporter
from stigmer.llm.ollama import assets
from stigmer.llm.ollama.assets import Platform
from stigmer.net import download as dl
from stigmer.net import http
from stigmer.paths import Paths

log = logging.getLogger(__name__)

RUNTIME = "ollama"


def runtime_root(paths: Paths) -> Path:
    return paths.runtime_dir / RUNTIME


def installed_binary(paths: Paths, plat: Platform) -> Path | None:
    """bin/ollama when it leads to an installed runtime."""
    link = paths.bin_dir / ("ollama.exe" if plat.system == "windows" else "ollama")
    current = runtime_root(paths) / "current"
    if plat.system == "windows":
        pointer = current.with_suffix(".txt")
        if pointer.exists():
            exe = assets.binary_in(runtime_root(paths) / pointer.read_text().strip(), plat)
            return exe if exe.exists() else None
        return None
    return link if link.exists() else None  # exists() follows the links to the real file


def installed_version(paths: Paths) -> str | None:
    current = runtime_root(paths) / "current"
    with contextlib.suppress(OSError):
        return os.readlink(current).removeprefix("v")
    with contextlib.suppress(OSError):
        return current.with_suffix(".txt").read_text().strip().removeprefix("v")
    return None


def install(settings: Settings, paths: Paths, report: Reporter, plat: Platform | None = None) -> Path:
    from filelock import FileLock

    plat = plat or Platform.current()
    root = runtime_root(paths)
    paths.ensure(root, paths.downloads_dir, paths.bin_dir)
    with FileLock(str(root / ".install.lock")):
        return _install_locked(settings, paths, report, plat, root)


def _install_locked(settings: Settings, paths: Paths, report: Reporter, plat: Platform, root: Path) -> Path:
    download_url = settings.llm.download_url
    wanted = settings.llm.runtime_version
    asset = assets.asset_name(wanted, plat)
    report(Event(INSTALLING, "Checking the Local LLM release"))
    sums_url = assets.release_url(download_url, wanted, "sha256sum.txt")
    sums_text, sums_final_url = _fetch_text(sums_url)
    # For "latest", pin the asset to the release the checksums came from, so both are of one release.
    version = wanted if wanted != "latest" else (assets.version_from_url(sums_final_url) or "latest")
    if version != wanted:
        asset = assets.asset_name(version, plat)
    expected = assets.parse_checksums(sums_text).get(asset)
    if expected is None:
        raise IntegrityError(
            f"The release has no checksum for {asset}: refusing to install an unverified runtime.",
            hint=f"Checked {http.redact(sums_final_url)}. Pin a release that publishes one "
            "(stigmer config set llm.runtime_version X.Y.Z) or fix your mirror.",
            code=ErrorCode.CHECKSUM_MISSING,
        )
    folder = f"v{version}" if version != "latest" else f"sha256-{expected[:12]}"
    target = root / folder
    binary = assets.binary_in(target, plat)
    if not binary.exists():
        archive_path = paths.downloads_dir / f"{expected[:12]}-{asset}"
        url = assets.release_url(download_url, version, asset)
        what = "local LLM"

        def progress(done: int, total: int | None) -> None:
            report(Event(INSTALLING, "Downloading local LLM", key="runtime", done=done, total=total))

        got = dl.download(url, archive_path, sha256=expected, what=what, on_progress=progress)
        report(Event(INSTALLING, "Unpacking local LLM"))
        _unpack(got.path, asset, target, root, plat)
        got.path.unlink(missing_ok=True)
    _switch(paths, root, folder, plat)
    found = installed_binary(paths, plat)
    if found is None:
        raise StigmerError(
            f"The runtime was installed but {binary} is missing.",
            code=ErrorCode.INSTALL_FAILED,
            hint=f"Remove {target} and run the command again.",
        )
    return found


def _fetch_text(url: str) -> tuple[str, str]:
    import urllib.error

    try:
        with http.request(url) as resp:
            return resp.read(1024 * 1024).decode("utf-8", "replace"), resp.geturl()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise IntegrityError(
                f"The release has no sha256sum.txt ({http.redact(url)} answered 404): refusing to install an "
                "unverified runtime.",
                hint="Check llm.runtime_version and llm.download_url (stigmer config list).",
                code=ErrorCode.CHECKSUM_MISSING,
            ) from e
        raise StigmerError(
            f"Failed to download local LLM: {http.redact(url)} answered HTTP {e.code}.",
            code=ErrorCode.DOWNLOAD_HTTP_ERROR,
            hint="Try again later.",
        ) from e
    except (urllib.error.URLError, OSError) as e:
        raise NetworkUnreachable(
            f"Failed to download local LLM: {http.describe(e)}", code=ErrorCode.NETWORK_UNREACHABLE, hint=""
        ) from e


def _unpack(archive_path: Path, asset: str, target: Path, root: Path, plat: Platform) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        if assets.is_archive(asset):
            archive.extract(archive_path, staging)
        else:
            archive.install_bare_binary(archive_path, staging, "ollama")
        if not assets.binary_in(staging, plat).exists():
            raise StigmerError(
                f"The downloaded {asset} does not contain the runtime executable.",
                hint="Nothing was installed. Check your mirror (llm.download_url).",
                code=ErrorCode.INSTALL_FAILED,
            )
        if target.exists():  # a folder left by an interrupted earlier attempt without the binary
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _switch(paths: Paths, root: Path, folder: str, plat: Platform) -> None:
    """Point `current` at folder atomically, and make sure bin/ollama leads through it."""
    if plat.system == "windows" or sys.platform == "win32":
        # Symlinks need privileges on Windows: a pointer file, replaced atomically, is read instead.
        from stigmer.fsutil import atomic_write

        atomic_write((root / "current").with_suffix(".txt"), folder.encode())
        return
    tmp = root / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(folder, tmp)
    os.replace(tmp, root / "current")
    link = paths.bin_dir / "ollama"
    rel = os.path.relpath(assets.binary_in(root / "current", plat), paths.bin_dir)
    if not (link.is_symlink() and os.readlink(link) == rel):
        tmp_link = paths.bin_dir / f".ollama-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(rel, tmp_link)
        os.replace(tmp_link, link)

"""What a GitHub-style release is: where its files are, which one fits a platform, how it is checked.

Layout (GitHub's, and any mirror of it):
  {base_url}/download/v{version}/{asset}      a file of one release
  {base_url}/latest/download/{asset}          302 to the same file of the newest release
  {base_url}/latest                           302 to {base_url}/tag/v{version}

Everything here is pure; installer.py does the downloading and unpacking.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stigmer.install.platform import Platform

LATEST = "latest"
ARCHIVE_SUFFIXES = (".tar.zst", ".tgz", ".tar.gz", ".zip")


@dataclass(frozen=True)
class Release:
    """One program's releases, as the installer needs to know them."""

    name: str  # its folder under runtime/ (runtime/<name>/<version>/)
    what: str  # how messages name it: "Downloading {what}", "Failed to download {what}: ..."
    base_url: str  # the release layout above, e.g. https://github.com/ollama/ollama/releases
    version: str  # "latest" or X.Y.Z
    asset: Callable[[str, Platform], str]  # (version or "latest", platform) -> file name of the asset
    checksums: str  # name of the release's sha256sum-format file; "{version}" is replaced by the version
    binary: Callable[[Path, Platform], Path]  # (unpacked release folder, platform) -> its executable
    link: str  # bin/<link> leads to the executable of the current version (not on Windows)
    hint: str = ""  # advice for failures a setting or a mirror can cause, e.g. which setting to check

    def checksums_file(self, version: str) -> str:
        return self.checksums.replace("{version}", version)

    @property
    def checksums_name_has_version(self) -> bool:
        """A versioned checksum file has no /latest/download/ address: the version is resolved first."""
        return "{version}" in self.checksums


def release_url(base_url: str, version: str, asset: str) -> str:
    base = base_url.rstrip("/")
    if version == LATEST:
        return f"{base}/latest/download/{asset}"
    return f"{base}/download/v{version}/{asset}"


def latest_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/latest"


def version_from_url(url: str) -> str | None:
    """The version a "latest" redirect led to: /download/vA.B.C/X (a file) or /tag/vA.B.C (the release)."""
    m = re.search(r"/(?:download|tag)/v(\d+\.\d+\.\d+[^/]*)(?:/|$)", url.split("?", 1)[0])
    return m.group(1) if m else None


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def parse_checksums(text: str) -> dict[str, str]:
    """A sha256sum file (GNU format; `*` binary marker and `./` prefix allowed) -> {asset: hex}."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            continue
        name = parts[1].lstrip("*").strip().removeprefix("./")
        sums[name] = parts[0].lower()
    return sums


def is_archive(asset: str) -> bool:
    return asset.endswith(ARCHIVE_SUFFIXES)


def version_folder(version: str, sha256: str) -> str:
    """The folder of one installed release: v<version>, or the archive's digest when no version is known."""
    return f"v{version}" if version != LATEST else f"sha256-{sha256[:12]}"

"""Which release asset to download for this OS, CPU and version, and where it lives (pure functions)."""

from __future__ import annotations

import platform as _platform
import re
from dataclasses import dataclass
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError

FIRST_ZST = (0, 14, 0)  # .tar.zst from v0.14.0; .tgz before
FIRST_TGZ = (0, 3, 7)  # bare binaries before v0.3.7


@dataclass(frozen=True)
class Platform:
    system: str  # linux | darwin | windows
    arch: str  # amd64 | arm64

    @classmethod
    def current(cls) -> Platform:
        return cls.of(_platform.system(), _platform.machine())

    @classmethod
    def of(cls, system: str, machine: str) -> Platform:
        sysname = system.lower()
        if sysname not in ("linux", "darwin", "windows"):
            raise StigmerError(
                f"The Local LLM runtime is not available for {system}.",
                hint="Use the built-in engine instead: stigmer config set llm.provider llamacpp",
                code=ErrorCode.UNSUPPORTED,
            )
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
            machine.lower()
        )
        if arch is None:
            raise StigmerError(
                f"The Local LLM runtime is not available for {machine} CPUs.",
                hint="Use the built-in engine instead: stigmer config set llm.provider llamacpp",
                code=ErrorCode.UNSUPPORTED,
            )
        return cls(sysname, arch)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def asset_name(version: str, plat: Platform) -> str:
    """The asset for a version ("latest" means the current layout)."""
    if plat.system == "darwin":
        return "ollama-darwin.tgz" if _at_least(version, FIRST_TGZ) else "ollama-darwin"
    if plat.system == "windows":
        return f"ollama-windows-{plat.arch}.zip"
    if _at_least(version, FIRST_ZST):
        return f"ollama-linux-{plat.arch}.tar.zst"
    if _at_least(version, FIRST_TGZ):
        return f"ollama-linux-{plat.arch}.tgz"
    return f"ollama-linux-{plat.arch}"


def _at_least(version: str, floor: tuple[int, int, int]) -> bool:
    return version == "latest" or version_tuple(version) >= floor


def release_url(download_url: str, version: str, asset: str) -> str:
    base = download_url.rstrip("/")
    if version == "latest":
        return f"{base}/latest/download/{asset}"
    return f"{base}/download/v{version}/{asset}"


def version_from_url(url: str) -> str | None:
    """GitHub answers /latest/download/X with a redirect to /download/vA.B.C/X: read the version there."""
    m = re.search(r"/download/v(\d+\.\d+\.\d+[^/]*)/", url)
    return m.group(1) if m else None


def parse_checksums(text: str) -> dict[str, str]:
    """sha256sum.txt (GNU format, `./` prefix) -> {asset: hex}."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            continue
        name = parts[1].lstrip("*").strip().removeprefix("./")
        sums[name] = parts[0].lower()
    return sums


def binary_in(install_dir: Path, plat: Platform) -> Path:
    """Where the executable sits inside an unpacked release."""
    if plat.system == "windows":
        return install_dir / "ollama.exe"
    if plat.system == "darwin":
        return install_dir / "ollama"
    return install_dir / "bin" / "ollama"


def is_archive(asset: str) -> bool:
    return asset.endswith((".tar.zst", ".tgz", ".zip"))

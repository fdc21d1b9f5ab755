"""Which Ollama release asset fits an OS, CPU and version, and where its executable is (pure functions).

The download, check and install are the generic installer's (stigmer.install); this is Ollama's table.
"""

from __future__ import annotations

from pathlib import Path

from stigmer.install import platform
from stigmer.install.release import LATEST, version_tuple

FIRST_ZST = (0, 14, 0)  # .tar.zst from v0.14.0; .tgz before
FIRST_TGZ = (0, 3, 7)  # bare binaries before v0.3.7
CHECKSUMS = "sha256sum.txt"  # one name for every version, so "latest" can be asked for directly


class Platform(platform.Platform):
    """This machine's OS and CPU, reported as the Local LLM runtime's when it has no release for them."""

    product = "The Local LLM runtime"
    instead = "Use the built-in engine instead: stigmer config set llm.provider llamacpp"


def asset_name(version: str, plat: platform.Platform) -> str:
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
    return version == LATEST or version_tuple(version) >= floor


def binary_in(install_dir: Path, plat: platform.Platform) -> Path:
    """Where the executable sits inside an unpacked release."""
    if plat.system == "windows":
        return install_dir / "ollama.exe"
    if plat.system == "darwin":
        return install_dir / "ollama"
    return install_dir / "bin" / "ollama"

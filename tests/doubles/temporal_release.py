"""Builders of fake Temporal CLI release folders (`root/v{version}/{asset}` + the checksum file).

Laid out as github.com/temporalio/cli/releases is: `temporal_cli_{v}_{os}_{arch}.zip` on Windows and
`.tar.gz` elsewhere, the executable at the archive root, and `temporal_cli_{v}_checksums.txt` in
sha256sum format without the `./` prefix (goreleaser's). The executable is a small Python script, so
an unpacked release really runs (`temporal --version`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.doubles.archives import Member, _tamper, sha256_file, write_archive

DEFAULT_PLATFORMS: tuple[str, ...] = ("windows-amd64",)


def checksums_name(version: str) -> str:
    return f"temporal_cli_{version}_checksums.txt"


def asset_name(platform: str, version: str) -> str:
    system, arch = platform.split("-", 1)
    return f"temporal_cli_{version}_{system}_{arch}.{'zip' if system == 'windows' else 'tar.gz'}"


def temporal_program(version: str, python: str = sys.executable) -> bytes:
    """A stand-in `temporal` answering `--version` as the real one does."""
    return (
        f"#!{python}\nimport sys\n"
        f"if sys.argv[1:] == ['--version']:\n    print('temporal version {version} (Server 1.27.1, UI 2.36.0)')\n"
    ).encode()


def build_temporal_release(
    root: Path,
    version: str,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    tamper: Iterable[str] = frozenset(),
    omit_checksum: Iterable[str] = frozenset(),
) -> dict[str, Path]:
    """Write `root/v{version}/` with one archive per platform and the checksum file.

    Returns {asset name: path} plus {checksums_name(version): path}. `tamper`: assets altered after
    their checksum was taken; `omit_checksum`: assets left out of the checksum file.
    """
    release = Path(root) / f"v{version}"
    release.mkdir(parents=True, exist_ok=True)
    assets: dict[str, Path] = {}
    for platform in platforms:
        exe = "temporal.exe" if platform.startswith("windows-") else "temporal"
        members = [Member(exe, temporal_program(version), 0o755), Member("LICENSE", b"MIT License\n")]
        name = asset_name(platform, version)
        assets[name] = write_archive(release / name, members)
    unknown = (set(tamper) | set(omit_checksum)) - set(assets)
    if unknown:
        raise ValueError(f"not assets of this release: {sorted(unknown)}")
    listed = sorted(a for a in assets if a not in set(omit_checksum))
    sums = release / checksums_name(version)
    sums.write_text("".join(f"{sha256_file(release / a)}  {a}\n" for a in listed), encoding="utf-8")
    for name in tamper:
        _tamper(assets[name])
    return {**assets, sums.name: sums}

"""The Hugging Face cache, read through huggingface_hub's own functions; no request is ever made here.

The layout (models--ORG--REPO/{refs,snapshots,blobs}) is huggingface_hub's business: we find files with
try_to_load_from_cache, scan_cache_dir and hf_hub_download(local_files_only=True). Only which folder is
the cache is decided here, at each call (see cache_dir).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REVISION = "main"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The hub cache the environment names now.

    huggingface_hub computes its cache path once, at import (constants.HF_HUB_CACHE); a process whose
    environment changed since (tests, an embedding application) would read a stale folder there. The
    variables it reads are read again here, and its own default serves when none is set.
    """
    env = os.environ if environ is None else environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return _expand(env[var])
    if env.get("HF_HOME"):
        return _expand(env["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _expand(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def blob_name(pointer: Path) -> str:
    """The name of the blob a snapshot entry points at: the Hub's ETag, i.e. the sha256 of an LFS file.

    Only the first link is followed: with huggingface_hub's shared store the blob may itself link on to
    a file named by another hash.
    """
    if pointer.is_symlink():
        return Path(os.readlink(pointer)).name
    return pointer.name


def cached_sha256(repo: str, filename: str, cache: Path) -> str | None:
    """The ETag (sha256 for LFS files) of filename as cached for `main`; None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=REVISION)
    return blob_name(Path(found)) if isinstance(found, str) else None


@dataclass(frozen=True)
class CachedFile:
    path: str  # relative to the snapshot, '/'-separated
    size: int
    blob: str  # see blob_name


@dataclass(frozen=True)
class CachedSnapshot:
    repo_id: str  # spelt as in the cache, which may differ in case from the name asked for
    revision: str  # what hf_hub_download finds it by: "main" when refs/main points at it, else the commit
    files: tuple[CachedFile, ...]


def cached_snapshot(repo: str, cache: Path) -> tuple[CachedSnapshot | None, bool]:
    """The cached snapshot of a model repo: the one `main` points at, else the newest one.

    Repo ids are case-insensitive on the Hub, so a cache written under another spelling counts. Returns
    (snapshot or None, whether the repo's cache folder was found damaged).
    """
    from huggingface_hub import scan_cache_dir

    if not cache.is_dir():
        return None, False
    info = scan_cache_dir(cache)
    folder = "models--" + repo.replace("/", "--")
    damaged = any(folder.lower() in str(w).lower() for w in info.warnings)
    repos = [r for r in info.repos if r.repo_type == "model" and r.repo_id.lower() == repo.lower()]
    if not repos:
        return None, damaged
    found = next((r for r in repos if r.repo_id == repo), repos[0])
    revisions = sorted(found.revisions, key=lambda r: (REVISION in r.refs, r.last_modified))
    if not revisions:
        return None, damaged
    chosen = revisions[-1]
    files = tuple(
        CachedFile(f.file_path.relative_to(chosen.snapshot_path).as_posix(), f.size_on_disk, f.blob_path.name)
        for f in sorted(chosen.files, key=lambda f: str(f.file_path))
    )
    revision = REVISION if REVISION in chosen.refs else chosen.commit_hash
    return CachedSnapshot(found.repo_id, revision, files), damaged


def cached_file(snapshot: CachedSnapshot, filename: str, cache: Path) -> Path:
    """The path of a file of a cached snapshot, as huggingface_hub resolves it without the network.

    Raises huggingface_hub's LocalEntryNotFoundError when it is gone meanwhile.
    """
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            snapshot.repo_id,
            filename,
            revision=snapshot.revision,
            cache_dir=str(cache),
            local_files_only=True,
        )
    )

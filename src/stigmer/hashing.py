"""sha256 of files on disk: the one reader behind every check of a download, a model or a cache entry."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

# Large reads into one reused buffer: at 8 MiB the hash, not Python's per-call overhead, sets the speed.
BLOCK = 8 * 1024 * 1024

HashProgress = Callable[[int, int | None], None]  # (bytes hashed, bytes to hash or None when unknown)


def sha256_hasher(
    path: Path, *, upto: int | None = None, on_progress: HashProgress | None = None
) -> hashlib._Hash:
    """A sha256 object fed with the first `upto` bytes of path (the whole file when None).

    Returned unfinished so that a resumed download can go on feeding it the bytes that follow. A file
    shorter than `upto` is hashed as far as it goes; the caller's size or digest check then fails.
    on_progress(done, total) is called after every block.
    """
    h = hashlib.sha256()
    total = upto if upto is not None else _size(path)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    done = 0
    with path.open("rb", buffering=0) as f:
        while upto is None or done < upto:
            n = f.readinto(view if upto is None else view[: min(BLOCK, upto - done)])
            if not n:
                break
            h.update(view[:n])
            done += n
            if on_progress is not None:
                on_progress(done, total)
    return h


def sha256_file(path: Path, *, upto: int | None = None, on_progress: HashProgress | None = None) -> str:
    """The hex sha256 of path (of its first `upto` bytes when given)."""
    return sha256_hasher(path, upto=upto, on_progress=on_progress).hexdigest()


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None  # open() below reports the real problem

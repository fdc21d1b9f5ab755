"""File writes that never leave a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PRIVATE_FILE = 0o600  # what we write under STIGMER_HOME is the user's alone (keys, tokens, logs)


def atomic_write(path: Path, data: bytes, *, mode: int = PRIVATE_FILE) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode) if hasattr(os, "fchmod") else None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


TAIL_BLOCK = 64 * 1024


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last `lines` lines of a (log) file, read backwards block by block; none when it does not exist."""
    if lines <= 0:
        return []
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            data = b""
            while end > 0 and data.count(b"\n") <= lines:
                start = max(0, end - TAIL_BLOCK)
                f.seek(start)
                data = f.read(end - start) + data
                end = start
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def free_bytes(folder: Path) -> int:
    """Free space on the disk holding folder (or its nearest existing parent)."""
    import shutil

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free

"""One view over the services' logs: the last lines of each, tagged with its component, and a follow
that interleaves new lines from all of them as they are written (surviving rotation)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from stigmer.fsutil import tail
from stigmer.paths import Paths

COMPONENTS = ("llm", "temporal", "agent-runner", "server", "daemon")
FOLLOW_EVERY = 0.2


def last_lines(paths: Paths, components: Sequence[str], n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for c in components:
        out += [(c, line) for line in tail(paths.log_file(c), n)]
    return out


def follow(
    paths: Paths, components: Sequence[str], *, every: float = FOLLOW_EVERY
) -> Iterator[tuple[str, str]]:
    """New lines as they come, from the end of each log (forever; the caller stops on Ctrl-C)."""
    files: dict[str, tuple[Path, int, int]] = {}  # component -> (path, inode, offset)
    for c in components:
        path = paths.log_file(c)
        try:
            st = path.stat()
            files[c] = (path, st.st_ino, st.st_size)
        except OSError:
            files[c] = (path, 0, 0)
    pending: dict[str, bytes] = {c: b"" for c in components}
    while True:
        quiet = True
        for c, (path, inode, offset) in list(files.items()):
            try:
                st = path.stat()
            except OSError:
                continue
            if st.st_ino != inode or st.st_size < offset:
                offset = 0  # replaced, or truncated by a rotation: read the new content from the start
            if st.st_size == offset:
                files[c] = (path, st.st_ino, offset)
                continue
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read(st.st_size - offset)
            files[c] = (path, st.st_ino, offset + len(chunk))
            data = pending[c] + chunk
            *lines, pending[c] = data.split(b"\n")
            for raw in lines:
                quiet = False
                yield c, raw.decode("utf-8", "replace")
        if quiet:
            time.sleep(every)


def existing(paths: Paths, components: Sequence[str] = COMPONENTS) -> list[str]:
    return [c for c in components if os.path.exists(paths.log_file(c))]

"""Resumable, verified downloads.

Bytes go to `<dest>.partial`; a later call continues it with a Range request (and starts over, without
corrupting anything, when the server answers 200 instead of 206). The sha256 is computed while
streaming; only a verified file is renamed to its final name. A network failure keeps the partial file;
a checksum mismatch deletes it, since those bytes can never become right.

This single-stream downloader serves files whose size is not known before the request (release
archives). When the size is known up front (registry layers), `net.parts.download_parts` fetches the
file in parallel Range parts, each resuming on its own; both share the pieces below.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.fsutil import free_bytes
from stigmer.net import http
from stigmer.units import human_bytes as human_bytes  # re-exported for callers

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
ATTEMPTS = 4  # per call: retries only after bytes flowed, or on 5xx; never on connection refused
DISK_MARGIN = 16 * 1024 * 1024

ProgressFn = Callable[[int, int | None], None]  # (bytes done, total or None)


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    size: int
    resumed_from: int  # bytes that were already on disk from an earlier attempt
    final_url: str  # after redirects (a release's "latest" resolves to its version here)


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def check_disk(folder: Path, need: int, what: str) -> None:
    free = free_bytes(folder)
    if need + DISK_MARGIN > free:
        raise StigmerError(
            f"Not enough disk space to download {what}: need {human_bytes(need)}, "
            f"free {human_bytes(free)} on {folder}.",
            hint="Free some space (or point STIGMER_HOME at a bigger disk) and run the command again; "
            "what was already downloaded is kept.",
            code=ErrorCode.DISK_FULL,
        )


def _hash_file(path: Path, upto: int) -> hashlib._Hash:
    h = hashlib.sha256()
    with path.open("rb") as f:
        left = upto
        while left > 0:
            block = f.read(min(CHUNK * 4, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    what: str,
    size: int | None = None,
    on_progress: ProgressFn | None = None,
    timeout: float = http.DEFAULT_TIMEOUT,
) -> Downloaded:
    """Fetch url into dest, resuming `<dest>.partial`. sha256=None only for small metadata files."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    start_offset = part.stat().st_size if part.exists() else 0
    attempt = 0
    while True:
        attempt += 1
        try:
            return _attempt(
                url,
                dest,
                part,
                sha256=sha256,
                what=what,
                size=size,
                on_progress=on_progress,
                timeout=timeout,
                first_offset=start_offset,
            )
        except _Transient as e:
            if attempt >= ATTEMPTS:
                raise NetworkUnreachable(
                    f"Download of {what} failed after {attempt} attempts: {e}.",
                    hint="What was downloaded is kept; run the command again to continue.",
                    code=ErrorCode.DOWNLOAD_FAILED,
                ) from e
            delay = min(2 ** (attempt - 1), 8) * 0.25
            log.info("download of %s interrupted (%s); retrying in %.2fs", http.redact(url), e, delay)
            time.sleep(delay)


class _Transient(Exception):
    """A failure worth another attempt: the connection dropped mid-body, or the server said 5xx."""


def _attempt(
    url: str,
    dest: Path,
    part: Path,
    *,
    sha256: str | None,
    what: str,
    size: int | None,
    on_progress: ProgressFn | None,
    timeout: float,
    first_offset: int,
) -> Downloaded:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = http.request(url, headers=headers, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have and size is not None and have >= size:
            return _finish(part, dest, sha256, what, have, url, first_offset)
        if e.code == 416:  # our partial is longer than the file: it cannot be right
            part.unlink(missing_ok=True)
            raise _Transient("the partial download did not match the file on the server") from e
        if e.code >= 500 or e.code == 429:
            raise _Transient(f"server answered HTTP {e.code}") from e
        raise StigmerError(
            f"Download of {what} failed: {http.redact(url)} answered HTTP {e.code} {e.reason}.",
            hint="Check the version and download URL settings (stigmer config list).",
            code=ErrorCode.DOWNLOAD_HTTP_ERROR,
        ) from e
    except (urllib.error.URLError, OSError) as e:
        if have and not isinstance(getattr(e, "reason", None), ConnectionRefusedError):
            raise _Transient(http.describe(e)) from e
        raise NetworkUnreachable(
            f"Failed to download {what}: {http.describe(e)}",
            code=ErrorCode.NETWORK_UNREACHABLE,
            hint=f"Could not reach {http.redact(url)}.",
        ) from e
    with resp:
        final_url = resp.geturl()
        if resp.status == 206:
            offset = _range_start(resp.headers.get("Content-Range", ""))
            if offset != have:
                raise _Transient(f"server resumed at byte {offset}, expected {have}")
            hasher = _hash_file(part, have)
            mode = "ab"
        else:  # 200: the whole file again (Range ignored); start over from byte 0
            offset, hasher, mode = 0, hashlib.sha256(), "wb"
            if have:
                log.info("server ignored Range for %s; downloading from the start", http.redact(url))
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size
        if size is not None and total is not None and total != size:
            raise IntegrityError(
                f"Download of {what} has the wrong size: expected {size} bytes, the server sends {total}.",
                code=ErrorCode.CHECKSUM_MISMATCH,
                hint="The mirror may be serving a different file. Nothing was installed.",
            )
        if total is not None:
            check_disk(part.parent, total - offset, what)
        done = offset
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            with part.open(mode) as out:
                if on_progress:
                    on_progress(done, total)
                while True:
                    n = resp.readinto(buf)
                    if not n:
                        break
                    out.write(view[:n])
                    hasher.update(view[:n])
                    done += n
                    if on_progress:
                        on_progress(done, total)
        except (HTTPException, OSError) as e:
            if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT
                raise StigmerError(
                    f"The disk filled up while downloading {what}.",
                    code=ErrorCode.DISK_FULL,
                    hint="Free some space and run the command again; the download resumes.",
                ) from e
            raise _Transient(http.describe(e) if isinstance(e, OSError) else "connection closed early") from e
        if total is not None and done < total:
            raise _Transient(f"connection closed after {done} of {total} bytes")
    return _finish(part, dest, sha256, what, done, final_url, first_offset, hasher)


def _range_start(content_range: str) -> int:
    # "bytes 100-199/200"
    with contextlib.suppress(ValueError, IndexError):
        return int(content_range.split()[1].split("-")[0])
    return -1


def _finish(
    part: Path,
    dest: Path,
    sha256: str | None,
    what: str,
    size: int,
    final_url: str,
    first_offset: int,
    hasher: hashlib._Hash | None = None,
) -> Downloaded:
    digest = (hasher or _hash_file(part, size)).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise IntegrityError(
            f"Checksum mismatch for {what}: expected sha256 {sha256.lower()}, got {digest}.",
            hint="The download was corrupted or tampered with; it was deleted and nothing was installed. "
            "Run the command again; if it repeats, check your mirror (llm.download_url).",
            code=ErrorCode.CHECKSUM_MISMATCH,
        )
    os.replace(part, dest)
    return Downloaded(dest, digest, size, first_offset, final_url)

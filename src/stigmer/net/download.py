"""Resumable, verified downloads.

Bytes go to `<dest>.partial`; a later call continues it with a Range request (and starts over, without
corrupting anything, when the server answers 200 instead of 206). The sha256 is computed while
streaming; only a verified file is renamed to its final name. A network failure keeps the partial file;
a checksum mismatch deletes it, since those bytes can never become right.

This single-stream downloader serves files whose size is not known before the request (release
archives). When the size is known up front (registry layers), `net.parts.download_parts` fetches the
file in parallel Range parts, each resuming on its own. Both share the disk check below, one retry
policy (net.retry), one reading of Content-Range (net.ranges), one wording of failures (net.failures)
and one sha256 reader (stigmer.hashing).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError
from stigmer.fsutil import free_bytes
from stigmer.hashing import sha256_hasher
from stigmer.net import failures, http, retry
from stigmer.net.failures import Transient
from stigmer.net.ranges import parse_content_range
from stigmer.units import human_bytes as human_bytes  # re-exported for callers

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
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


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    what: str,
    size: int | None = None,
    on_progress: ProgressFn | None = None,
    timeout: float = http.DEFAULT_TIMEOUT,
    hint: str = "",
    policy: retry.RetryPolicy | None = None,
) -> Downloaded:
    """Fetch url into dest, resuming `<dest>.partial`. sha256=None only for small metadata files.

    `what` names the file in messages; `hint` is the caller's advice for failures a setting or a mirror
    can cause. Every try of this call counts against the retry policy's attempts.
    """
    policy = retry.current(policy)
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
                first=attempt == 1,
                hint=hint,
            )
        except Transient as e:
            if attempt >= policy.attempts:
                raise failures.gave_up(e, what=what, attempts=attempt, hint=hint) from e
            log.info(
                "download of %s interrupted (%s); retrying in %.2fs",
                http.redact(url),
                e,
                policy.delay(attempt),
            )
            policy.wait(attempt)


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
    first: bool,
    hint: str,
) -> Downloaded:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = http.request(url, headers=headers, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            # The partial reaches the end of the file: complete (then verified) or longer than it.
            content_range = parse_content_range(e.headers.get("Content-Range"))
            file_size = content_range.total if content_range is not None else size
            if file_size is not None and have == file_size and (size is None or size == have):
                return _finish(part, dest, sha256, what, have, url, first_offset, hint)
            part.unlink(missing_ok=True)  # longer than the file: it cannot be right
            raise Transient("the partial download did not match the file on the server") from e
        raise failures.attempt_failed(e, first=first, what=what, url=url, hint=hint) from e
    except retry.TRANSIENT_ERRORS as e:
        raise failures.attempt_failed(e, first=first, what=what, url=url, hint=hint) from e
    with resp:
        final_url = resp.geturl()
        if resp.status == 206:
            content_range = parse_content_range(resp.headers.get("Content-Range"))
            if content_range is None or content_range.start != have:
                got = "an unreadable range" if content_range is None else f"byte {content_range.start}"
                raise Transient(f"server resumed at {got}, expected byte {have}")
            hasher = sha256_hasher(part, upto=have)
            offset, mode = have, "ab"
        else:  # 200: the whole file again (Range ignored); start over from byte 0
            offset, hasher, mode = 0, hashlib.sha256(), "wb"
            if have:
                log.info("server ignored Range for %s; downloading from the start", http.redact(url))
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size
        if size is not None and total is not None and total != size:
            raise failures.wrong_size(what=what, expected=size, got=f"{total} bytes", hint=hint)
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
            full = failures.disk_filled(e, what=what) if isinstance(e, OSError) else None
            if full is not None:
                raise full from e
            raise Transient(http.describe(e) if isinstance(e, OSError) else "connection closed early") from e
        if total is not None and done < total:
            raise Transient(f"connection closed after {done} of {total} bytes")
    return _finish(part, dest, sha256, what, done, final_url, first_offset, hint, hasher)


def _finish(
    part: Path,
    dest: Path,
    sha256: str | None,
    what: str,
    size: int,
    final_url: str,
    first_offset: int,
    hint: str,
    hasher: hashlib._Hash | None = None,
) -> Downloaded:
    digest = (hasher or sha256_hasher(part, upto=size)).hexdigest()
    if sha256 is not None and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise failures.checksum_mismatch(what=what, expected=sha256.lower(), got=digest, hint=hint)
    os.replace(part, dest)
    return Downloaded(dest, digest, size, first_offset, final_url)

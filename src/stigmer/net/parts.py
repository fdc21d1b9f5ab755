"""Parallel ranged download of one large file, resumable part by part, verified by sha256.

The file is cut into parts that a few worker threads fetch in order, each with `Range: bytes=a-b`, into one
preallocated `<dest>.partial` at the part's offset. `<dest>.partial.json` records how far every part got
({size, sha256, parts: [{start, end, done}]}, end exclusive, done = bytes written from start); it is
rewritten only after those bytes reached the OS, so after a network cut, Ctrl-C or kill -9 the next call
continues every part where it stopped and never asks for a recorded byte again. (A power cut can lose
pages the record already counts; the final sha256 then fails and the download starts over, never
installing a wrong file.)

Hashing cannot be split, so a hasher thread follows the contiguous done prefix of the file, reading the
fresh bytes back from the page cache while later parts still download. Parts are fetched in order so
that prefix stays close behind the downloads; when the last part lands only a few parts are left to hash.

A server that ignores Range (200 instead of 206) gets a single stream from byte 0 and the part records
are dropped. The first request follows the registry's redirect to its CDN once; every part then goes to
that final URL, which carries a signature and is therefore only ever logged through `http.redact`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.net import failures, http, retry
from stigmer.net.download import Downloaded, ProgressFn, check_disk, partial_path
from stigmer.net.failures import Transient
from stigmer.net.ranges import parse_content_range

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CHUNK = MIB  # one readinto / write per MiB: Python overhead is then negligible next to the copy
HASH_BLOCK = 8 * MIB
# Concurrent connections. Parallel streams beat per-connection CDN limits (why Ollama uses 16); but each
# stream is a thread writing the same file, and on a 2-core machine 2 and 4 streams reach the same
# loopback speed (~1 GB/s, bound by the sha256) while 8 only add contention. 4 leaves headroom for links.
STREAMS = 4
SINGLE_BELOW = 64 * MIB  # smaller files are one part: a second connection would not pay for itself
# Part size: size/16 (as Ollama) kept to 32..256 MiB (Ollama: 100 MB..1 GB). Smaller than Ollama's because
# parts are handed out in order to STREAMS workers, and the sha256 can only follow completed prefixes.
MIN_PART = 32 * MIB
MAX_PART = 256 * MIB
PROGRESS_EVERY = 0.1  # seconds between on_progress calls
RECORD_EVERY = 0.5  # seconds between rewrites of the part record


def record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial.json")


def plan(size: int, parts: int | None = None) -> list[tuple[int, int]]:
    """[start, end) ranges covering [0, size): `parts` of them when given, else sized as described above."""
    if size <= 0:
        return []
    if parts is None:
        step = size if size < SINGLE_BELOW else min(MAX_PART, max(MIN_PART, size // 16))
    else:
        step = -(-size // max(1, min(parts, size)))
    return [(a, min(a + step, size)) for a in range(0, size, step)]


@dataclass
class _Part:
    start: int
    end: int  # exclusive
    done: int = 0
    claimed: bool = False  # taken by a worker in this call (not recorded)

    @property
    def pos(self) -> int:
        return self.start + self.done

    @property
    def complete(self) -> bool:
        return self.pos >= self.end


class _RangeIgnored(Exception):
    """The server answered 200 to a ranged request."""


def download_parts(
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    what: str,
    on_progress: ProgressFn | None = None,
    parts: int | None = None,
    timeout: float = http.DEFAULT_TIMEOUT,
    streams: int | None = None,
    hint: str = "",
    policy: retry.RetryPolicy | None = None,
) -> Downloaded:
    """Fetch url (size bytes, sha256 hex) into dest, resuming `<dest>.partial`; see the module docstring.

    `timeout` is also the stall limit: a part that receives no byte for that long is retried. A part
    gives up after the retry policy's attempts without progress; one that keeps moving never does.
    on_progress(done, size) is called from this thread about 10 times a second. `hint` is the caller's
    advice for failures a setting or a mirror can cause.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    job = _Job(
        url,
        dest,
        sha256=sha256.lower().removeprefix("sha256:"),
        size=size,
        what=what,
        on_progress=on_progress,
        timeout=timeout,
        streams=streams or STREAMS,
        hint=hint,
        policy=retry.current(policy),
    )
    try:
        return job.run(parts)
    finally:
        job.close()


class _Job:
    def __init__(
        self,
        url: str,
        dest: Path,
        *,
        sha256: str,
        size: int,
        what: str,
        on_progress: ProgressFn | None,
        timeout: float,
        streams: int,
        hint: str,
        policy: retry.RetryPolicy,
    ) -> None:
        self.url, self.final_url, self.dest = url, url, dest
        self.sha256, self.size, self.what = sha256, size, what
        self.on_progress, self.timeout, self.streams = on_progress, timeout, streams
        self.hint, self.policy = hint, policy
        self.partial, self.record = partial_path(dest), record_path(dest)
        self.parts: list[_Part] = []
        self.cond = threading.Condition()
        self.hexdigest = ""
        self.epoch = 0  # bumped when bytes already hashed may be rewritten (single-stream restart)
        self.fd: int | None = None

    # --- setup -------------------------------------------------------------------------------------

    def run(self, parts: int | None) -> Downloaded:
        created = not self.partial.exists()
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
        self._lock_partial()
        self.parts = self._load_record() or []
        if not self.parts:
            try:
                check_disk(self.dest.parent, self.size, self.what)
            except StigmerError:
                if created:  # leave nothing behind when nothing was downloaded
                    self._discard()
                raise
            # Truncate in place (not unlink) so the lock we hold keeps guarding the file in use.
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, self.size)  # sparse: the disk check above covers what will be written
            self.parts = [_Part(a, b) for a, b in plan(self.size, parts)]
            self._save_record()
        else:
            check_disk(self.dest.parent, self.size - self._done(), self.what)
        resumed = self._done()
        if resumed:
            log.info("resuming %s at %d of %d bytes", self.what, resumed, self.size)
        pending = [p for p in self.parts if not p.complete]
        try:
            try:
                self._transfer(self._probe(pending[0]) if pending else None)
            except _RangeIgnored as e:
                e.args[0].close()
                log.info(
                    "%s ignored a Range request; downloading %s in one stream from the start",
                    http.redact(self.final_url),
                    self.what,
                )
                self._reset_single()
                self._transfer(None)
        except IntegrityError:
            self._discard()
            raise
        digest = self.hexdigest
        if digest != self.sha256:
            self._discard()
            raise failures.checksum_mismatch(what=self.what, expected=self.sha256, got=digest, hint=self.hint)
        if os.name == "nt":
            self.close()  # Windows renames no open file; elsewhere the lock is held through the rename
        os.replace(self.partial, self.dest)
        self.record.unlink(missing_ok=True)
        return Downloaded(self.dest, digest, self.size, resumed, self.final_url)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also releases the lock
            self.fd = None

    def _lock_partial(self) -> None:
        """Two processes filling one partial would corrupt it: the second one stops here."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks on this fd; concurrent pulls are not guarded
            return
        assert self.fd is not None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StigmerError(
                f"Another process is already downloading {self.what}.",
                hint="Wait for it to finish, or stop it and run the command again.",
                code=ErrorCode.BUSY,
            ) from None

    def _load_record(self) -> list[_Part] | None:
        """The recorded parts when they describe this very file, else None (start over)."""
        try:
            data = json.loads(self.record.read_text(encoding="utf-8"))
            if os.fstat(self.fd or -1).st_size != self.size:
                return None
            if data.get("size") != self.size or data.get("sha256") != self.sha256:
                return None
            out = [_Part(int(p["start"]), int(p["end"]), int(p["done"])) for p in data["parts"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        # The ranges must tile [0, size) exactly, each done within its range.
        at = 0
        for p in out:
            if p.start != at or p.end <= p.start or not 0 <= p.done <= p.end - p.start:
                return None
            at = p.end
        return out if at == self.size else None

    def _save_record(self) -> None:
        with self.cond:
            body = {
                "size": self.size,
                "sha256": self.sha256,
                "parts": [{"start": p.start, "end": p.end, "done": p.done} for p in self.parts],
            }
        # No fsync: it would force the whole partial to disk (ext4 ordered mode) and halve throughput.
        tmp = self.record.with_name(self.record.name + ".tmp")
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.replace(tmp, self.record)

    def _discard(self) -> None:
        if os.name == "nt":
            self.close()
        self.partial.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)

    def _done(self) -> int:
        with self.cond:
            return sum(p.done for p in self.parts)

    def _reset_single(self) -> None:
        with self.cond:
            self.parts = [_Part(0, self.size)]
            self.epoch += 1
        self._save_record()

    # --- HTTP --------------------------------------------------------------------------------------

    def _probe(self, part: _Part) -> tuple[_Part, Any]:
        """First request: follows the redirect once and learns whether the server honours Range."""
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._open(self.url, part, first=True)
                self.final_url = resp.geturl()
                if self.final_url != self.url:
                    log.debug("%s redirects to %s", http.redact(self.url), http.redact(self.final_url))
                return part, resp
            except _RangeIgnored as e:
                resp = e.args[0]
                self.final_url = resp.geturl()
                log.info(
                    "%s ignored a Range request; downloading %s in one stream from the start",
                    http.redact(self.final_url),
                    self.what,
                )
                self._reset_single()
                return self.parts[0], resp
            except Transient as e:
                if attempt >= self.policy.attempts:
                    raise self._gave_up(e) from e
                log.info("download of %s: %s; retrying in %.2fs", self.what, e, self.policy.delay(attempt))
                self.policy.wait(attempt)

    def _open(self, url: str, part: _Part, *, first: bool = False) -> Any:
        ranged = part.pos > 0 or part.end < self.size
        headers = {"Accept-Encoding": "identity"}
        if ranged:
            headers["Range"] = f"bytes={part.pos}-{part.end - 1}"
        # `from None` on the errors below: the chained urllib error would repeat the signed URL.
        try:
            resp = http.request(url, headers=headers, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416:
                raise self._wrong_size("a smaller file") from None
            raise failures.attempt_failed(e, first=first, what=self.what, url=url, hint=self.hint) from None
        except retry.TRANSIENT_ERRORS as e:
            raise failures.attempt_failed(e, first=first, what=self.what, url=url, hint=self.hint) from None
        if resp.status == 206:
            content_range = parse_content_range(resp.headers.get("Content-Range"))
            if content_range is not None and content_range.total not in (None, self.size):
                resp.close()
                raise self._wrong_size(f"{content_range.total} bytes")
            if content_range is None or content_range.start != part.pos:
                resp.close()
                got = "an unreadable range" if content_range is None else f"byte {content_range.start}"
                raise Transient(f"server sent {got} when asked for byte {part.pos}")
            return resp
        length = resp.headers.get("Content-Length")
        if length is not None and int(length) != self.size:
            resp.close()
            raise self._wrong_size(f"{length} bytes")
        if ranged and len(self.parts) > 1:
            raise _RangeIgnored(resp)  # in single-stream mode _stream restarts from byte 0 instead
        return resp

    def _wrong_size(self, got: str) -> IntegrityError:
        return failures.wrong_size(what=self.what, expected=self.size, got=got, hint=self.hint)

    def _gave_up(self, e: Exception) -> NetworkUnreachable:
        return failures.gave_up(e, what=self.what, attempts=self.policy.attempts, hint=self.hint)

    # --- transfer ----------------------------------------------------------------------------------

    def _transfer(self, first: tuple[_Part, Any] | None) -> None:
        """Run workers and the hasher until every part is done; the calling thread reports progress."""
        run = _Run()  # per transfer: a worker left over from an earlier one sees only its own stop flag
        with self.cond:
            for p in self.parts:
                p.claimed = False
            if first is not None:
                first[0].claimed = True
            pending = sum(1 for p in self.parts if not p.complete)
        n = min(self.streams, pending)
        workers = [
            threading.Thread(
                target=self._worker, args=(run, first if i == 0 else None), name=f"part-{i}", daemon=True
            )
            for i in range(n)
        ]
        hasher = _Hasher(self)
        for t in (*workers, hasher):
            t.start()
        last_record = time.monotonic()
        saved_complete = self._complete_count()
        finished = False
        try:
            if self.on_progress:
                self.on_progress(self._done(), self.size)
            while run.failure is None and any(t.is_alive() for t in workers):
                run.wake.wait(PROGRESS_EVERY)  # set when a worker ends, so the end is seen at once
                run.wake.clear()
                if self.on_progress:
                    self.on_progress(self._done(), self.size)
                now, complete = time.monotonic(), self._complete_count()
                if now - last_record >= RECORD_EVERY or complete != saved_complete:
                    self._save_record()
                    last_record, saved_complete = now, complete
            finished = run.failure is None
        finally:
            # Also on Ctrl-C: stop workers at their next chunk, then record what reached the file.
            run.stop.set()
            with self.cond:
                self.cond.notify_all()
            deadline = time.monotonic() + 2
            for t in workers:
                # One blocked in recv may linger until its timeout: it owns its fd and writes nothing more.
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            if not finished:
                hasher.cancel()
            if self.partial.exists():
                self._save_record()
        if run.failure is not None:
            raise run.failure
        hasher.join()
        if hasher.error is not None:
            raise hasher.error
        self.hexdigest = hasher.hexdigest
        if self.on_progress:
            self.on_progress(self.size, self.size)

    def _complete_count(self) -> int:
        with self.cond:
            return sum(1 for p in self.parts if p.complete)

    def _claim(self) -> _Part | None:
        with self.cond:
            for p in self.parts:
                if not p.claimed and not p.complete:
                    p.claimed = True
                    return p
        return None

    def _worker(self, run: _Run, first: tuple[_Part, Any] | None) -> None:
        buf = bytearray(CHUNK)
        try:
            with open(self.partial, "r+b", buffering=0) as out:  # own fd: seek+write never races
                if first is not None:
                    self._fetch(run, first[0], first[1], out, buf)
                while not run.stop.is_set() and (part := self._claim()) is not None:
                    self._fetch(run, part, None, out, buf)
        except BaseException as e:  # noqa: B036 - handed to the coordinating thread, which re-raises
            with self.cond:
                if run.failure is None:
                    run.failure = e
                run.stop.set()
                self.cond.notify_all()
        finally:
            run.wake.set()

    def _fetch(self, run: _Run, part: _Part, resp: Any, out: Any, buf: bytearray) -> None:
        attempt = 0
        while not part.complete and not run.stop.is_set():
            before = part.done
            try:
                if resp is None:
                    resp = self._open(self.final_url, part)
                self._stream(run, part, resp, out, buf)
            except Transient as e:
                if part.done > before:
                    attempt = 0  # progress since the last failure: a flaky link, not a dead one
                attempt += 1
                if attempt >= self.policy.attempts:
                    raise self._gave_up(e) from e
                delay = self.policy.delay(attempt)
                log.info("part %d-%d of %s: %s; retrying in %.2fs", part.start, part.end, self.what, e, delay)
                self.policy.wait(attempt, stop=run.stop)
            finally:
                if resp is not None:
                    resp.close()
                    resp = None

    def _stream(self, run: _Run, part: _Part, resp: Any, out: Any, buf: bytearray) -> None:
        if resp.status == 200 and part.done:  # a single stream the server restarted from byte 0
            with self.cond:
                part.done = 0
                self.epoch += 1
        view = memoryview(buf)
        pos = part.pos
        out.seek(pos)
        while pos < part.end and not run.stop.is_set():
            try:
                n = resp.readinto(view[: min(CHUNK, part.end - pos)])
            except (OSError, ValueError) as e:  # ValueError: read on a closed response
                raise Transient(http.describe(e)) from None
            except HTTPException as e:  # IncompleteRead: cut mid-body
                raise Transient(f"connection closed early ({type(e).__name__})") from None
            if not n:
                raise Transient(f"connection closed at byte {pos}")
            if run.stop.is_set():
                return  # stopped while waiting for these bytes: the record is already final
            try:
                written = 0
                while written < n:
                    written += out.write(view[written:n])
            except OSError as e:
                full = failures.disk_filled(e, what=self.what)
                if full is not None:
                    raise full from e
                raise
            pos += n
            with self.cond:
                part.done += n
                self.cond.notify_all()


@dataclass
class _Run:
    stop: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None


class _Hasher(threading.Thread):
    """sha256 of the file, following the contiguous done prefix as it grows."""

    def __init__(self, job: _Job) -> None:
        super().__init__(name="sha256", daemon=True)
        self.job = job
        self.hexdigest = ""
        self.error: BaseException | None = None
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()
        with self.job.cond:
            self.job.cond.notify_all()

    def _frontier(self) -> int:
        for p in self.job.parts:
            if not p.complete:
                return p.pos
        return self.job.size

    def run(self) -> None:
        job = self.job
        try:
            with open(job.partial, "rb", buffering=0) as f:
                self._run(job, f)
        except BaseException as e:  # noqa: B036 - reported to the coordinating thread
            self.error = e

    def _run(self, job: _Job, f: Any) -> None:
        buf = bytearray(HASH_BLOCK)
        view = memoryview(buf)
        h, pos, epoch = hashlib.sha256(), 0, -1
        while True:
            with job.cond:
                while True:
                    if self._cancel.is_set():
                        return
                    if job.epoch != epoch:
                        h, pos, epoch = hashlib.sha256(), 0, job.epoch
                    front = self._frontier()
                    if pos == job.size and front == job.size:
                        self.hexdigest = h.hexdigest()
                        return
                    if front > pos:
                        break
                    job.cond.wait(1.0)
            f.seek(pos)
            while pos < front and not self._cancel.is_set():
                n = f.readinto(view[: min(HASH_BLOCK, front - pos)])
                if not n:
                    raise OSError(f"{job.partial} is shorter than expected")
                h.update(view[:n])
                pos += n

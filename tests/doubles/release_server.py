"""A local stand-in for GitHub's release downloads, with knobs for the faults downloads meet.

Serves `root/v{version}/{asset}` as GitHub does:
  GET|HEAD [PREFIX]/download/v{version}/{asset}   the file (Range: bytes=N-, N-M, -K -> 206; past end -> 416)
  GET|HEAD [PREFIX]/latest/download/{asset}       302, Location: {url}[PREFIX]/download/v{latest}/{asset}
  GET|HEAD [PREFIX]/latest                        302, Location: {url}[PREFIX]/tag/v{latest}
  GET|HEAD [PREFIX]/tag/v{version}                200, a small HTML page (when root/v{version}/ exists)
PREFIX is optional and kept in redirects, so both `{url}` and `{url}/ollama/ollama/releases` work as a base.

Fault knobs are plain attributes, settable while the server runs. A knob with a count switches itself
off when its count runs out (count None = every request). `fault_match`, when set, limits all faults to
request paths containing it (e.g. ".tar.zst", so sha256sum.txt downloads stay clean).
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

_DOWNLOAD = re.compile(r"^(?P<prefix>.*?)(?P<cdn>/cdn)?/download/(?P<tag>[^/]+)/(?P<asset>[^/]+)$")
_LATEST = re.compile(r"^(?P<prefix>.*?)/latest/download/(?P<asset>[^/]+)$")
_LATEST_RELEASE = re.compile(r"^(?P<prefix>.*?)/latest$")
_TAG = re.compile(r"^(?P<prefix>.*?)/tag/(?P<tag>[^/]+)$")
_CHUNK = 64 * 1024


@dataclass
class RequestRecord:
    method: str
    path: str  # without the query string
    range: str | None  # the Range header as sent
    status: int = 0
    bytes_sent: int = 0  # body bytes written for this request
    headers: dict[str, str] = field(default_factory=dict)


class _Cut(Exception):
    """The connection was closed on purpose (cut_after) or by the peer."""


class ReleaseServer:
    """Threaded HTTP server on 127.0.0.1 (ephemeral port) playing GitHub release downloads.

    Knobs:
      ignore_range: bool           answer 200 with the whole file even when a Range is asked
      cut_after: int | None        announce the full Content-Length, close after this many body bytes
      cut_times: int | None = 1    how many responses get cut (then cut_after resets to None)
      stall_seconds: float         pause this long before the body (after `stall_after` body bytes)
      stall_after: int = 0         body bytes sent before the stall
      stall_times: int | None      how many responses stall (None: all until stall_seconds = 0)
      fail_status: int | None      answer every request with this status (e.g. 500, 503)
      fail_times: int | None       how many requests fail (None: all until fail_status = None)
      fault_match: str | None      faults apply only to paths containing this
      throttle_bps: int | None     cap the body rate, bytes per second
      redirect_downloads: bool     /download/... answers 302 to /cdn/download/...?token=... (GitHub -> CDN)
    Records: `requests` (RequestRecord list), `bytes_sent[path]` (body bytes per request path).
    """

    def __init__(self, root: Path, latest: str | None = None, *, host: str = "127.0.0.1") -> None:
        self.root = Path(root)
        self.latest = latest
        self.host = host
        self.ignore_range = False
        self.cut_after: int | None = None
        self.cut_times: int | None = 1
        self.stall_seconds = 0.0
        self.stall_after = 0
        self.stall_times: int | None = None
        self.fail_status: int | None = None
        self.fail_times: int | None = None
        self.fault_match: str | None = None
        self.throttle_bps: int | None = None
        self.redirect_downloads = False
        self.requests: list[RequestRecord] = []
        self.bytes_sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("ReleaseServer is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def asset_url(self, version: str, asset: str) -> str:
        return f"{self.url}/download/{_tag(version)}/{asset}"

    def latest_url(self, asset: str) -> str:
        return f"{self.url}/latest/download/{asset}"

    def start(self) -> ReleaseServer:
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, 0), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="release-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes stalls and throttles
        self._httpd.shutdown()
        with self._lock:
            for conn in list(self._connections):  # keep-alive connections would outlive the server
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None

    def __enter__(self) -> ReleaseServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- records ------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_sent.clear()

    def requests_for(self, path_part: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if path_part in r.path]

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _count_bytes(self, record: RequestRecord, n: int) -> None:
        with self._lock:
            record.bytes_sent += n
            self.bytes_sent[record.path] = self.bytes_sent.get(record.path, 0) + n

    # -- faults -------------------------------------------------------------------------------------

    def _applies(self, path: str) -> bool:
        return self.fault_match is None or self.fault_match in path

    def _take_fail(self, path: str) -> int | None:
        with self._lock:
            status = self.fail_status
            if status is None or not self._applies(path):
                return None
            if self.fail_times is not None:
                self.fail_times -= 1
                if self.fail_times <= 0:
                    self.fail_status, self.fail_times = None, None
            return status

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            cut = self.cut_after
            if cut is None or not self._applies(path):
                return None
            if self.cut_times is not None:
                self.cut_times -= 1
                if self.cut_times <= 0:
                    self.cut_after, self.cut_times = None, 1
            return cut

    def _take_stall(self, path: str) -> tuple[float, int] | None:
        with self._lock:
            seconds = self.stall_seconds
            if seconds <= 0 or not self._applies(path):
                return None
            after = self.stall_after
            if self.stall_times is not None:
                self.stall_times -= 1
                if self.stall_times <= 0:
                    self.stall_seconds, self.stall_times = 0.0, None
            return seconds, after

    # -- serving ------------------------------------------------------------------------------------

    def _resolve(self, tag: str, asset: str) -> Path | None:
        path = (self.root / tag / asset).resolve()
        root = self.root.resolve()
        if root not in path.parents or not path.is_file():
            return None
        return path


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: ReleaseServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


def _tag(version: str) -> str:
    return version if version.startswith("v") else f"v{version}"


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) of a single byte range.

    None: ignore the header and serve 200 (malformed or multi-range, as RFC 9110 allows);
    "416": unsatisfiable.
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "416"
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return "416"
    return start, min(int(last) if last else size - 1, size - 1)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # records replace the access log; stderr noise helps nobody in pytest output

    def setup(self) -> None:
        super().setup()
        with self.server.owner._lock:
            self.server.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.owner._lock:
            self.server.owner._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        owner = self.server.owner
        path, _, query = self.path.partition("?")
        record = RequestRecord(
            self.command, path, self.headers.get("Range"), headers=dict(self.headers.items())
        )
        owner._record(record)
        try:
            self._route(owner, record, path, query)
        except _Cut:
            self.close_connection = True

    def _simple(
        self, record: RequestRecord, status: int, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        record.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self._write(record, body)

    def _write(self, record: RequestRecord, data: bytes) -> None:
        # Counted before writing: a client that has read everything must find the stats settled.
        self.server.owner._count_bytes(record, len(data))
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.server.owner._count_bytes(record, -len(data))
            raise _Cut from exc

    def _route(self, owner: ReleaseServer, record: RequestRecord, path: str, query: str) -> None:
        status = owner._take_fail(path)
        if status is not None:
            self._simple(record, status, f"{status} {self.responses.get(status, ('',))[0]}".encode())
            return
        m = _LATEST.match(path)
        if m:
            if owner.latest is None:
                self._simple(record, 404, b"Not Found")
                return
            location = f"{owner.url}{m['prefix']}/download/{_tag(owner.latest)}/{m['asset']}"
            self._simple(record, 302, b"", {"Location": location})
            return
        m = _LATEST_RELEASE.match(path)
        if m:
            if owner.latest is None:
                self._simple(record, 404, b"Not Found")
                return
            self._simple(record, 302, b"", {"Location": f"{owner.url}{m['prefix']}/tag/{_tag(owner.latest)}"})
            return
        m = _TAG.match(path)
        if m:
            if not (owner.root / m["tag"]).is_dir():
                self._simple(record, 404, b"Not Found")
                return
            self._simple(record, 200, f"<html><title>Release {m['tag']}</title></html>".encode())
            return
        m = _DOWNLOAD.match(path)
        file = owner._resolve(m["tag"], m["asset"]) if m else None
        if m is None or file is None:
            self._simple(record, 404, b"Not Found")
            return
        if owner.redirect_downloads and not m["cdn"]:
            location = f"{owner.url}{m['prefix']}/cdn/download/{m['tag']}/{m['asset']}?token=fake-signed-url"
            self._simple(record, 302, b"", {"Location": location})
            return
        self._serve_file(owner, record, file)

    def _serve_file(self, owner: ReleaseServer, record: RequestRecord, file: Path) -> None:
        st = file.stat()
        size = st.st_size
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            "Content-Disposition": f"attachment; filename={file.name}",
        }
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        # If-Range with a stale validator means "the file changed": send it whole.
        fresh = if_range is None or if_range in (etag, headers["Last-Modified"])
        if wanted and not owner.ignore_range and fresh:
            parsed = parse_range(wanted, size)
            if parsed == "416":
                self._simple(record, 416, b"", {"Content-Range": f"bytes */{size}"})
                return
            if isinstance(parsed, tuple):
                start, end, status = parsed[0], parsed[1], 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        path = record.path
        cut = owner._take_cut(path)
        stall = owner._take_stall(path)
        sent = 0
        with file.open("rb") as f:
            f.seek(start)
            while sent < length:
                if stall is not None and sent >= stall[1]:
                    owner._stopping.wait(stall[0])
                    stall = None
                n = min(_CHUNK, length - sent)
                if stall is not None:
                    n = min(n, stall[1] - sent)
                if cut is not None:
                    n = min(n, cut - sent)
                    if n <= 0:
                        break
                data = f.read(n)
                if not data:
                    break
                self._write(record, data)
                sent += len(data)
                if owner.throttle_bps:
                    owner._stopping.wait(len(data) / owner.throttle_bps)
                if owner._stopping.is_set():
                    break
        if sent < length:  # a promised body cut short: drop the connection so the client sees it
            self.wfile.flush()
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise _Cut

"""Resumable, verified downloads against a loopback release server with faults."""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.net import download as dl
from stigmer.net import retry
from tests.doubles.release_server import ReleaseServer

SIZE = 1_000_000


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ReleaseServer, str, bytes]]:
    data = os.urandom(SIZE)
    rel = tmp_path / "rel" / "v1.0.0"
    rel.mkdir(parents=True)
    (rel / "blob.bin").write_bytes(data)
    with ReleaseServer(tmp_path / "rel", latest="1.0.0") as srv:
        yield srv, srv.url + "/download/v1.0.0/blob.bin", data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_plain_download_verifies_and_renames(served, tmp_path: Path) -> None:
    srv, url, data = served
    seen: list[tuple[int, int | None]] = []
    got = dl.download(
        url, tmp_path / "out.bin", sha256=sha(data), what="blob", on_progress=lambda d, t: seen.append((d, t))
    )
    assert got.path.read_bytes() == data and got.sha256 == sha(data)
    assert seen[-1] == (SIZE, SIZE)
    assert not dl.partial_path(tmp_path / "out.bin").exists()


def test_cut_download_keeps_partial_then_resumes_without_refetching(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, url, data = served
    monkeypatch.setattr(retry.time, "sleep", lambda s: None)
    srv.cut_after = 100_000
    srv.cut_times = None  # every response is cut: this run gives up
    dest = tmp_path / "out.bin"
    with pytest.raises(NetworkUnreachable, match="run the command again|failed after"):
        dl.download(url, dest, sha256=sha(data), what="blob")
    kept = dl.partial_path(dest).stat().st_size
    assert kept == retry.DOWNLOADS.attempts * 100_000  # partial data survives the failed attempt
    srv.cut_after = None
    got = dl.download(url, dest, sha256=sha(data), what="blob")
    assert got.path.read_bytes() == data and got.resumed_from == kept
    assert srv.bytes_sent["/download/v1.0.0/blob.bin"] == SIZE  # not one byte twice
    assert srv.requests[-1].range == f"bytes={kept}-"


def test_server_ignoring_range_starts_over_cleanly(served, tmp_path: Path) -> None:
    srv, url, data = served
    dest = tmp_path / "out.bin"
    dl.partial_path(dest).write_bytes(data[:300_000])
    srv.ignore_range = True
    got = dl.download(url, dest, sha256=sha(data), what="blob")
    assert got.path.read_bytes() == data and got.resumed_from == 300_000
    assert srv.requests[-1].status == 200


def test_garbage_partial_is_caught_by_checksum(served, tmp_path: Path) -> None:
    srv, url, data = served
    dest = tmp_path / "out.bin"
    dl.partial_path(dest).write_bytes(b"x" * 1000)  # wrong bytes from some earlier mishap
    with pytest.raises(IntegrityError, match="Checksum mismatch"):
        dl.download(url, dest, sha256=sha(data), what="blob")
    assert not dest.exists() and not dl.partial_path(dest).exists()


def test_server_errors_are_retried_then_reported(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, url, data = served
    monkeypatch.setattr(retry.time, "sleep", lambda s: None)
    srv.fail_status = 503
    srv.fail_times = 2
    got = dl.download(url, tmp_path / "a.bin", sha256=sha(data), what="blob")
    assert got.size == SIZE
    srv.fail_status, srv.fail_times = 404, None
    with pytest.raises(StigmerError, match="HTTP 404"):
        dl.download(url, tmp_path / "b.bin", sha256=sha(data), what="blob")


def test_unreachable_server_is_network_unreachable(tmp_path: Path) -> None:
    from tests.doubles.archives import free_port

    with pytest.raises(NetworkUnreachable, match="connection refused"):
        dl.download(f"http://127.0.0.1:{free_port()}/x", tmp_path / "x", sha256=None, what="blob")


def test_disk_space_shortfall_names_need_and_free(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, url, data = served
    monkeypatch.setattr(dl, "free_bytes", lambda folder: 5_000_000)
    with pytest.raises(StigmerError) as e:
        dl.download(url, tmp_path / "out.bin", sha256=sha(data), what="blob")
    assert e.value.code is ErrorCode.DISK_FULL
    assert "need 1.0 MB" in e.value.message and "free 5.0 MB" in e.value.message
    part = dl.partial_path(tmp_path / "out.bin")
    assert not part.exists() or part.stat().st_size == 0  # nothing written to the full disk


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy: gets absolute-form request lines and fetches them from `target`."""

    seen: list[str] = []
    target = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).seen.append(self.path)
        path = "/" + self.path.split("/", 3)[3]  # http://releases.invalid/x -> /x
        headers = {k: v for k, v in self.headers.items() if k.lower() == "range"}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(urllib.request.Request(self.target + path, headers=headers)) as up:
            body = up.read()
            self.send_response(up.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_proxy_from_environment_is_honoured(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _url, data = served
    _Proxy.target, _Proxy.seen = srv.url, []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setattr("stigmer.net.http._proxied", None)
        got = dl.download(
            "http://releases.invalid/download/v1.0.0/blob.bin",
            tmp_path / "p.bin",
            sha256=sha(data),
            what="blob",
        )
        assert got.path.read_bytes() == data
        assert _Proxy.seen == ["http://releases.invalid/download/v1.0.0/blob.bin"]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_loopback_never_goes_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    from stigmer.net import http

    assert http.is_loopback("http://127.0.0.1:11434") and http.is_loopback("http://localhost:1")
    assert not http.is_loopback("https://github.com/ollama/ollama/releases")
    assert http.redact("https://cdn.example/blob?X-Amz-Signature=secret") == "https://cdn.example/blob"

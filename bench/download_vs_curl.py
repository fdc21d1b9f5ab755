"""Benchmark: stigmer.net.download.download (sha256-verified, resumable) against curl to disk, on loopback.

A 500 MB random file is served by a minimal HTTP server (ThreadingHTTPServer + socket.sendfile, Range
support) running in a child process, so the server never competes for the benchmark's GIL. Each side
fetches the same URL to a file in the same temp dir; outputs are deleted and the page cache's dirty pages
flushed (os.sync) between runs. One untimed round, then `--repeat` timed rounds in alternating order.
Medians are compared; target: ratio (ours / curl) >= 0.8.

Also measured in the same run, to explain the figure:
  - the server's ceiling (curl -> /dev/null),
  - a prototype of download()'s loop with sha256 moved to a second thread (--no-prototype to skip),
  - with --profile, a cProfile of one download() call (top functions by own time).

    python bench/download_vs_curl.py [--mb 500] [--repeat 3] [--profile] [--no-prototype]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# bench/_common.py: `python bench/NAME.py` puts bench/ first on sys.path
from _common import MB, CpuWatch, machine_line, make_file, settle, stop_process, time_curl

from stigmer.net.download import download

# -- the server (child process: `python bench/download_vs_curl.py --serve ROOT`) ----------------------


class _SendfileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path = Path()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        name = self.path.partition("?")[0].lstrip("/")
        file = (self.root / name).resolve()
        if file.parent != self.root.resolve() or not file.is_file():
            self.send_error(404)
            return
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            if start >= size or end < start:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            self.wfile.flush()
            with file.open("rb") as f:
                try:
                    self.connection.sendfile(f, start, end - start + 1)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True


def serve(root: Path) -> None:
    _SendfileHandler.root = root
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _SendfileHandler)
    httpd.daemon_threads = True
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()  # until the parent terminates us


def start_server(root: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        proc.wait()
        raise SystemExit("the benchmark server did not start")
    return proc, f"http://127.0.0.1:{line}"


# -- contenders -------------------------------------------------------------------------------------


def time_product(url: str, dest: Path, sha256: str, size: int) -> float:
    settle()
    t = time.perf_counter()
    got = download(url, dest, sha256=sha256, what="bench")
    elapsed = time.perf_counter() - t
    if got.size != size:
        raise SystemExit(f"download() fetched {got.size} bytes, expected {size}")
    dest.unlink()
    return elapsed


def threaded_hash_download(url: str, dest: Path, sha256: str, chunk: int = 1024 * 1024) -> None:
    """PROTOTYPE for download._attempt's loop: the socket is read and the file written in this thread,
    sha256 runs in a second thread on the same buffers (hashlib releases the GIL for large updates).
    A small ring of buffers keeps memory bounded; a buffer is reused only after it has been hashed."""
    part = dest.with_name(dest.name + ".partial")
    hasher = hashlib.sha256()
    ring = 4
    bufs = [bytearray(chunk) for _ in range(ring)]
    free: queue.Queue[int] = queue.Queue()
    for i in range(ring):
        free.put(i)
    todo: queue.Queue[tuple[int, int] | None] = queue.Queue()

    def hash_worker() -> None:
        while True:
            item = todo.get()
            if item is None:
                return
            i, n = item
            hasher.update(memoryview(bufs[i])[:n])
            free.put(i)

    worker = threading.Thread(target=hash_worker, daemon=True)
    worker.start()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=30) as resp, part.open("wb") as out:
            while True:
                i = free.get()
                n = resp.readinto(bufs[i])
                if not n:
                    free.put(i)
                    break
                out.write(memoryview(bufs[i])[:n])
                todo.put((i, n))
    finally:
        todo.put(None)
        worker.join()
    if hasher.hexdigest() != sha256:
        part.unlink()
        raise SystemExit("prototype: checksum mismatch")
    os.replace(part, dest)


def time_prototype(url: str, dest: Path, sha256: str) -> float:
    settle()
    t = time.perf_counter()
    threaded_hash_download(url, dest, sha256)
    elapsed = time.perf_counter() - t
    dest.unlink()
    return elapsed


def profile_product(url: str, dest: Path, sha256: str) -> None:
    settle()
    prof = cProfile.Profile()
    prof.enable()
    download(url, dest, sha256=sha256, what="bench")
    prof.disable()
    dest.unlink()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(8)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
    print("\ncProfile of one download() call, top functions by own time:")
    for ln in lines[max(start - 1, 0) :]:
        print("  " + ln)


def bench(args: argparse.Namespace) -> None:
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is not installed")
    size = args.mb * MB
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-dl-"))
    server: subprocess.Popen[str] | None = None
    watch = CpuWatch()
    try:
        src_dir = tmp / "srv"
        src_dir.mkdir()
        print(f"writing {args.mb} MB of random bytes ...", flush=True)
        sha = make_file(src_dir / "blob.bin", size)
        server, base = start_server(src_dir)
        url = f"{base}/blob.bin"
        out = tmp / "out"
        out.mkdir()

        ceiling = statistics.median(time_curl(curl, url, os.devnull, None) for _ in range(2))
        print(f"server ceiling (curl -> /dev/null): {size / MB / ceiling:.0f} MB/s")

        runs: dict[str, list[float]] = {"product": [], "curl": [], "prototype": []}
        contenders: dict[str, Callable[[], float]] = {
            "product": lambda: time_product(url, out / "product.bin", sha, size),
            "curl": lambda: time_curl(curl, url, str(out / "curl.bin"), size),
        }
        if args.prototype:
            contenders["prototype"] = lambda: time_prototype(url, out / "proto.bin", sha)
        names = list(contenders)
        # One untimed round first: on this VM the first writes into never-used page-cache memory run at
        # a fraction of the later speed (the host backs guest RAM on first touch), whoever comes first.
        for who in names:
            contenders[who]()
        for i in range(args.repeat):
            order = names if i % 2 == 0 else names[::-1]
            for who in order:
                runs[who].append(contenders[who]())
            print(
                f"run {i + 1}: " + "   ".join(f"{w} {size / MB / runs[w][-1]:5.0f} MB/s" for w in names),
                flush=True,
            )

        product = size / MB / statistics.median(runs["product"])
        curl_mbs = size / MB / statistics.median(runs["curl"])
        ratio = product / curl_mbs
        print(
            f"\nmedian of {args.repeat}: download() with sha256 {product:.0f} MB/s, curl -> disk "
            f"{curl_mbs:.0f} MB/s, ratio {ratio:.2f} (target >= 0.8) "
            f"{'OK' if ratio >= 0.8 else 'BELOW TARGET'}"
        )
        if args.prototype:
            proto = size / MB / statistics.median(runs["prototype"])
            print(f"prototype (sha256 in a second thread): {proto:.0f} MB/s, ratio {proto / curl_mbs:.2f}")
        if args.profile:
            profile_product(url, out / "profiled.bin", sha)
    finally:
        if server is not None:
            stop_process(server, 5)
        shutil.rmtree(tmp, ignore_errors=True)
    print(watch.report())  # after the server child was waited for: its CPU time counts as ours


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mb", type=int, default=500, help="file size in MB (10^6 bytes); default 500")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; default 3")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra download() call")
    ap.add_argument(
        "--no-prototype", dest="prototype", action="store_false", help="skip the threaded-sha256 prototype"
    )
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: the child server
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    bench(args)


if __name__ == "__main__":
    main()

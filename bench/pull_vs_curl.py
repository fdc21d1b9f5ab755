"""Benchmark: a 500 MB model-layer pull (net.parts, sha256-verified) against curl to disk, on loopback.

Both fetch the same registry blob URL (a 307 to the fake CDN, which serves the file with sendfile), so
curl gets -L to follow the redirect as download_parts does. The fake registry runs in a child process of
its own, as a real CDN would be: inside this process its threads would compete with ours for the GIL
(which curl, a separate process, never does). Caches are left alone (no drop), but dirty
pages are synced before every timed run so one run's writeback does not land in the next one's time;
one untimed run of each warms up. The order alternates and each side runs 3 times; medians are compared.
Target: ratio (ours / curl) >= 0.8.

    python bench/pull_vs_curl.py [--mb 500] [--repeat 3]
    (python bench/pull_vs_curl.py --serve FILE is the child: it prints the blob URL and digest and serves
    until its stdin closes)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/_common.py: `python bench/NAME.py` puts bench/ first on sys.path
from _common import MB, make_file, settle, time_curl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.doubles

from tests.doubles.fake_registry import FakeRegistry  # noqa: E402

from stigmer.net.parts import download_parts  # noqa: E402 - after the path set-up above


def time_ours(url: str, dest: Path, sha256: str, size: int) -> float:
    settle()
    t = time.perf_counter()
    download_parts(url, dest, sha256=sha256, size=size, what="bench blob")
    elapsed = time.perf_counter() - t
    dest.unlink()
    return elapsed


def serve(path: Path) -> None:
    with FakeRegistry({"bench:latest": {"model": path}}) as reg:
        digest = reg.digest("bench:latest")
        print(reg.blob_url(digest, "bench"), digest.removeprefix("sha256:"), flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is not installed")
    size = args.mb * MB
    with tempfile.TemporaryDirectory(prefix="stigmer-bench-") as tmp:
        root = Path(tmp)
        src = root / "blob.bin"
        print(f"writing {args.mb} MB of random bytes ...", flush=True)
        sha = make_file(src, size)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(src)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            url, served_sha = server.stdout.readline().split()
            if served_sha != sha:
                raise SystemExit("the server computed another digest")
            time_ours(url, root / "ours.bin", sha, size)  # warm-up, untimed
            time_curl(curl, url, root / "curl.bin", size, follow=True)
            ours: list[float] = []
            theirs: list[float] = []
            for i in range(args.repeat):
                order = ("ours", "curl") if i % 2 == 0 else ("curl", "ours")
                for who in order:
                    if who == "ours":
                        ours.append(time_ours(url, root / "ours.bin", sha, size))
                    else:
                        theirs.append(time_curl(curl, url, root / "curl.bin", size, follow=True))
                print(
                    f"run {i + 1}: download_parts {size / MB / ours[-1]:7.0f} MB/s   "
                    f"curl {size / MB / theirs[-1]:7.0f} MB/s",
                    flush=True,
                )
        finally:
            assert server.stdin is not None
            server.stdin.close()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    ours_mbs = size / MB / statistics.median(ours)
    curl_mbs = size / MB / statistics.median(theirs)
    ratio = ours_mbs / curl_mbs
    print(
        f"median: download_parts (with sha256) {ours_mbs:.0f} MB/s, curl -> disk {curl_mbs:.0f} MB/s, "
        f"ratio {ratio:.2f} (target >= 0.8) {'OK' if ratio >= 0.8 else 'BELOW TARGET'}"
    )


if __name__ == "__main__":
    main()

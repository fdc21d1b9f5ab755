"""Output: plain 10% lines off a terminal, a live bar on one, colour rules, errors on stderr."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import time

from stigmer.cli.render import Out, Progress
from stigmer.events import INSTALLING, Event
from tests.conftest import stigmer_exe


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_plain_progress_prints_each_tenth_once() -> None:
    buf = _Pipe()
    with Progress(Out(stdout=buf, stderr=buf)) as progress:
        progress(Event(INSTALLING, "Downloading local LLM"))
        for done in range(0, 1_000_001, 10_000):  # 101 updates
            progress(Event(INSTALLING, "Downloading local LLM", key="rt", done=done, total=1_000_000))
    lines = buf.getvalue().splitlines()
    tenths = [ln for ln in lines if "%" in ln]
    assert [t.split(": ")[-1].split("%")[0] for t in tenths] == [str(p) for p in range(0, 101, 10)]
    assert tenths[5] == "   Installing: Downloading local LLM: 50% (500.0 KB / 1.0 MB)"
    assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()


def test_errors_go_to_stderr_with_hint() -> None:
    out, err = _Pipe(), _Pipe()
    Out(stdout=out, stderr=err).error("It broke.", "Do this.")
    assert out.getvalue() == "" and err.getvalue() == "✗ Error: It broke.\n\nDo this.\n"


def _run_in_pty(args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    master, slave = pty.openpty()
    proc = subprocess.Popen([*stigmer_exe(), *args], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        proc.wait(timeout=30)
        os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def test_terminal_gets_live_bar_and_colour(isolated_home, tmp_path) -> None:
    from stigmer.server.control import stop as stop_server
    from tests.doubles.archives import build_release, free_port
    from tests.doubles.release_server import ReleaseServer

    root = tmp_path / "rel"
    build_release(root, "0.33.0", platforms=("linux-amd64",))
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    try:
        with ReleaseServer(root, latest="0.33.0") as srv:
            env.update(
                {
                    "STIGMER_LLM_DOWNLOAD_URL": srv.url,
                    "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
                    "OLLAMA_FAKE_PULL_DELAY": "0.001",
                    "TERM": "xterm",
                    "COLUMNS": "120",
                }
            )
            text = _run_in_pty(["server"], env)
        assert "Ready!" in text
        assert "\x1b[32m✓\x1b[0m" in text  # green tick on a terminal
        assert "100%" in text and ("MB/s" in text or "kB/s" in text or "KB/s" in text)  # rich's live bar
        assert "Downloading local LLM: 10%" not in text  # no plain 10% lines on a terminal
        plain = _run_in_pty(["server", "llm", "status"], {**env, "NO_COLOR": "1"})
        assert "✓ Running" in plain and "\x1b[32m" not in plain
    finally:
        stop_server(isolated_home)

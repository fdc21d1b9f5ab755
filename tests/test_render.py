"""Output: plain 10% lines off a terminal, a live bar on one, colour rules, errors on stderr."""

from __future__ import annotations

import io
import itertools
import os
import pty
import re
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


def _run_in_pty(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Everything the command wrote to its terminal. Once it has exited, what is left in the terminal is
    read to the end (stopping at the first quiet moment after the exit dropped what was written between
    the two). `timeout` only bounds a command that hangs."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*stigmer_exe(), *args], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, b"".join(chunks).decode("utf-8", "replace")[-3000:]
            exited = proc.poll() is not None  # before looking: all it wrote is in the terminal by then
            ready, _, _ = select.select([master], [], [], 0 if exited else 0.5)
            if not ready:
                if exited:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: nobody has the terminal open any more
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if proc.poll() is None:
            proc.kill()
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
        # rich's live bar, redrawn in place. Its last frame, drawn when it stops (whatever the refresh
        # thread managed before, on a loaded machine), shows each download done: 100%, size, no time left.
        assert "\x1b[2K" in text  # a line redrawn
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        last_frame = plain[plain.rindex("   Downloading local LLM ") :].splitlines()
        rows = list(itertools.takewhile(lambda line: line.startswith("   Downloading"), last_frame))
        done = re.compile(r"━ 100% (\d+(\.\d+)?)/\1 (bytes|kB|MB) .*0:00:00\s*$")
        assert len(rows) >= 2 and all(done.search(row) for row in rows), rows  # the runtime, the model
        assert re.search(r"\d+(\.\d+)? (kB|MB|GB)/s", plain)  # the model's layers come in steps: a speed
        assert "Downloading local LLM: 10%" not in text  # no plain 10% lines on a terminal
        plain = _run_in_pty(["server", "llm", "status"], {**env, "NO_COLOR": "1"})
        assert "✓ Running" in plain and "\x1b[32m" not in plain
    finally:
        stop_server(isolated_home)

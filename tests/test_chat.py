"""`stigmer chat` end to end: at a pseudo-terminal (typing, streamed answers, Ctrl-C cancels a turn, the
commands, Ctrl-D leaves, the history file) and with piped stdin (each line a turn), against the real server,
worker and Temporal, with a scripted OpenAI-compatible model that records what it was sent."""

from __future__ import annotations

import os
import re
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stigmer.paths import Paths
from tests.conftest import run_cli, stigmer_exe
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import in_state, wait_until

pytestmark = [
    pytest.mark.usefixtures("stop_server"),
    pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX"),
]

# Makes the terminal the chat runs at its controlling terminal (so that Ctrl-C there is a SIGINT), then
# becomes the chat. subprocess starts it in a session of its own: no fork() of this threaded process.
LAUNCH = "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execvp(sys.argv[1], sys.argv[1:])"


class Terminal:
    """`stigmer ARGS` at a pseudo-terminal: what it prints is read as it comes, and keys are typed."""

    def __init__(self, *args: str) -> None:
        import fcntl
        import pty
        import struct
        import termios

        self.fd, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, *stigmer_exe(), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.seen = ""  # everything printed so far
        self.pos = 0  # where the next expect() starts looking

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the chat has ended and closed the terminal
            data = b""
        if not data:
            raise EOFError
        self.seen += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return True

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """Wait for `pattern` (a regular expression) after what was matched before."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.seen, self.pos)
            if found:
                self.pos = found.end()
                return found
            try:
                self._read(deadline - time.monotonic())
            except EOFError:
                raise AssertionError(f"the chat ended before {pattern!r}; it printed:\n{self.seen}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in time; the chat printed:\n{self.seen}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                self._read(0.1)
            except EOFError:
                break
        return self.proc.wait(max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self.fd)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(key="sk-chat")
    with fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-chat")
        yield fake


@pytest.fixture
def server(fake: FakeOpenAI) -> FakeOpenAI:
    r = run_cli("server", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return fake


def _api(paths: Paths) -> Any:
    from stigmer.server import control

    return control.api(paths)


def _user_messages(request: dict[str, Any]) -> list[str]:
    return [str(m.get("content")) for m in request.get("messages") or [] if m.get("role") == "user"]


def test_a_conversation_at_the_terminal(isolated_home: Paths, server: FakeOpenAI) -> None:
    api = _api(isolated_home)
    started = time.monotonic()
    term = Terminal("chat")
    try:
        name = term.expect(r"Session: (chat-[0-9-]+) \(agent default\)").group(1)
        term.expect(">>> ")
        print(f"first prompt after {1000 * (time.monotonic() - started):.0f} ms")

        # a line is a turn; its answer streams; the next turn is sent the first one too
        term.type("My name is Ada.\r")
        term.expect("echo: My name is Ada.")
        term.expect(">>> ")
        term.type("What is my name?\r")
        term.expect(r"echo: What is my name\?")
        term.expect(">>> ")
        assert _user_messages(server.requests[-1]) == ["My name is Ada.", "What is my name?"]

        # Ctrl-C during a slow answer cancels that turn (through the API) and the chat goes on
        server.delay = 0.4
        term.type("Tell me a long story about the sea, the wind, the sky and the stars at night.\r")
        term.expect("echo: Tell")  # the answer is streaming
        term.type("\x03")
        term.expect("Turn cancelled")
        term.expect(">>> ")
        server.delay = 0.0
        turns = api.get(f"/v1/sessions/{name}")["turns"]
        assert [t["turn"] for t in turns] == [1, 2, 3]
        assert wait_until(lambda: in_state(turns[2]["execution_id"], "CANCELLED"), 30)
        term.type("Still there?\r")
        term.expect(r"echo: Still there\?")
        term.expect(">>> ")
        assert _user_messages(server.requests[-1]) == ["My name is Ada.", "What is my name?", "Still there?"]

        # """ starts and ends a message of several lines
        term.type('"""\rline one\rline two\r"""\r')
        term.expect("echo: line one\nline two")
        term.expect(">>> ")
        assert _user_messages(server.requests[-1])[-1] == "line one\nline two"

        term.type("/session\r")
        term.expect(f"Session: {name} \\(agent default\\)")
        term.expect(">>> ")
        term.type("/help\r")
        term.expect("/new")
        term.expect(">>> ")

        # /new: another session, with none of the first one's past
        term.type("/new\r")
        other = term.expect(r"Session: (chat-[0-9-]+) \(agent default\)").group(1)
        assert other != name
        term.expect(">>> ")
        term.type("Hello again.\r")
        term.expect("echo: Hello again.")
        term.expect(">>> ")
        assert _user_messages(server.requests[-1]) == ["Hello again."]
        assert [s["name"] for s in api.get("/v1/sessions")][:2] == [other, name]

        # a turn of the session running elsewhere: the chat says it is busy and goes on
        server.delay = 0.3
        elsewhere = api.post("/v1/executions", {"message": "x", "session": other})
        term.type("Me too.\r")
        term.expect(f"still running: {elsewhere['id']}")
        term.expect(">>> ")
        server.delay = 0.0
        wait_until(lambda: in_state(elsewhere["id"], "COMPLETED"), 60)

        # Ctrl-C at the prompt clears the line; Ctrl-D leaves, exit 0
        term.type("half a line")
        term.expect("half a line")
        time.sleep(0.3)  # CPython's readline misses a SIGINT that comes while it handles the keys before
        term.type("\x03")
        term.expect(">>> ")
        term.type("\x04")
        assert term.wait() == 0
    finally:
        term.close()

    history = isolated_home.data_dir / "chat_history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    text = history.read_text()
    assert "Ada" in text and "half a line" not in text


def test_piped_lines_are_turns_of_one_session(isolated_home: Paths, fake: FakeOpenAI) -> None:
    def chat(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*stigmer_exe(), "chat", *args], input=stdin, capture_output=True, text=True, timeout=240
        )

    # -c with no conversation yet: a clear error (the server is started on the way, as `stigmer run` does)
    r = chat("-c", stdin="hello\n")
    assert r.returncode == 6, r.stdout + r.stderr
    assert "no conversation to continue" in r.stderr

    r = chat(stdin='My name is Ada.\n\n"""\nline one\nline two\n"""\n')
    assert r.returncode == 0, r.stdout + r.stderr
    assert "echo: My name is Ada." in r.stdout and "line two" in r.stdout
    assert ">>> " not in r.stdout
    api = _api(isolated_home)
    sessions = api.get("/v1/sessions")
    assert len(sessions) == 1 and sessions[0]["turns"] == 2
    assert _user_messages(fake.requests[-1]) == ["My name is Ada.", "line one\nline two"]

    # -c goes on with it; a named session is started when new
    r = chat("-c", stdin="And again?\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert api.get(f"/v1/sessions/{sessions[0]['name']}")["turns"][-1]["turn"] == 3
    r = chat("--session", "scripted", stdin="one\ntwo\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [t["message"] for t in api.get("/v1/sessions/scripted")["turns"]] == ["one", "two"]
    assert _user_messages(fake.requests[-1]) == ["one", "two"]
    r = chat("nobody", "--session", "scripted", stdin="three\n")
    assert r.returncode == 2 and "with the agent 'default', not 'nobody'" in r.stderr

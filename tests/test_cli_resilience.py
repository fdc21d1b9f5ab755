"""`stigmer run` / `execution logs -f` against a server that goes away and comes back (issue 14, fault 2), a
stream that misses part of the answer, and an API token removed while the server runs (fault 6).

The client side is tested against a stand-in API on a real socket that serves the events of one execution,
drops the connection mid-stream, stops listening for a while (the supervisor restarting the API) and then
answers the replay from Last-Event-ID, as the real API does. The token repair runs the real server.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stigmer.cli import run_cmd
from stigmer.cli.render import Out
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.server.client import ApiClient
from tests.doubles.archives import free_port

TOKEN = "test-token"
EXEC = "ex-0123456789abcdef"
WORDS = [str(n) for n in range(1, 61)]  # the 60 words of the answer
ANSWER = " ".join(WORDS)


def _record(output: str = ANSWER) -> dict[str, Any]:
    return {
        "id": EXEC,
        "state": "COMPLETED",
        "output": output,
        "duration": 1.0,
        "model": "m",
        "provider": "p",
        "attempts": 1,
        "tool_calls": 0,
        "messages": [],
        "usage": {"input_tokens": 1, "output_tokens": 60},
    }


def _answer_events(deltas: list[str], output: str = ANSWER) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("pending", {"agent": "default"}),
        ("started", {"model": "m", "provider": "p"}),
        *[("delta", {"text": d}) for d in deltas],
        ("completed", {"record": _record(output)}),
    ]


class StandIn:
    """A stand-in for the API's execution routes. `events` are numbered from 1. `drop_after`: the first
    stream sends events up to that id and then the connection is closed and the server stops listening
    for `down` seconds (restarted on the same port; None: it never comes back). `hold_until_decided`:
    events after the drop are sent only once an approve/deny has been posted."""

    def __init__(
        self,
        events: list[tuple[str, dict[str, Any]]],
        *,
        drop_after: int | None = None,
        down: float | None = 1.5,
        hold_until_decided: bool = False,
        header_delay: float = 0.0,
        silent_after: int | None = None,
    ) -> None:
        self.events = events
        self.header_delay = header_delay  # the real API answers a stream once it has a first event
        self.silent_after = silent_after  # the first stream sends these events, then nothing, never closed
        self.released = threading.Event()
        self.drop_after = drop_after
        self.down = down
        self.hold_until_decided = hold_until_decided
        self.port = free_port()
        self.last_event_ids: list[str | None] = []
        self.decisions: list[tuple[str, dict[str, Any]]] = []
        self.decided = threading.Event()
        self.streams = 0
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                    return True
                self._json(401, {"error": {"code": "unauthorized", "message": "The API token is not valid."}})
                return False

            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                if not self._authorized():
                    return
                if self.path == f"/v1/executions/{EXEC}":
                    self._json(200, _record())
                elif self.path == f"/v1/executions/{EXEC}/events":
                    stand_in._stream(self)
                else:
                    self._json(404, {"error": {"code": "not_found", "message": "no such path"}})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                verb = self.path.rsplit("/", 1)[-1]
                stand_in.decisions.append((verb, body))
                stand_in.decided.set()
                self._json(200, {**_record(), "decided": "shell"})

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        self._threads.append(t)

    def _stream(self, handler: BaseHTTPRequestHandler) -> None:
        last = handler.headers.get("Last-Event-ID")
        with self._lock:
            self.streams += 1
            first = self.streams == 1
        self.last_event_ids.append(last)
        after = int(last) if last and last.isdigit() else 0
        time.sleep(self.header_delay)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        until = len(self.events)
        if first and self.drop_after is not None:
            until = self.drop_after
        elif first and self.silent_after is not None:
            until = self.silent_after
        elif self.hold_until_decided:
            self.decided.wait(30)
        for seq in range(after + 1, until + 1):
            kind, data = self.events[seq - 1]
            handler.wfile.write(f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode())
            handler.wfile.flush()
        if first and self.silent_after is not None:
            self.released.wait(60)  # a hung server: the connection stays open, nothing comes
        if first and self.drop_after is not None:
            handler.close_connection = True
            threading.Thread(target=self._restart, daemon=True).start()

    def _restart(self) -> None:
        """The API died: nothing listens for `down` seconds; then its supervisor has started a new one."""
        self.stop()
        if self.down is None:
            return
        time.sleep(self.down)
        self.start()

    def stop(self) -> None:
        self.released.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


@pytest.fixture
def stand_in() -> Iterator[list[StandIn]]:
    made: list[StandIn] = []
    yield made
    for s in made:
        s.stop()


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _follow(
    api: StandIn, *, stdout: io.StringIO | None = None, timeout: float = 30
) -> tuple[int | BaseException, str, str]:
    """run_cmd.follow in a thread (the code before the fix waited forever): its exit code or error,
    stdout and stderr."""
    shown, errors = stdout or io.StringIO(), io.StringIO()
    out = Out(stdout=shown, stderr=errors)
    result: list[int | BaseException] = []

    def target() -> None:
        try:
            result.append(run_cmd.follow(ApiClient(api.url, TOKEN), EXEC, out, cancel_on_interrupt=False))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"follow() still waits after {timeout} s; stderr: {errors.getvalue()}"
    return result[0], shown.getvalue(), errors.getvalue()


def _shown_answer(stdout: str) -> str:
    """The text after the last "Agent: " up to the summary line."""
    text = stdout.rsplit("Agent: ", 1)[1]
    return text.split("\n✅", 1)[0].strip()


# -- riding out a restart -------------------------------------------------------------------------------
def test_follow_rides_out_an_api_restart_and_resumes_from_the_last_event(stand_in: list[StandIn]) -> None:
    deltas = [w + " " for w in WORDS[:-1]] + [WORDS[-1]]
    api = StandIn(_answer_events(deltas), drop_after=2 + 25)  # pending, started, then 25 words
    stand_in.append(api)
    api.start()
    code, stdout, stderr = _follow(api)
    assert code == 0, stderr
    assert _shown_answer(stdout) == ANSWER  # every word, once, in order
    assert "✅ Execution completed" in stdout
    assert "Lost the Stigmer server" in stderr and "reconnecting" in stderr
    assert "Reconnected" in stderr
    assert api.last_event_ids[0] is None
    assert api.last_event_ids[-1] == "27"  # the replay starts after the last event shown


def test_a_stream_waits_for_its_first_event_longer_than_a_request_would(stand_in: list[StandIn]) -> None:
    """The API answers a stream only once it has a first event (up to its 15 s keep-alive): the client's
    request timeout must not cut that short (it would reconnect for ever)."""
    api = StandIn(_answer_events(["one ", "two"]), header_delay=1.5)
    stand_in.append(api)
    api.start()
    out = Out(io.StringIO(), io.StringIO())
    code = run_cmd.follow(ApiClient(api.url, TOKEN, timeout=0.5), EXEC, out, cancel_on_interrupt=False)
    assert code == 0 and api.streams == 1


def test_a_silent_stream_counts_as_lost_and_is_resumed(
    stand_in: list[StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung API (the connection open, no keep-alive for STREAM_IDLE seconds) is a lost server, not a
    wait for ever: the command reconnects and finishes from the replay."""
    from stigmer.server import client

    monkeypatch.setattr(client, "STREAM_IDLE", 1.0)
    api = StandIn(_answer_events([w + " " for w in WORDS]), silent_after=10)
    stand_in.append(api)
    api.start()
    code, stdout, stderr = _follow(api)
    assert code == 0, stderr
    assert _shown_answer(stdout) == ANSWER
    assert "Lost the Stigmer server" in stderr and api.last_event_ids[-1] == "10"


def test_follow_gives_up_on_a_stopped_server_with_a_clear_error(
    stand_in: list[StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server was stopped (no daemon to restart it): an end within NO_DAEMON_SECONDS, NOT_RUNNING."""
    monkeypatch.setattr(run_cmd, "NO_DAEMON_SECONDS", 1.0)
    api = StandIn(_answer_events(["one ", "two"]), drop_after=3, down=None)
    stand_in.append(api)
    api.start()
    t0 = time.monotonic()
    error, stdout, stderr = _follow(api, timeout=20)
    assert isinstance(error, StigmerError), error
    assert error.code is ErrorCode.NOT_RUNNING and error.exit_code == 8
    assert "the server is stopped" in error.message and EXEC in error.message
    assert f"stigmer execution logs -f {EXEC}" in error.hint
    assert time.monotonic() - t0 < 10
    assert "Lost the Stigmer server" in stderr


def test_follow_waits_longer_while_a_daemon_restarts_the_api(
    stand_in: list[StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_cmd, "NO_DAEMON_SECONDS", 0.5)
    monkeypatch.setattr(run_cmd, "RECONNECT_SECONDS", 2.0)
    monkeypatch.setattr(run_cmd, "_daemon_runs", lambda: True)
    api = StandIn(_answer_events(["one ", "two"]), drop_after=3, down=None)
    stand_in.append(api)
    api.start()
    t0 = time.monotonic()
    error, _stdout, _stderr = _follow(api, timeout=20)
    waited = time.monotonic() - t0
    assert isinstance(error, StigmerError) and error.code is ErrorCode.NOT_RUNNING, error
    assert "stopped" not in error.message
    assert 2.0 <= waited < 10


def test_an_approval_answered_while_the_api_restarts_is_sent_when_it_is_back(
    stand_in: list[StandIn], monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, dict[str, Any]]] = [
        ("pending", {"agent": "default"}),
        ("started", {"model": "m", "provider": "p"}),
        ("approval_required", {"id": "call-1", "name": "shell", "args": {"argv": ["ls"]}}),
        ("approval", {"id": "call-1", "name": "shell", "approved": True}),
        ("delta", {"text": "done"}),
        ("completed", {"record": _record("done")}),
    ]
    api = StandIn(events, drop_after=3, down=1.0, hold_until_decided=True)
    stand_in.append(api)
    api.start()
    monkeypatch.setattr("sys.stdin", Tty())
    asked: list[str] = []

    def answer(prompt: str) -> str:
        asked.append(prompt)
        time.sleep(0.3)  # the API is down by the time the answer is sent
        return "y"

    monkeypatch.setattr("builtins.input", answer)
    code, stdout, stderr = _follow(api, stdout=Tty())
    assert code == 0, stderr
    assert len(asked) == 1 and "shell" in asked[0]
    assert api.decisions == [("approve", {"call_id": "call-1", "always": False})]
    assert "shell allowed" in stdout and "done" in stdout


def test_run_submits_once_the_restarted_api_listens(stand_in: list[StandIn]) -> None:
    """`stigmer run` while the API is being restarted: a refused connection sent nothing, so the
    execution is submitted (once) when the API listens again, not failed."""
    api = StandIn(_answer_events(["x"]))
    stand_in.append(api)
    threading.Timer(1.0, api.start).start()
    errors = io.StringIO()
    record = run_cmd._submit(
        ApiClient(api.url, TOKEN), {"agent": "default", "message": "hi"}, Out(io.StringIO(), errors)
    )
    assert record["id"] == EXEC
    assert [verb for verb, _body in api.decisions] == ["executions"]  # one POST /v1/executions
    assert "does not answer" in errors.getvalue()


# -- never less than the record -------------------------------------------------------------------------
def test_a_stream_missing_the_end_of_the_answer_shows_it_from_the_record(stand_in: list[StandIn]) -> None:
    """The stream lost the last batches (fault 2): the terminal event's record has the whole answer."""
    deltas = [w + " " for w in WORDS[:25]]
    api = StandIn(_answer_events(deltas))
    stand_in.append(api)
    api.start()
    code, stdout, stderr = _follow(api)
    assert code == 0, stderr
    assert _shown_answer(stdout) == ANSWER
    assert stdout.count("Agent: ") == 1


def test_a_stream_missing_words_in_the_middle_reprints_the_recorded_answer(stand_in: list[StandIn]) -> None:
    deltas = [w + " " for w in WORDS[:25]] + [w + " " for w in WORDS[40:]]
    api = StandIn(_answer_events(deltas))
    stand_in.append(api)
    api.start()
    code, stdout, stderr = _follow(api)
    assert code == 0, stderr
    assert "Part of the streamed answer was lost" in stderr
    assert _shown_answer(stdout) == ANSWER  # the last answer shown is the whole one


def test_a_whole_stream_shows_nothing_twice(stand_in: list[StandIn]) -> None:
    """Parts joined differently by the record (white space) are not a difference."""
    api = StandIn(_answer_events(["Hello", " world.\n", "Bye"], output="Hello world.\n\nBye"))
    stand_in.append(api)
    api.start()
    code, stdout, stderr = _follow(api)
    assert code == 0, stderr
    assert stdout.count("Hello") == 1 and stdout.count("Bye") == 1
    assert "lost" not in stderr


def test_execution_logs_replay_fills_in_from_the_record() -> None:
    """`stigmer execution logs` (no -f) shows stored events through the same view."""
    shown = io.StringIO()
    view = run_cmd.StreamView(Out(stdout=shown, stderr=io.StringIO()), quiet=False)
    for kind, data in _answer_events(["1 2 3 "]):
        if view.handle(kind, data):
            view.summary()
            break
    assert _shown_answer(shown.getvalue()) == ANSWER


@pytest.mark.parametrize(
    ("shown", "answer", "rest"),
    [
        ("1 2 3", "1 2 3 4 5", " 4 5"),
        ("", "hi", "hi"),
        ("1 2 3 4", "1 2 3 4", ""),
        ("1 2 3 4 and more", "1 2 3 4", ""),
        ("Hello world.\n", "Hello world.\n\nBye", "\nBye"),
        ("1 2 3 ", "1 2 3 4", "4"),
        ("1 2 5", "1 2 3 4 5", None),
    ],
)
def test_rest_of(shown: str, answer: str, rest: str | None) -> None:
    assert run_cmd.rest_of(shown, answer) == rest


# -- a token removed while the server runs --------------------------------------------------------------
def test_a_refused_token_is_unauthorized_with_the_repair(stand_in: list[StandIn]) -> None:
    api = StandIn(_answer_events(["x"]))
    stand_in.append(api)
    api.start()
    with pytest.raises(StigmerError) as e:
        ApiClient(api.url, "an-old-token").get(f"/v1/executions/{EXEC}")
    assert e.value.code is ErrorCode.UNAUTHORIZED and e.value.exit_code == 11
    assert "stigmer server" in e.value.hint and "api.token" in e.value.hint
    with pytest.raises(StigmerError) as e:  # the event stream too: never retried as "not running"
        list(ApiClient(api.url, "an-old-token").events(f"/v1/executions/{EXEC}/events"))
    assert e.value.code is ErrorCode.UNAUTHORIZED


def test_follow_goes_on_with_a_repaired_token(stand_in: list[StandIn], isolated_home: Paths) -> None:
    """`stigmer server` repaired the token (the API restarted with a new one) while `logs -f` followed:
    it reads the new token from the file and goes on; a token that did not change is an error at once."""
    api = StandIn(_answer_events(["one ", "two"]))
    stand_in.append(api)
    api.start()
    out = Out(io.StringIO(), io.StringIO())
    with pytest.raises(StigmerError) as e:
        run_cmd.follow(ApiClient(api.url, "the-old-token"), EXEC, out, cancel_on_interrupt=False)
    assert e.value.code is ErrorCode.UNAUTHORIZED
    isolated_home.home.mkdir(parents=True, exist_ok=True)
    (isolated_home.home / "api.token").write_text(TOKEN)
    client = ApiClient(api.url, "the-old-token")
    assert run_cmd.follow(client, EXEC, out, cancel_on_interrupt=False) == 0
    assert client.token == TOKEN


def test_a_missing_token_file_is_unauthorized_not_not_running(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stigmer.server import control
    from stigmer.server import state as st

    st.write(isolated_home, st.DaemonState(pid=1, started=time.time(), api_url="http://127.0.0.1:9"))
    monkeypatch.setattr(control, "is_running", lambda _paths: True)
    with pytest.raises(StigmerError) as e:
        control.api(isolated_home)
    assert e.value.code is ErrorCode.UNAUTHORIZED
    assert str(isolated_home.home / "api.token") in e.value.message and "missing" in e.value.message
    assert "stigmer server" in e.value.hint


@pytest.mark.usefixtures("stop_server")
def test_stigmer_server_repairs_a_removed_token(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault 6 for real: api.token removed while everything runs. Commands say unauthorized (not "not
    running"); `stigmer server` writes a new token and has the API restarted with it; the old token no
    longer opens the API, and a missing file never did."""
    from tests.conftest import run_cli

    env = {
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "2048",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = run_cli("server", timeout=240)
    assert r.returncode == 0, r.stderr
    token_file = isolated_home.home / "api.token"
    old = token_file.read_text().strip()
    token_file.unlink()

    r = run_cli("execution", "list")
    assert r.returncode == 11, (r.returncode, r.stdout, r.stderr)
    assert "api.token" in r.stderr and "missing" in r.stderr and "not running" not in r.stderr
    r = run_cli("server", "status")
    assert r.returncode == 11, (r.returncode, r.stdout, r.stderr)
    from stigmer.server import state as st

    state = st.read(isolated_home)
    assert state is not None
    with pytest.raises(StigmerError) as e:  # the running API still wants the old token, no other
        ApiClient(state.api_url, "guess").get("/v1/status")
    assert e.value.code is ErrorCode.UNAUTHORIZED

    r = run_cli("server", timeout=240)
    assert r.returncode == 0, r.stderr
    assert "restarting the API with a new token" in r.stderr
    assert "✓ Ready!" in r.stdout or "Ready!" in r.stdout
    new = token_file.read_text().strip()
    assert new and new != old
    assert token_file.stat().st_mode & 0o777 == 0o600
    r = run_cli("execution", "list")
    assert r.returncode == 0, r.stderr
    with pytest.raises(StigmerError) as e:
        ApiClient(state.api_url, old).get("/v1/status")
    assert e.value.code is ErrorCode.UNAUTHORIZED
    assert isinstance(ApiClient(state.api_url, new).get("/v1/status"), dict)


def test_the_reconnect_notice_names_no_secret(stand_in: list[StandIn]) -> None:
    """The notices and errors of a lost server carry the address, never the token."""
    api = StandIn(_answer_events(["one ", "two"]), drop_after=3, down=0.5)
    stand_in.append(api)
    api.start()
    code, _stdout, stderr = _follow(api)
    assert code == 0 and TOKEN not in stderr


@pytest.mark.usefixtures("stop_server")
def test_run_rides_out_a_killed_api_for_real(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Fault 2 for real: the API killed (-9) while `stigmer run` streams an answer of the built-in engine.
    The daemon restarts it; the command reconnects from the last event, says so on stderr, ends with
    exit 0, and the answer it shows ends as the record's does, none of it missing."""
    import os
    import signal
    import subprocess

    from tests.conftest import run_cli, stigmer_exe
    from tests.doubles.engine import starter

    starter()  # skips without the starter model
    for k, v in {
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "2048",
    }.items():
        monkeypatch.setenv(k, v)
    r = run_cli("server", timeout=240)
    assert r.returncode == 0, r.stderr
    agent = tmp_path / "long.yaml"
    agent.write_text(
        "name: long\ninstructions: You write long, detailed stories.\ntemperature: 0\nmax_tokens: 120\n"
    )
    assert run_cli("agent", "apply", "-f", str(agent)).returncode == 0
    status = json.loads(run_cli("server", "status", "--json").stdout)
    api_pid = int(status["services"]["server"]["pid"])

    proc = subprocess.Popen(
        [*stigmer_exe(), "run", "long", "-m", "Tell me a story about a lighthouse."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + 120
        while b"Agent: " not in seen or len(seen.split(b"Agent: ", 1)[1]) < 40:
            assert time.monotonic() < deadline, seen
            chunk = os.read(proc.stdout.fileno(), 256)
            assert chunk, (seen, proc.stderr.read() if proc.stderr else b"")
            seen += chunk
        os.kill(api_pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout, stderr = (seen + rest).decode(), err.decode()
    assert proc.returncode == 0, (stdout, stderr)
    assert "Lost the Stigmer server" in stderr
    assert "✅ Execution completed" in stdout
    exec_id = json.loads(run_cli("execution", "list", "--json").stdout)[0]["id"]
    record = json.loads(run_cli("execution", "get", exec_id, "--json").stdout)
    assert record["state"] == "COMPLETED"
    shown = stdout.rsplit("Agent: ", 1)[1].split("\n✅", 1)[0]
    assert "".join(shown.split()) == "".join(str(record["output"]).split())

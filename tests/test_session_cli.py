"""The CLI side of conversations (issue 15): `stigmer run --session NAME` / `-c` and `stigmer session
list|get|rm|fork`, against a stand-in API on a real socket (127.0.0.1) that speaks the sessions contract:

- POST /v1/executions {"agent"?, "message", "session"?, "continue"?} -> 201 the record with "session", "turn"
- GET /v1/sessions[?agent=A], GET|DELETE /v1/sessions/NAME, POST /v1/sessions/NAME/fork {"at"?, "name"?}
- errors as {"error": {"code", "message", "hint"}}: invalid_input 400, busy 409, not_found 404.

The CLI runs in this process (cli.main.main), pointed at the stand-in by a server record in STIGMER_HOME
(its API address) and api.token; only "is the daemon alive" is answered by the test.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from stigmer.cli import main as cli_main
from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.archives import free_port

TOKEN = "session-test-token"
NAME_RULE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Sessions:
    """The stand-in API: sessions in memory, each turn an execution that completes at once (its events
    are pending, started, the answer, completed). `busy`: a session whose turn is running."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.executions: dict[str, dict[str, Any]] = {}
        self.busy: dict[str, str] = {}  # session -> the execution running in it
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body)
        self.clock = time.time()
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what the server would store ---------------------------------------------------------------------
    def add(self, name: str, agent: str, turns: list[tuple[str, str]], **extra: Any) -> None:
        made = self.sessions[name] = {
            "name": name, "agent": agent, "turns": [], "created": self.clock - 7200,
            "updated": self.clock - 300, "forked_from": None, "forked_at": None, **extra,
        }  # fmt: skip
        for message, output in turns:
            self._turn(made, message, output)

    def _turn(self, session: dict[str, Any], message: str, output: str) -> dict[str, Any]:
        n = len(session["turns"]) + 1
        exec_id = f"ex-{session['name'][:8]}{n:04d}"
        record = {
            "id": exec_id, "agent": session["agent"], "state": "COMPLETED", "message": message,
            "output": output, "session": session["name"], "turn": n, "duration": 0.5, "model": "m",
            "provider": "p", "attempts": 1, "tool_calls": 0, "messages": [], "created": self.clock,
            "usage": {"input_tokens": 3, "output_tokens": 2},
        }  # fmt: skip
        self.executions[exec_id] = record
        session["turns"].append(
            {
                "turn": n,
                "execution_id": exec_id,
                "state": "COMPLETED",
                "message": message,
                "output": output,
                "created": self.clock,
            }
        )
        session["updated"] = self.clock = self.clock + 1
        return record

    def summary(self, s: dict[str, Any]) -> dict[str, Any]:
        last = s["turns"][-1] if s["turns"] else None
        return {
            "name": s["name"], "agent": s["agent"], "turns": len(s["turns"]), "created": s["created"],
            "updated": s["updated"], "last_execution": last and last["execution_id"],
            "last_state": last and last["state"], "forked_from": s["forked_from"], "forked_at": s["forked_at"],
        }  # fmt: skip

    # -- the routes ---------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        url = urlsplit(path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        with self._lock:
            self.requests.append((method, path, body))
            if method == "POST" and parts == ["v1", "executions"]:
                return self._run(body)
            if parts == ["v1", "sessions"] and method == "GET":
                agent = parse_qs(url.query).get("agent", [None])[0]
                rows = sorted(self.sessions.values(), key=lambda s: -s["updated"])
                return 200, [self.summary(s) for s in rows if agent in (None, s["agent"])]
            if parts[:2] == ["v1", "sessions"] and len(parts) >= 3:
                session = self.sessions.get(parts[2])
                if session is None:
                    return _error(404, "not_found", f"No session named {parts[2]}.")
                if method == "GET" and len(parts) == 3:
                    return 200, {**self.summary(session), "turns": session["turns"]}
                if method == "DELETE" and len(parts) == 3:
                    if parts[2] in self.busy:
                        return _busy(parts[2], self.busy[parts[2]])
                    del self.sessions[parts[2]]
                    return 200, {"removed": parts[2]}
                if method == "POST" and parts[3:] == ["fork"]:
                    return self._fork(session, body)
            if method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "executions"]:
                return 200, self.executions[parts[2]]
        return _error(404, "not_found", "no such path")

    def _run(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = body.get("session")
        if body.get("continue"):
            if not self.sessions:
                return _error(404, "not_found", "There is no session to continue yet.")
            name = max(self.sessions.values(), key=lambda s: s["updated"])["name"]
        if name is None:  # a one-shot execution, as before sessions
            exec_id = f"ex-oneshot{len(self.executions):04d}"
            record = {
                "id": exec_id, "agent": body.get("agent"), "state": "COMPLETED", "output": "Hello!",
                "session": None, "turn": None, "duration": 0.5, "model": "m", "provider": "p",
                "attempts": 1, "tool_calls": 0, "messages": [],
            }  # fmt: skip
            self.executions[exec_id] = record
            return 201, record
        if not NAME_RULE.fullmatch(name):
            return _error(
                400, "invalid_input", "A session name is letters, digits, - and _, up to 64 characters."
            )
        session = self.sessions.get(name)
        if session is None:
            self.add(name, body.get("agent") or "default", [])
            session = self.sessions[name]
        elif body.get("agent") not in (None, session["agent"]):
            return _error(
                400, "invalid_input", f"Session {name} is with agent {session['agent']}, not {body['agent']}."
            )
        if name in self.busy:
            return _busy(name, self.busy[name])
        return 201, self._turn(session, body["message"], f"Answer {len(session['turns']) + 1}")

    def _fork(self, session: dict[str, Any], body: dict[str, Any]) -> tuple[int, Any]:
        count = len(session["turns"])
        at = body.get("at", count)
        if not 1 <= at <= count:
            return _error(
                400, "invalid_input", f"Session {session['name']} has turns 1 to {count}; not {at}."
            )
        new = body.get("name") or f"{session['name']}-fork-1"
        self.sessions[new] = {
            **session, "name": new, "turns": [dict(t) for t in session["turns"][:at]],
            "forked_from": session["name"], "forked_at": at, "created": self.clock, "updated": self.clock,
        }  # fmt: skip
        return 201, self.summary(self.sessions[new])

    def events(self, exec_id: str) -> list[tuple[str, dict[str, Any]]]:
        record = self.executions[exec_id]
        return [
            ("pending", {"agent": record["agent"]}),
            ("started", {"model": "m", "provider": "p"}),
            ("delta", {"text": record["output"]}),
            ("completed", {"record": record}),
        ]

    # -- the socket ---------------------------------------------------------------------------------------
    def start(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _do(self, method: str) -> None:
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._send(401, {"error": {"code": "unauthorized", "message": "bad token"}})
                    return
                if method == "GET" and self.path.endswith("/events"):
                    self._stream(self.path.split("/")[3])
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                self._send(*api.handle(method, self.path, body))

            def _stream(self, exec_id: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for seq, (kind, data) in enumerate(api.events(exec_id), 1):
                    self.wfile.write(f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode())
                self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                self._do("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._do("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._do("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def bodies(self, method: str, path: str) -> list[Any]:
        return [b for m, p, b in self.requests if m == method and p == path]


def _error(status: int, code: str, message: str) -> tuple[int, Any]:
    return status, {"error": {"code": code, "message": message, "hint": ""}}


def _busy(name: str, exec_id: str) -> tuple[int, Any]:
    return _error(409, "busy", f"Session {name} has a turn running: execution {exec_id}.")


@pytest.fixture
def api(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sessions]:
    """The stand-in, and STIGMER_HOME pointing the CLI at it: the server's record names its address and
    api.token holds its token; the daemon counts as alive."""
    from stigmer.server import control
    from stigmer.server import state as st

    stand_in = Sessions()
    stand_in.start()
    isolated_home.home.mkdir(parents=True, exist_ok=True)
    (isolated_home.home / "api.token").write_text(TOKEN)
    st.write(
        isolated_home,
        st.DaemonState(pid=1, started=time.time(), api_url=stand_in.url, phase=st.PHASE_READY),
    )
    monkeypatch.setattr(control, "is_running", lambda _paths: True)
    yield stand_in
    stand_in.stop()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`stigmer ARGS` in this process: its exit code, stdout and stderr."""
    capsys.readouterr()
    try:
        code = cli_main.main(list(args))
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# -- stigmer run --session / -c -------------------------------------------------------------------------------
def test_run_with_a_session_sends_it_and_shows_the_turn(
    api: Sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "run", "--session", "chat-1", "-m", "Hello")
    assert code == 0, err
    assert api.bodies("POST", "/v1/executions") == [{"message": "Hello", "session": "chat-1"}]
    assert "Agent: Answer 1" in out and "Session: chat-1 (turn 1)" in out
    code, out, err = cli(capsys, "run", "default", "--session", "chat-1", "-m", "And then?")
    assert code == 0, err
    assert api.bodies("POST", "/v1/executions")[-1] == {
        "agent": "default",
        "message": "And then?",
        "session": "chat-1",
    }
    assert "Session: chat-1 (turn 2)" in out


def test_run_continue_sends_continue(api: Sessions, capsys: pytest.CaptureFixture[str]) -> None:
    api.add("older", "default", [("a", "b")])
    api.add("recent", "poet", [("c", "d"), ("e", "f")])
    code, out, err = cli(capsys, "run", "-c", "-m", "More")
    assert code == 0, err
    assert api.bodies("POST", "/v1/executions") == [{"message": "More", "continue": True}]
    assert "Session: recent (turn 3)" in out
    code, out, err = cli(capsys, "run", "--continue", "--json", "-m", "Again")
    assert code == 0, err
    record = json.loads(out)
    assert record["session"] == "recent" and record["turn"] == 4


def test_run_without_a_session_is_as_before(api: Sessions, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "run", "-m", "hi")
    assert code == 0, err
    assert api.bodies("POST", "/v1/executions") == [{"agent": "default", "message": "hi"}]
    assert "Session:" not in out and "Execution completed" in out
    code, out, _err = cli(capsys, "run", "poet", "-m", "hi", "--detach")
    assert code == 0 and out.strip().startswith("ex-oneshot")
    assert api.bodies("POST", "/v1/executions")[-1] == {"agent": "poet", "message": "hi"}


def test_session_and_continue_together_are_a_usage_error() -> None:
    r = run_cli("run", "--session", "a", "-c", "-m", "hi")
    assert r.returncode == 2, r.stderr
    assert "not allowed with" in r.stderr and r.stdout == ""


def test_continue_with_no_session_yet_is_not_found(api: Sessions, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = cli(capsys, "run", "-c", "-m", "hi")
    assert code == 6 and "no session to continue" in err


def test_a_bad_session_name_exits_2_with_the_rule(api: Sessions, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "run", "--session", "no spaces/here", "-m", "hi")
    assert code == 2, err
    assert "letters, digits, - and _" in err and out == ""
    code, _out, err = cli(capsys, "run", "--session", "bad name", "--json", "-m", "hi")
    assert code == 2 and json.loads(err)["error"]["code"] == "invalid_input"


def test_another_agent_than_the_sessions_exits_2(api: Sessions, capsys: pytest.CaptureFixture[str]) -> None:
    api.add("poems", "poet", [("a", "b")])
    code, _out, err = cli(capsys, "run", "coder", "--session", "poems", "-m", "hi")
    assert code == 2 and "with agent poet, not coder" in err


def test_a_busy_session_exits_7_naming_the_running_execution(
    api: Sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    api.add("chat", "default", [("a", "b")])
    api.busy["chat"] = "ex-running0001"
    code, _out, err = cli(capsys, "run", "--session", "chat", "-m", "hi")
    assert code == 7 and "ex-running0001" in err
    code, _out, err = cli(capsys, "session", "rm", "chat")
    assert code == 7 and "ex-running0001" in err
    assert "chat" in api.sessions


# -- stigmer session list / get / rm / fork -------------------------------------------------------------------
def test_session_list_table_and_json(api: Sessions, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = cli(capsys, "session", "list")
    assert code == 0 and "No sessions yet" in out
    api.add("older", "default", [("a", "b")])
    api.add("poems", "poet", [("c", "d"), ("e", "f")])
    code, out, err = cli(capsys, "session", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "AGENT", "TURNS", "LAST", "USED", "LAST", "STATE"]
    assert lines[1].split()[:3] == ["poems", "poet", "2"] and lines[1].endswith("COMPLETED")
    assert lines[2].split()[:3] == ["older", "default", "1"]  # most recently used first
    assert "ago" in lines[1] or "just now" in lines[1]
    code, out, _err = cli(capsys, "session", "list", "--agent", "poet", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["poems"] and rows[0]["turns"] == 2
    assert ("GET", "/v1/sessions?agent=poet", None) in api.requests


def test_session_get_shows_the_transcript_turn_by_turn(
    api: Sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    api.add("chat", "poet", [("Write a poem", "Roses are red,\nviolets are blue"), ("Shorter", "Red.")])
    code, out, err = cli(capsys, "session", "get", "chat")
    assert code == 0, err
    assert "Session chat" in out and "Agent:    poet" in out and "Turns:    2" in out
    first, second = out.index("Turn 1  ex-chat0001  COMPLETED"), out.index("Turn 2  ex-chat0002  COMPLETED")
    assert first < out.index("You:   Write a poem") < out.index("Agent: Roses are red,") < second
    assert "         violets are blue" in out  # further lines under the first
    assert out.index("You:   Shorter") > second and "Agent: Red." in out
    code, out, _err = cli(capsys, "session", "get", "chat", "--json")
    data = json.loads(out)
    assert code == 0 and [t["execution_id"] for t in data["turns"]] == ["ex-chat0001", "ex-chat0002"]
    code, _out, err = cli(capsys, "session", "get", "nobody")
    assert code == 6 and "No session named nobody" in err


def test_control_characters_in_a_transcript_are_escaped(
    api: Sessions, capsys: pytest.CaptureFixture[str]
) -> None:
    api.add("evil", "default", [("hi\x1b]0;pwned\x07", "ok\x1b[2J\u202egnp.exe\r\nbye")])
    code, out, err = cli(capsys, "session", "get", "evil")
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    assert "hi\\x1b]0;pwned\\x07" in out and "ok\\x1b[2J\\u202egnp.exe" in out and "bye" in out


def test_session_rm(api: Sessions, capsys: pytest.CaptureFixture[str]) -> None:
    api.add("chat", "default", [("a", "b")])
    code, out, err = cli(capsys, "session", "rm", "chat")
    assert code == 0, err
    assert "Session chat removed" in out and "chat" not in api.sessions
    code, _out, err = cli(capsys, "session", "rm", "chat")
    assert code == 6 and "No session named chat" in err


def test_session_fork(api: Sessions, capsys: pytest.CaptureFixture[str]) -> None:
    api.add("chat", "default", [("a", "b"), ("c", "d"), ("e", "f")])
    code, out, err = cli(capsys, "session", "fork", "chat")
    assert code == 0, err
    assert api.bodies("POST", "/v1/sessions/chat/fork") == [{}]
    assert "Session chat-fork-1 forked from chat at turn 3" in out
    assert "stigmer run --session chat-fork-1" in out
    code, out, err = cli(capsys, "session", "fork", "chat", "--at", "1", "--name", "branch", "--json")
    assert code == 0, err
    assert api.bodies("POST", "/v1/sessions/chat/fork")[-1] == {"at": 1, "name": "branch"}
    new = json.loads(out)
    assert new["name"] == "branch" and new["forked_from"] == "chat" and new["turns"] == 1
    assert len(api.sessions["chat"]["turns"]) == 3  # the original untouched
    code, _out, err = cli(capsys, "session", "fork", "chat", "--at", "9")
    assert code == 2 and "turns 1 to 3" in err
    code, _out, err = cli(capsys, "session", "fork", "chat", "--at", "x")
    assert code == 2 and "invalid int value" in err

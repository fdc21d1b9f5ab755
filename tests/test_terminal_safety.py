"""What a model, a tool or a stored record says reaches the terminal as text, never as commands to it:
`\\e]0;TITLE\\a\\e[2J` retitled the window and cleared the screen. Escape sequences, the other control
characters and the bidi overrides are shown escaped by `run`, `execution logs`, `execution get`,
`agent get`/`list` and `server logs`; newlines and tabs stay; --json stays exact JSON."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from stigmer.cli import run_cmd
from stigmer.cli.render import Out, terminal_safe
from stigmer.paths import Paths

HOSTILE = "Hi\x1b]0;TITLE\x07\x1b[2J\tthere\n\u202etxt.exe\x9b31m\x00\x7f\r\nend"
SHOWN = "Hi\\x1b]0;TITLE\\x07\\x1b[2J\tthere\n\\u202etxt.exe\\x9b31m\\x00\\x7f\nend"


def _has_controls(text: str) -> bool:
    return any(
        (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0 or 0x202A <= ord(c) <= 0x202E
        for c in text
    )


class _Buffer(io.StringIO):
    def isatty(self) -> bool:
        return True  # a terminal: what is printed is what it would act on


def test_terminal_safe_escapes_controls_and_keeps_text() -> None:
    assert terminal_safe(HOSTILE) == SHOWN
    assert not _has_controls(terminal_safe(HOSTILE))
    kept = "Ünïcode ✓ ▶️ 日本語 emoji 🤖, tabs\tand\nnewlines, عربي"
    assert terminal_safe(kept) == kept
    assert (
        terminal_safe("\u2066isolate\u2069 \u202aembed\u202c") == "\\u2066isolate\\u2069 \\u202aembed\\u202c"
    )


def test_streamed_text_and_tool_output_are_shown_escaped() -> None:
    buf = _Buffer()
    view = run_cmd.StreamView(Out(stdout=buf, stderr=buf), quiet=False)
    view.handle("started", {"model": "m\x1b[2J", "provider": "p"})
    view.handle("delta", {"text": "Hi\x1b"})  # a sequence split across two pieces of the stream
    view.handle("delta", {"text": "]0;TITLE\x07 there"})
    view.handle("tool_call", {"name": "shell", "args": {"argv": ["echo", "\x1b[2J"]}})
    view.handle("tool_result", {"content": "out\x1b[31m\u202ered"})
    view.handle("approval_required", {"name": "shell\x1b[1A", "args": {}})
    view.handle("failed", {"record": {"state": "FAILED", "error": "boom\x1b]0;x\x07"}})
    view.summary()
    text = buf.getvalue()
    assert not _has_controls(text), repr(text)
    assert "Hi\\x1b]0;TITLE\\x07 there" in text
    assert "out\\x1b[31m\\u202ered" in text and "boom\\x1b]0;x\\x07" in text


class _Api:
    def __init__(self, record: dict[str, Any], events: list[tuple[str, dict[str, Any]]]) -> None:
        self.record, self._events = record, events

    def get(self, path: str) -> Any:
        return self.record

    def events(self, path: str, last_event_id: str | None = None) -> Iterator[tuple[str, str, str]]:
        for i, (kind, data) in enumerate(self._events, 1):
            yield str(i), kind, json.dumps(data)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> _Api:
    record = {
        "id": "ex1",
        "state": "COMPLETED",
        "agent": "poet",
        "model": "m",
        "error": "",
        "duration": 1.0,
        "messages": [{"role": "assistant", "content": HOSTILE}],
        "approvals": [{"tool": "shell\x1b[2J", "args": {"x": "\u202e"}}],
    }
    events = [("started", {"model": "m", "provider": "p"}), ("delta", {"text": HOSTILE})]
    events.append(("completed", {"record": record}))
    fake = _Api(record, events)
    monkeypatch.setattr(run_cmd, "_api", lambda **_kw: fake)
    return fake


def test_execution_logs_and_get_show_record_text_escaped(
    api: _Api, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cmd.execution_logs(argparse.Namespace(id="ex1", follow=False))
    logs = capsys.readouterr().out
    assert SHOWN in logs and not _has_controls(logs)
    run_cmd.execution_get(argparse.Namespace(id="ex1", json=False))
    got = capsys.readouterr().out
    assert "[assistant] " + SHOWN in got and not _has_controls(got)


def test_agent_get_and_list_show_agent_text_escaped(api: _Api, capsys: pytest.CaptureFixture[str]) -> None:
    agent = {"name": "poet", "instructions": "Be\x1b]0;pwned\x07 nice\u202e", "model": None}
    api.record = agent
    run_cmd.agent_get(argparse.Namespace(name="poet", json=False))
    shown = capsys.readouterr().out
    assert "poet" in shown and not _has_controls(shown), repr(shown)
    api.record = [agent]  # type: ignore[assignment]
    run_cmd.agent_list(argparse.Namespace(json=False))
    listed = capsys.readouterr().out
    assert "Be\\x1b]0;pwned\\x07 nice\\u202e" in listed and not _has_controls(listed)


def test_json_output_stays_exact_json(api: _Api, capsys: pytest.CaptureFixture[str]) -> None:
    agent = {"name": "poet", "instructions": HOSTILE}
    api.record = agent
    run_cmd.agent_get(argparse.Namespace(name="poet", json=True))
    out = capsys.readouterr().out
    assert json.loads(out) == agent  # every character, as it is stored
    assert not _has_controls(out)  # JSON escapes them itself (\u001b)
    buf = _Buffer()
    view = run_cmd.StreamView(Out(stdout=buf, stderr=buf), quiet=True)  # `run --json` prints the record only
    view.handle("delta", {"text": HOSTILE})
    assert buf.getvalue() == ""


def test_server_logs_are_shown_escaped(isolated_home: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    from stigmer.cli import server_cmd

    isolated_home.ensure(isolated_home.logs_dir)
    isolated_home.log_file("agent-runner").write_text("mcp server said \x1b]0;TITLE\x07\x1b[2J\n")
    isolated_home.log_file("server").write_text("fine\n")
    server_cmd.logs(argparse.Namespace(component=None, lines=10, follow=False))
    out = capsys.readouterr().out
    assert "[agent-runner] mcp server said \\x1b]0;TITLE\\x07\\x1b[2J" in out and not _has_controls(out)


def test_errors_quoting_foreign_text_are_shown_escaped() -> None:
    buf = _Buffer()
    Out(stdout=buf, stderr=buf).error("The registry said: \x1b]0;TITLE\x07", "Try\x1b[2J again.\nLater.")
    assert buf.getvalue() == "✗ Error: The registry said: \\x1b]0;TITLE\\x07\n\nTry\\x1b[2J again.\nLater.\n"

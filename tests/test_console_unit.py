"""The web console's door without a server: sign-in links expire, sessions idle out, CSRF tokens are
tied to their session, a change needs the console's own origin and the token; the headers on every
answer; which paths are the console's; an agent file's error line."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from stigmer.console import door, views
from stigmer.server.api import temporal_ui

ORIGIN = "http://127.0.0.1:7234"


def test_sign_in_links_expire_after_two_minutes_and_sessions_after_12_idle_hours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(temporal_ui.time, "monotonic", lambda: now[0])
    sessions = door.new_sessions()
    late, in_time = sessions.link(), sessions.link()
    now[0] += 119
    session = sessions.redeem(in_time)
    assert session is not None and sessions.valid(session)
    assert sessions.redeem(in_time) is None  # once
    now[0] += 2
    assert sessions.redeem(late) is None  # 121 s after it was made
    now[0] += 12 * 3600 - 3
    assert sessions.valid(session)  # used 12 h less a second after it was last: the clock starts again
    now[0] += 12 * 3600 + 1
    assert not sessions.valid(session)
    assert sessions.set_cookie("s").startswith("stigmer_console=s; HttpOnly; SameSite=Strict; Path=/;")


def test_each_door_has_its_own_sessions_and_cookie() -> None:
    console, ui = door.new_sessions(), temporal_ui.Sessions()
    assert console.cookie != ui.cookie and console.cookie.startswith(temporal_ui.STIGMER_COOKIES)
    session = console.redeem(console.link())
    assert session is not None and not ui.valid(session) and ui.redeem(console.link()) is None


def _request(method: str, headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request(
        {"type": "http", "method": method, "path": "/ui/api/chat", "headers": raw, "query_string": b""}
    )


def test_a_change_needs_the_console_s_origin_and_the_session_s_token() -> None:
    gate = door.Door(door.new_sessions(), 7234)
    session = gate.sessions.redeem(gate.sessions.link())
    assert session is not None
    token = gate.sessions.csrf(session)
    ok: dict[str, str] = {"Origin": ORIGIN, "X-CSRF-Token": token}
    assert gate.write_refusal(_request("POST", ok), session) is None
    assert (
        gate.write_refusal(
            _request("POST", {"Sec-Fetch-Site": "same-origin", "X-CSRF-Token": token}), session
        )
        is None
    )
    assert gate.write_refusal(_request("POST", {"Origin": ORIGIN}), session, form_token=token) is None
    refused: list[dict[str, str]] = [
        {"Origin": "http://127.0.0.1:8080", "X-CSRF-Token": token},  # another port: the same site
        {"Origin": "http://localhost:7234", "X-CSRF-Token": token},
        {"Origin": "null", "X-CSRF-Token": token},
        {"Sec-Fetch-Site": "same-site", "X-CSRF-Token": token},
        {"X-CSRF-Token": token},  # neither Origin nor Sec-Fetch-Site
        {"Origin": ORIGIN},
        {"Origin": ORIGIN, "X-CSRF-Token": gate.sessions.csrf("another session")},
    ]
    for headers in refused:
        assert gate.write_refusal(_request("POST", headers), session) is not None, headers


def _call(app: Any, path: str, headers: dict[str, str]) -> tuple[int, dict[bytes, bytes]]:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"a=1",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])


def test_every_answer_carries_the_headers_and_localhost_goes_to_127_0_0_1() -> None:
    async def inner(_scope: Any, _receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x-frame-options", b"SAMEORIGIN")]}
        )
        await send({"type": "http.response.body", "body": b""})

    secured = door.Secured(inner, port=7234)
    status, headers = _call(secured, "/ui/chat", {"host": "127.0.0.1:7234"})
    assert status == 200 and headers[b"x-frame-options"] == b"DENY"  # ours, never the inner one's
    assert b"unsafe" not in headers[b"content-security-policy"]
    assert headers[b"referrer-policy"] == b"no-referrer" and headers[b"x-content-type-options"] == b"nosniff"
    status, headers = _call(secured, "/ui/chat", {"host": "localhost:7234"})
    assert status == 307 and headers[b"location"] == b"http://127.0.0.1:7234/ui/chat?a=1"


def test_the_console_s_paths_never_take_the_api_s() -> None:
    for path in ("/", "/ui", "/ui/chat", "/ui/api/overview", "/ui/static/app.js"):
        assert door.is_console_path(path)
    for path in ("/health", "/v1/status", "/v1/console/signin", "/uix", "/v1/ui/x"):
        assert not door.is_console_path(path)


def test_an_agent_file_s_error_names_its_line() -> None:
    from stigmer.agents.spec import parse_yaml
    from stigmer.errors import StigmerError

    for text, line in (
        ("name: a\ntemperature: 9\n", 2),
        ("name: a\n  bad: [\n", 2),
        ("name: a\nfoo: 1\n", 2),
    ):
        with pytest.raises(StigmerError) as e:
            parse_yaml(text, views.AGENT_SOURCE)
        assert views.error_line(e.value.message) == line, e.value.message
    assert views.error_line("agent: an agent file is a mapping") is None


def test_a_pull_started_from_the_console_keeps_its_progress_and_its_end(
    monkeypatch: pytest.MonkeyPatch, isolated_home: Any
) -> None:
    """The Models page's pulls: the LLM core does the work in a thread; the page reads snapshots."""
    import time

    from stigmer.config import store
    from stigmer.console.models import Pulls
    from stigmer.errors import ErrorCode, StigmerError
    from stigmer.events import Event
    from stigmer.llm import active, catalog_ops

    def fake_pull(
        _provider: Any, model: str, report: Any, *, force: bool, command: str, notices: Any
    ) -> None:
        notices(Event("notice", f"fit checked ({'forced' if force else 'not forced'})"))
        for done in (0, 50, 100):
            report(Event("Pulling", f"pulling {model}", key="blob", done=done, total=100))
        if model == "bad:1b":
            raise StigmerError("No such model.", hint="Look at the name.", code=ErrorCode.MODEL_NOT_FOUND)

    monkeypatch.setattr(catalog_ops, "pull", fake_pull)
    monkeypatch.setattr(active, "provider", lambda *_a: object())
    pulls = Pulls(store.load(isolated_home), isolated_home)
    good = pulls.start("qwen2.5:0.5b", force=True)
    assert pulls.start("qwen2.5:0.5b", force=True) is good or good.state != "running"  # one at a time
    bad = pulls.start("bad:1b", force=False)
    deadline = time.monotonic() + 10
    while "running" in (good.state, bad.state) and time.monotonic() < deadline:
        time.sleep(0.02)
    snap = pulls.get(good.id).snapshot()
    assert snap["state"] == "done" and snap["messages"] == ["fit checked (forced)"]
    assert snap["bars"] == [{"message": "pulling qwen2.5:0.5b", "done": 100, "total": 100}]
    failed = pulls.get(bad.id).snapshot()
    assert failed["state"] == "failed" and failed["error"]["code"] == "model_not_found"
    with pytest.raises(StigmerError):
        pulls.start("not a name!", force=False)  # refused before any thread
    with pytest.raises(StigmerError):
        pulls.get("nothing")

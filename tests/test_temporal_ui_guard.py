"""The door to Temporal's Web UI (server/api/temporal_ui.py) as pure ASGI: what it lets through and what
it refuses, and the sign-in link's and session's lifetimes (the clock moved, not waited for)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from stigmer.server.api import temporal_ui as ui

PORT = 18233


def _call(
    guard: ui.TemporalUiGuard, path: str, headers: dict[str, str], method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    path, _, query = path.partition("?")
    scope = {
        "type": "http", "method": method, "path": path, "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()], "server": ("127.0.0.1", PORT),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    asyncio.run(guard(scope, receive, send))
    start = sent[0]
    head = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], head, b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def guard() -> ui.TemporalUiGuard:
    return ui.TemporalUiGuard(port=PORT, internal_port=lambda: 0, sessions=ui.Sessions(), key=os.urandom(32))


HOST = {"Host": f"127.0.0.1:{PORT}"}


@pytest.mark.parametrize(
    "host",
    [
        f"evil.example:{PORT}",
        "evil.example",
        f"127.0.0.1:{PORT + 1}",
        f"127.0.0.1.nip.io:{PORT}",
        f"[::1]:{PORT}",
    ],
)
def test_a_foreign_host_is_refused(guard: ui.TemporalUiGuard, host: str) -> None:
    status, _, _ = _call(guard, "/", {"Host": host})
    assert status == 403


def test_localhost_is_sent_to_the_one_origin(guard: ui.TemporalUiGuard) -> None:
    status, head, _ = _call(guard, "/namespaces?x=1", {"Host": f"localhost:{PORT}"})
    assert status == 307 and head["location"] == f"http://127.0.0.1:{PORT}/namespaces?x=1"


@pytest.mark.parametrize(
    "origin", [f"http://localhost:{PORT}", "http://127.0.0.1:3000", "null", "https://evil.example"]
)
def test_another_origin_is_refused_even_on_this_machine(guard: ui.TemporalUiGuard, origin: str) -> None:
    status, _, _ = _call(guard, "/codec/decode", {**HOST, "Origin": origin}, method="POST")
    assert status == 403


def test_a_link_works_once_and_only_for_two_minutes(
    guard: ui.TemporalUiGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(ui.time, "monotonic", lambda: now[0])
    token = guard.sessions.link()
    status, head, _ = _call(guard, f"{ui.SIGNIN_PATH}?t={token}", HOST)
    assert status == 303 and head["set-cookie"].startswith(ui.COOKIE + "=")
    assert _call(guard, f"{ui.SIGNIN_PATH}?t={token}", HOST)[0] == 403  # used
    late = guard.sessions.link()
    now[0] += ui.LINK_TTL + 1
    assert _call(guard, f"{ui.SIGNIN_PATH}?t={late}", HOST)[0] == 403  # expired
    assert _call(guard, f"{ui.SIGNIN_PATH}?t=guessed", HOST)[0] == 403


def test_a_session_ends_after_twelve_idle_hours(
    guard: ui.TemporalUiGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(ui.time, "monotonic", lambda: now[0])
    session = guard.sessions.redeem(guard.sessions.link())
    assert session is not None
    cookie = {**HOST, "Cookie": f"other=1; {ui.COOKIE}={session}"}
    assert _call(guard, "/", cookie)[0] == 503  # signed in: on to the UI (not running in this test)
    now[0] += ui.SESSION_IDLE - 60
    assert _call(guard, "/", cookie)[0] == 503  # used again: the idle time starts over
    now[0] += ui.SESSION_IDLE + 1
    status, _, body = _call(guard, "/", {**cookie, "Accept": "text/html"})
    assert status == 401 and b"stigmer server temporal-ui" in body

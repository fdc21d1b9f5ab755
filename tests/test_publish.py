"""The worker's event publisher against a real HTTP stand-in of the API's worker route: slow, down for a
while, or taking a batch and losing its answer (as an API killed -9 after it committed)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stigmer.paths import Paths
from stigmer.runner import publish


class _Events(BaseHTTPRequestHandler):
    """Stores batches once per batch id, as the API does; `down` answers 503 that many times; `lose`
    stores that many batches and then drops the connection without answering."""

    received: list[dict] = []  # noqa: RUF012 - shared by the test's server only
    batches: list[str] = []  # noqa: RUF012
    posts = 0
    delay = 0.0
    down = 0
    lose = 0
    token = ""
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/runner/executions/exec-1/events"
        assert self.headers["Authorization"] == f"Bearer {self.token}" and body["ticket"] == "tk"
        time.sleep(self.delay)  # a busy API: the publisher closes while this POST is in flight
        with self.lock:
            type(self).posts += 1
            if self.down > 0:
                type(self).down -= 1
                self.send_response(503)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            if body["batch"] not in self.batches:
                self.batches.append(body["batch"])
                self.received.extend(body["events"])
            if self.lose > 0:
                type(self).lose -= 1
                self.connection.shutdown(2)  # stored, but the answer never comes
                return
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def api(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Events]]:
    from stigmer.server.keys import ensure_keys, worker_token

    ensure_keys(isolated_home)  # what the worker sends, as the server's API wants it
    _Events.received, _Events.batches = [], []
    _Events.posts = _Events.down = _Events.lose = 0
    _Events.delay = 0.0
    _Events.token = worker_token(isolated_home) or ""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Events)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(publish.API_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(publish, "_client", None)
    try:
        yield _Events
    finally:
        server.shutdown()
        server.server_close()


def _publish(words: list[str], pause: float = 0.005) -> None:
    async def attempt() -> None:
        async with publish.Publisher("exec-1", "tk", attempt=1) as pub:
            pub.event("attempt")
            for w in words:
                pub.text(w)
                await asyncio.sleep(pause)  # tokens arriving while batches are in flight
        client = publish._client
        if client is not None:
            await client.aclose()

    asyncio.run(attempt())


def _text(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta")


def test_closing_never_cuts_off_a_batch_in_flight(api: type[_Events]) -> None:
    api.delay = 0.15
    words = [f"w{i} " for i in range(40)]
    _publish(words)
    events = api.received
    assert events[0]["type"] == "attempt" and all(e["attempt"] == 1 for e in events)
    assert _text(events) == "".join(words)  # every delta, in order: none lost when the attempt ended
    assert len(events) < len(words)  # and they went in batches, not one POST each


def test_an_api_that_is_down_for_a_while_gets_everything_in_order(api: type[_Events]) -> None:
    api.down = 6  # a supervised restart of the API: refused, then back
    words = [f"w{i} " for i in range(30)]
    _publish(words)
    assert _text(api.received) == "".join(words)  # nothing missing, nothing twice
    assert api.posts > len(api.batches)  # it did have to send again


def test_a_batch_whose_answer_was_lost_is_stored_once(api: type[_Events]) -> None:
    api.lose = 2  # the API stored the batch and died before answering
    words = [f"w{i} " for i in range(30)]
    _publish(words)
    assert _text(api.received) == "".join(words)  # resent under the same batch id: not doubled
    assert api.posts > len(api.batches)

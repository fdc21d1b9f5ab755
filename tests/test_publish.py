"""The worker's event publisher against a real (slow) HTTP stand-in of the API's events endpoint."""

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


class _SlowEvents(BaseHTTPRequestHandler):
    received: list[dict] = []  # noqa: RUF012 - shared by the test's server only
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.headers["Authorization"].startswith("Bearer ") and len(self.headers["Authorization"]) > 20
        time.sleep(0.15)  # a busy API: the publisher closes while this POST is in flight
        with self.lock:
            self.received.extend(body["events"])
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def api(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_SlowEvents]]:
    from stigmer.server.token import ensure_token

    ensure_token(isolated_home)  # what the worker sends, as the server's API wants it
    _SlowEvents.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowEvents)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(publish.API_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(publish, "_client", None)
    try:
        yield _SlowEvents
    finally:
        server.shutdown()
        server.server_close()


def test_closing_never_cuts_off_a_batch_in_flight(api: type[_SlowEvents]) -> None:
    words = [f"w{i} " for i in range(40)]

    async def attempt() -> None:
        async with publish.Publisher("exec-1", attempt=1) as pub:
            pub.event("attempt")
            for w in words:
                pub.text(w)
                await asyncio.sleep(0.005)  # tokens arriving while batches are in flight
        client = publish._client
        if client is not None:
            await client.aclose()

    asyncio.run(attempt())
    events = api.received
    assert events[0]["type"] == "attempt" and all(e["attempt"] == 1 for e in events)
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == "".join(words)  # every delta, in order: none lost when the attempt ended
    assert len(events) < len(words)  # and they went in batches, not one POST each

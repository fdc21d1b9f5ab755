"""A deadline for each request head on our uvicorn servers (the API, the built-in engine's guard).

uvicorn closes a keep-alive connection that stays idle after an answer (`timeout_keep_alive`), but
nothing else: a connection that never sends its request, or sends part of its head and stops, is kept
open for good (h11 and httptools alike; the keep-alive timer is armed only after an answer, and any
byte received disarms it). Enough of them use up the process's file descriptors.

`with_head_deadline()` is uvicorn's own HTTP protocol class with one addition: from the moment a
connection opens, and from the first byte of each later request on it, the whole request head must
arrive within HEAD_TIMEOUT seconds, or the connection is closed. A request whose head has arrived is
the application's (a long answer, a stream), as before.
"""

from __future__ import annotations

import asyncio
import math
import os
from typing import Any

HEAD_TIMEOUT = 15.0  # seconds; a local client sends its head at once
ENV = "STIGMER_HTTP_HEAD_TIMEOUT"  # tests lower it


def head_timeout() -> float:
    """HEAD_TIMEOUT, or a positive number of seconds from STIGMER_HTTP_HEAD_TIMEOUT."""
    try:
        value = float(os.environ.get(ENV, "") or HEAD_TIMEOUT)
    except ValueError:
        return HEAD_TIMEOUT
    return value if value > 0 and math.isfinite(value) else HEAD_TIMEOUT


def with_head_deadline(seconds: float | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) closing connections whose request
    head does not arrive within `seconds` (default: head_timeout()). Pass it as uvicorn.Config(http=)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limit = head_timeout() if seconds is None else seconds
    base: Any = AutoHTTPProtocol

    class HeadDeadline(base):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._awaiting_head():
                self._disarm()  # the head is complete: the request is the application's now
            elif self._head_timer is None:
                self._arm()  # the first bytes of a next request on a kept-alive connection

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle until the next request: uvicorn's keep-alive timeout applies

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _awaiting_head(self) -> bool:
            cycle = self.cycle
            return cycle is None or bool(cycle.response_complete)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(limit, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            self._head_timer = None
            if self._awaiting_head() and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline

"""When a download tries again, and how long it waits: one policy for every downloader.

The single-stream download (net.download), the ranged one (net.parts) and small files (net.fetch) all
decide with these functions which failures are worth another try and sleep the same capped exponential
back-off. How attempts are counted stays with each downloader: a single stream counts every try of one
call; a ranged part counts only tries that made no progress, so a slow but moving link never gives up.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
import urllib.error
from dataclasses import dataclass
from http.client import HTTPException

# 408 (request timeout), 429 (rate limit) and every 5xx say "not now", not "never".
TRANSIENT_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # tries before giving up (as Ollama does per part)
    first_delay: float = 1.0  # seconds after the first failure, doubled after each next one
    max_delay: float = 30.0  # the cap: a long outage is polled, not waited out for minutes

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (1-based)."""
        return float(min(self.max_delay, self.first_delay * 2 ** max(0, attempt - 1)))

    def wait(self, attempt: int, *, stop: threading.Event | None = None) -> None:
        """Sleep the back-off of `attempt`; returns early when `stop` is set (a cancelled transfer)."""
        delay = self.delay(attempt)
        if stop is None:
            time.sleep(delay)
        else:
            stop.wait(delay)


# What downloads use unless a caller passes its own; read at each call so that tests can swap it.
DOWNLOADS = RetryPolicy()


def current(policy: RetryPolicy | None = None) -> RetryPolicy:
    return policy if policy is not None else DOWNLOADS


def transient_status(status: int) -> bool:
    """An HTTP answer that may be different on the next try."""
    return status >= 500 or status in TRANSIENT_STATUSES


# Failures of a connection or of a body in flight: a dropped link, a reset, a stall, a short body.
# urllib.error.URLError is an OSError; HTTPException covers IncompleteRead and RemoteDisconnected.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, HTTPException)


def is_unreachable(exc: BaseException) -> bool:
    """Nothing answered at all: refused, unresolvable host, no route, or no connection within the timeout.

    Seen on the first request of a call, this ends the call at once (as NetworkUnreachable) instead of
    being retried: offline, waiting helps nobody, and the offline fallback should start without delay.
    """
    if isinstance(exc, urllib.error.HTTPError):
        return False
    # urllib wraps what happens while connecting in URLError; a bare timeout came later (no answer yet).
    connecting = isinstance(exc, urllib.error.URLError)
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError | socket.gaierror):
        return True
    if connecting and isinstance(reason, TimeoutError):
        return True
    return isinstance(reason, OSError) and reason.errno in _NO_ROUTE


_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})

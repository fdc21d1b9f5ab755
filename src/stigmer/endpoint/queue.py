"""The fair queue in front of the local LLM: at most `slots` requests in flight to the engine, the others
wait their turn, and past `max_waiting` waiters a request is refused at once (429 with Retry-After).

Turns go round-robin between callers (an API key's name, or "admin") and first-come first-served within
one caller: an agent that sends fifty requests delays another client's next one by at most one request
per slot, not fifty. A caller whose request was just let through goes to the back of the round.

`slots` is what the engine runs at once (the built-in engine: one; Ollama: OLLAMA_NUM_PARALLEL). Sending
it more buys nothing: the engine queues them itself, first come first served, and a waiting request
holds a connection to it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

log = logging.getLogger(__name__)

DEFAULT_HOLD = 10.0  # seconds a request holds the engine, until some have been seen (a few hundred tokens)
SMOOTHING = 0.2  # weight of the newest request in the running mean of that time
MAX_RETRY_AFTER = 600


class QueueFull(Exception):
    """More requests wait than the queue takes; `retry_after` is an estimate in whole seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are waiting for the local LLM")
        self.waiting = waiting
        self.retry_after = retry_after


class Slot:
    """A turn at the engine; release() (once, or more: the later calls do nothing) lets the next one in."""

    def __init__(self, queue: FairQueue) -> None:
        self._queue: FairQueue | None = queue
        self._since = time.monotonic()

    def release(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            queue._done(time.monotonic() - self._since)


class FairQueue:
    def __init__(self, *, slots: int, max_waiting: int) -> None:
        self.slots = max(1, slots)
        self.max_waiting = max(0, max_waiting)
        self.hold = DEFAULT_HOLD  # running mean of the seconds a request holds a slot
        self._active = 0
        self._waiting = 0
        # caller -> its waiters, oldest first; the dict's order is the round (the next caller first)
        self._rounds: dict[str, deque[asyncio.Future[None]]] = {}

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    def configure(self, *, slots: int, max_waiting: int) -> None:
        """New limits (the settings changed): more slots let waiters in at once; fewer take effect as
        requests finish."""
        self.slots = max(1, slots)
        self.max_waiting = max(0, max_waiting)
        self._grant()

    def retry_after(self) -> int:
        """When a place in the queue should open: the mean time a request holds the engine, spread over
        its slots. Not when the request would be served: a retry waits its turn like any other."""
        return min(MAX_RETRY_AFTER, max(1, math.ceil(self.hold / self.slots)))

    def try_acquire(self) -> Slot | None:
        """A turn now if one is free and nobody waits (no task to watch the client with), else None."""
        if self._active < self.slots and not self._waiting:
            self._active += 1
            return Slot(self)
        return None

    async def acquire(self, caller: str) -> Slot:
        """Wait for a turn. QueueFull at once when `max_waiting` already wait. Cancelled (the client went
        away), the waiter leaves the queue, and a turn granted meanwhile goes to the next one."""
        now = self.try_acquire()
        if now is not None:
            return now
        if self._waiting >= self.max_waiting:
            log.info(
                "local LLM queue full (%d waiting, %d in flight): %s refused",
                self._waiting,
                self._active,
                caller,
            )
            raise QueueFull(self._waiting, self.retry_after())
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rounds.setdefault(caller, deque()).append(turn)
        self._waiting += 1
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # let in just as its client left: pass it on
                self._done(None)
            else:
                self._leave(caller, turn)
            raise
        return Slot(self)

    def _leave(self, caller: str, turn: asyncio.Future[None]) -> None:
        waiters = self._rounds.get(caller)
        if waiters is None or turn not in waiters:
            return  # already taken off by _grant (a cancelled turn is skipped there)
        waiters.remove(turn)
        self._waiting -= 1
        if not waiters:
            del self._rounds[caller]

    def _done(self, held: float | None) -> None:
        self._active -= 1
        if held is not None:
            self.hold += SMOOTHING * (held - self.hold)
        self._grant()

    def _grant(self) -> None:
        while self._active < self.slots and self._rounds:
            caller = next(iter(self._rounds))
            waiters = self._rounds.pop(caller)
            turn = waiters.popleft()
            self._waiting -= 1
            if waiters:
                self._rounds[caller] = waiters  # the back of the round
            if turn.done():  # cancelled, its task not yet resumed to leave
                continue
            turn.set_result(None)
            self._active += 1

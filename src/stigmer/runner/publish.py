"""The worker's side of the Stigmer API: one HTTP client with the worker token (server/keys.py) for
saying hello, claiming executions, sending what they do as it happens, and reading decisions. A worker on
another machine reaches the API the same way (STIGMER_API_URL, STIGMER_WORKER_TOKEN).

Measured here: an activity that POSTs chunks to the API, which fans them out as server-sent events, adds
~50 ms to the first token; each POST costs the worker and the API CPU that the engine needs on the same
cores, so text deltas are coalesced into batches, at most one every BATCH_SECONDS. The first event goes
out at once. A batch the API did not take (it is restarting, say) is kept and sent again, in order, under
the same batch id, so a resend after a lost answer is stored once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from typing import Any

from stigmer.errors import ErrorCode, StigmerError

log = logging.getLogger(__name__)

BATCH_SECONDS = 0.05
RESEND_FOR = float(os.environ.get("STIGMER_RUNNER_RESEND_SECONDS") or 60)  # an API restart takes seconds
API_URL_ENV = "STIGMER_API_URL"  # a worker elsewhere: the server's address, e.g. http://10.0.0.5:7234

_client: Any = None


def api_url() -> str:
    if os.environ.get(API_URL_ENV):
        return os.environ[API_URL_ENV].rstrip("/")
    from stigmer.config import store
    from stigmer.paths import Paths

    return f"http://127.0.0.1:{store.load(Paths.from_env()).server.port}"


def _http() -> Any:
    """One client per worker process (activities share the worker's event loop)."""
    global _client
    if _client is None:
        import httpx

        from stigmer.paths import Paths
        from stigmer.server.keys import worker_token

        token = worker_token(Paths.from_env()) or "none"  # `hello` says when there is none
        _client = httpx.AsyncClient(
            base_url=api_url(), headers={"Authorization": f"Bearer {token}"}, timeout=10, trust_env=False
        )
    return _client


class Refused(Exception):
    """The API answered no (4xx): sending again would not change it."""


async def call(path: str, body: dict[str, Any]) -> Any:
    """POST to a worker route; the API's JSON error becomes Refused (4xx) or an exception to retry."""
    resp = await _http().post(f"/v1/runner{path}", json=body)
    if resp.status_code < 400:
        return resp.json()
    try:
        message = resp.json()["error"]["message"]
    except Exception:  # noqa: BLE001 - whatever answered, say what it said
        message = resp.text[:200]
    if resp.status_code < 500:
        raise Refused(f"HTTP {resp.status_code}: {message}")
    raise RuntimeError(f"HTTP {resp.status_code}: {message}")


async def hello() -> dict[str, Any]:
    """Check the API's address and this worker's token before polling: a clear error for each."""
    import httpx

    from stigmer.paths import Paths
    from stigmer.server.keys import WORKER_TOKEN_ENV, worker_token

    url = api_url()
    if not worker_token(Paths.from_env()):
        raise StigmerError(
            "This worker has no worker token, so the Stigmer API at " + url + " refused this worker's token.",
            hint=f"Give the worker the server's $STIGMER_HOME/worker.token in {WORKER_TOKEN_ENV}.",
            code=ErrorCode.UNAUTHORIZED,
        )
    try:
        resp = await _http().get("/v1/runner/hello")
    except httpx.HTTPError as e:
        raise StigmerError(
            f"The Stigmer API at {url} cannot be reached ({type(e).__name__}: {e}).",
            hint=f"Start the server (stigmer server), or set {API_URL_ENV} to its address.",
            code=ErrorCode.NOT_RUNNING,
        ) from None
    if resp.status_code == 401:
        raise StigmerError(
            f"The Stigmer API at {url} refused this worker's token.",
            hint="Give the worker the server's $STIGMER_HOME/worker.token in STIGMER_WORKER_TOKEN.",
            code=ErrorCode.UNAUTHORIZED,
        )
    try:
        data: dict[str, Any] = resp.json()
        assert resp.status_code == 200 and "key_id" in data
    except Exception:  # noqa: BLE001 - not our API at all
        raise StigmerError(
            f"What answers at {url} is not a Stigmer API (HTTP {resp.status_code}).",
            hint=f"Set {API_URL_ENV} to the Stigmer server's address (http://HOST:7234).",
            code=ErrorCode.CONFIG_INVALID,
        ) from None
    return data


async def post_events(
    execution_id: str, ticket: str, events: list[dict[str, Any]], *, batch: str | None = None
) -> bool:
    """Deliver events once; False when it should be tried again (the API did not answer). An API that
    refuses them (a wrong ticket, an execution that ended) is logged: sending again would not help."""
    try:
        await call(f"/executions/{execution_id}/events", {"ticket": ticket, "events": events, "batch": batch})
        return True
    except Refused as e:
        log.warning("the API refused events for %s: %s", execution_id, e)
        return True
    except Exception as e:  # noqa: BLE001 - down or restarting: the caller sends again
        log.warning("could not send events for %s to the API: %s", execution_id, e)
        return False


async def deliver(execution_id: str, ticket: str, events: list[dict[str, Any]]) -> None:
    """Send events that must arrive (an approval request): again and again, for up to RESEND_FOR."""
    batch = secrets.token_hex(8)
    delay = 0.2
    deadline = asyncio.get_running_loop().time() + RESEND_FOR
    while not await post_events(execution_id, ticket, events, batch=batch):
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the Stigmer API did not take the events of {execution_id}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


class Publisher:
    """Collects events of one activity attempt and sends them in batches, in order, from a background
    task. A batch the API did not take is sent again (same id) before anything newer; closing waits
    for what is in flight and sends what is left, for up to RESEND_FOR: a batch is never cut off."""

    def __init__(self, execution_id: str, ticket: str, attempt: int) -> None:
        self.execution_id = execution_id
        self.ticket = ticket
        self.attempt = attempt
        self.prefix = secrets.token_hex(6)  # this attempt's batches: <prefix>-<n>
        self.sent = 0
        self.buffer: list[dict[str, Any]] = []
        self.unsent: tuple[str, list[dict[str, Any]]] | None = None  # a batch waiting to be sent again
        self.wake = asyncio.Event()
        self.closing = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def text(self, delta: str) -> None:
        if not delta:
            return
        if self.buffer and self.buffer[-1]["type"] == "delta":
            self.buffer[-1]["text"] += delta  # coalesce within a batch
        else:
            self.event("delta", text=delta)

    def event(self, kind: str, **data: Any) -> None:
        self.buffer.append({"type": kind, "attempt": self.attempt, **data})
        self.wake.set()

    async def _flush(self) -> bool:
        """Send the batch waiting to be resent, else the buffer; False when the API did not take it."""
        if self.unsent is None:
            if not self.buffer:
                return True
            self.sent += 1
            self.unsent = (f"{self.prefix}-{self.sent}", self.buffer)
            self.buffer = []
        key, batch = self.unsent
        if not await post_events(self.execution_id, self.ticket, batch, batch=key):
            return False
        self.unsent = None
        return True

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        deadline: float | None = None
        while True:
            await self.wake.wait()
            self.wake.clear()
            ok = await self._flush()
            if ok:
                delay = 0.1
                if self.buffer:
                    self.wake.set()  # what came while that batch was being sent
            else:
                self.wake.set()
                if self.closing.is_set():
                    deadline = deadline or loop.time() + RESEND_FOR
                    if loop.time() > deadline:
                        log.error(
                            "gave up sending %d events of %s: the API did not take them for %.0f s",
                            len(self.buffer) + len(self.unsent[1] if self.unsent else []),
                            self.execution_id,
                            RESEND_FOR,
                        )
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self.closing.is_set() and self.unsent is None and not self.buffer:
                return
            try:  # at most one batch per BATCH_SECONDS; closing ends the pause at once
                await asyncio.wait_for(self.closing.wait(), BATCH_SECONDS)
            except TimeoutError:
                pass

    async def __aenter__(self) -> Publisher:
        self.task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Not cancel(): a POST cut off in flight loses its batch (seen as a streamed answer with a hole).
        assert self.task is not None
        self.closing.set()
        self.wake.set()
        await self.task

"""Sending what an execution does to the Stigmer API as it happens: batched events over HTTP with the
API's token (a worker on another machine reaches it the same way).

Measured here: an activity that POSTs chunks to the API, which fans them out as server-sent events, adds
~50 ms to the first token; each POST costs the worker and the API CPU that the engine needs on the same
cores, so text deltas are coalesced into batches, at most one every BATCH_SECONDS. The first event goes
out at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

BATCH_SECONDS = 0.05
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
        from stigmer.server.token import read_token

        token = read_token(Paths.from_env()) or ""
        _client = httpx.AsyncClient(
            base_url=api_url(), headers={"Authorization": f"Bearer {token}"}, timeout=10, trust_env=False
        )
    return _client


async def post_events(execution_id: str, events: list[dict[str, Any]]) -> None:
    """Deliver events; a failure is logged, never raised: a lost chunk must not fail the model call
    (the stored result comes from the workflow, not from these events)."""
    try:
        resp = await _http().post(f"/v1/executions/{execution_id}/events", json={"events": events})
        if resp.status_code >= 400:
            log.warning(
                "the API refused events for %s: HTTP %s %s", execution_id, resp.status_code, resp.text[:200]
            )
    except Exception as e:  # noqa: BLE001 - see above
        log.warning("could not send events for %s to the API: %s", execution_id, e)


class Publisher:
    """Collects events of one activity attempt and sends them in batches, in order, from a background
    task. Closing waits for the batch in flight and sends what is left: a batch is never cut off."""

    def __init__(self, execution_id: str, attempt: int) -> None:
        self.execution_id = execution_id
        self.attempt = attempt
        self.buffer: list[dict[str, Any]] = []
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

    async def _flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            await post_events(self.execution_id, batch)

    async def _loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            await self._flush()
            if self.closing.is_set():
                await self._flush()  # what came while the last batch was being sent
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

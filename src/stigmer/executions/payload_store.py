"""Where the payload codec's claim check keeps large payloads (codec.py): the sealed (encrypted) bytes,
under their sha256, so what is stored is no more readable than what Temporal would have held.

Two stores behind one protocol: in the API process, the payloads table of data/stigmer.db; in a worker,
the API over HTTP (/v1/runner/payloads, with the worker token), so a worker on another machine needs
nothing more than it has. Both refuse bytes whose sha256 is not their ref, and payloads over MAX_PAYLOAD.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stigmer.server.db import Database

MAX_PAYLOAD = 8 * 1024 * 1024  # Temporal itself refuses a payload over 2 MB; a message is at most 1 MB
REF = re.compile(r"[0-9a-f]{64}")
# How long a worker keeps trying an API that does not answer (restarting, say) before the codec fails
# the activity or workflow task; Temporal then retries it.
PATIENCE = float(os.environ.get("STIGMER_PAYLOAD_STORE_PATIENCE") or 10)


class PayloadStore(Protocol):
    async def put(self, ref: str, data: bytes) -> None: ...

    async def get(self, ref: str) -> bytes: ...


class PayloadMissing(LookupError):
    """A reference the store does not have."""


class PayloadRefused(ValueError):
    """Bytes a store will not keep: too large, or not what the ref says."""


def ref_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(ref: str, data: bytes) -> None:
    """Refuse a malformed ref, bytes that are not the ref's, or too many bytes."""
    if not REF.fullmatch(ref):
        raise PayloadRefused(f"{ref[:80]!r} is not a payload reference (64 lowercase hex digits)")
    if len(data) > MAX_PAYLOAD:
        raise PayloadRefused(
            f"a payload of {len(data) / 1024 / 1024:.1f} MB is larger than the {MAX_PAYLOAD // 1024 // 1024} MB "
            "Stigmer stores"
        )
    if ref_of(data) != ref:
        raise PayloadRefused(f"the bytes given for payload {ref} have another sha256")


class MemoryStore:
    """For tests: a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def put(self, ref: str, data: bytes) -> None:
        check(ref, data)
        self.data[ref] = bytes(data)

    async def get(self, ref: str) -> bytes:
        try:
            return self.data[ref]
        except KeyError:
            raise PayloadMissing(f"payload {ref} is not in the store") from None


class DatabaseStore:
    """The API process's store: the payloads table of its database (used directly, off the event loop)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def put(self, ref: str, data: bytes) -> None:
        check(ref, data)
        await asyncio.to_thread(self.db.put_payload, ref, data)

    async def get(self, ref: str) -> bytes:
        data = await asyncio.to_thread(self.db.get_payload, ref) if REF.fullmatch(ref) else None
        if data is None:
            raise PayloadMissing(f"payload {ref[:80]} is not in the Stigmer database (data/stigmer.db)")
        return data


class HttpStore:
    """A worker's store: the API's /v1/runner/payloads routes, with the worker's client and token. An API
    that does not answer (or answers 5xx) is tried again for up to PATIENCE seconds, then the error is
    raised: the codec fails the task and Temporal retries it. A 4xx is raised at once."""

    async def put(self, ref: str, data: bytes) -> None:
        check(ref, data)
        await self._request(
            "POST",
            "/v1/runner/payloads",
            params={"ref": ref},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    async def get(self, ref: str) -> bytes:
        if not REF.fullmatch(ref):
            raise PayloadMissing(f"{ref[:80]!r} is not a payload reference")
        resp = await self._request("GET", f"/v1/runner/payloads/{ref}")
        return bytes(resp.content)

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        from stigmer.runner.publish import _http, api_url

        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        delay = 0.2
        while True:
            try:
                resp = await _http().request(method, path, timeout=30, **kwargs)
                if resp.status_code < 500:
                    break
                why = f"HTTP {resp.status_code}: {_message(resp)}"
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}"
            if loop.time() > deadline:
                raise RuntimeError(f"the Stigmer API at {api_url()} did not answer for payloads ({why})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if resp.status_code == 404 and method == "GET":
            raise PayloadMissing(f"payload {path.rsplit('/', 1)[-1]} is not in the Stigmer API's store")
        if resp.status_code >= 400:
            raise PayloadRefused(
                f"the Stigmer API refused a payload: HTTP {resp.status_code}: {_message(resp)}"
            )
        return resp


def _message(resp: Any) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except Exception:  # noqa: BLE001 - whatever answered, say what it said
        return str(resp.text[:200])


_local: DatabaseStore | None = None


def resolve(store: Any) -> PayloadStore | None:
    """What temporal_client.connect(store=...) was given, as a store: a PayloadStore as is; the API's
    Database as its payloads table (kept as this process's store, for the Web UI's codec endpoint);
    "api" as the worker's (the API over HTTP); None as no claim check."""
    global _local
    from stigmer.server.db import Database

    if isinstance(store, Database):
        _local = DatabaseStore(store)
        return _local
    if store == "api":
        return HttpStore()
    if store is None or (hasattr(store, "put") and hasattr(store, "get")):
        return store  # type: ignore[no-any-return]
    raise TypeError(f"not a payload store: {store!r}")


def local() -> DatabaseStore:
    """The API process's store: the one its Temporal client uses, else one on STIGMER_HOME's database
    (the Web UI can ask to decode before the API has connected to Temporal)."""
    global _local
    if _local is None:
        from stigmer.paths import Paths
        from stigmer.server.db import Database

        _local = DatabaseStore(Database(Paths.from_env().data_dir / "stigmer.db"))
    return _local

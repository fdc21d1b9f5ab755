"""The CLI's client of the Stigmer server API: http.client (light to import, no proxies: the API is on
this machine), the bearer token from $STIGMER_HOME/api.token, errors turned back into StigmerError.

The CLI never imports temporalio: everything it asks of Temporal goes through this API.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stigmer.errors import ErrorCode, StigmerError

STREAM_IDLE = 60.0  # seconds without a byte on an event stream (4 keep-alives missed): the server is gone


@dataclass
class ApiClient:
    base_url: str  # http://127.0.0.1:7234
    token: str = field(repr=False)
    timeout: float = 10.0

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        parts = urlsplit(self.base_url)
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Accept": "application/json", **(extra or {})}

    def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        conn = self._connect(timeout or self.timeout)
        try:
            conn.connect()
        except OSError as e:  # refused: nothing of the request was sent, so it may be sent again
            conn.close()
            raise not_reachable(self.base_url, e, sent=False) from None
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = self._headers({"Content-Type": "application/json"} if data is not None else None)
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise not_reachable(self.base_url, e) from None
        finally:
            conn.close()
        return self._decode(resp.status, raw)

    def _decode(self, status: int, raw: bytes) -> Any:
        if status == 401:
            raise unauthorized(self.base_url)
        return _decode(status, raw)

    def get(self, path: str, *, timeout: float | None = None) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        return self.request("POST", path, body if body is not None else {}, timeout=timeout)

    def events(
        self, path: str, *, last_event_id: str | None = None, on_open: Callable[[], None] | None = None
    ) -> Iterator[tuple[str, str, str]]:
        """Server-sent events from `path` as (id, event, data), until the server ends the stream.
        `on_open` is called once the server has accepted the stream (before any event). The server sends
        a keep-alive comment every 15 s (its answer itself may wait that long for a first event): a
        stream silent for STREAM_IDLE seconds is a lost server (NOT_RUNNING), not one to wait on forever."""
        conn = self._connect(STREAM_IDLE)
        headers = self._headers({"Accept": "text/event-stream"})
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                self._decode(resp.status, resp.read())
            if on_open is not None:
                on_open()
            event_id, event = "", "message"
            data: list[str] = []
            while True:
                line = resp.readline()
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if not text:
                    if data:
                        yield event_id, event, "\n".join(data)
                    event, data = "message", []
                elif text.startswith(":"):
                    continue  # a keep-alive comment
                else:
                    name, _, value = text.partition(":")
                    value = value.removeprefix(" ")
                    if name == "id":
                        event_id = value
                    elif name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)
        except (OSError, http.client.HTTPException) as e:
            raise not_reachable(self.base_url, e) from None
        finally:
            conn.close()


def _decode(status: int, raw: bytes) -> Any:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if 200 <= status < 300:
        return data
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        raise StigmerError(
            str(err.get("message") or f"HTTP {status}"),
            hint=str(err.get("hint") or ""),
            code=ErrorCode.from_code(str(err.get("code") or "")),
        )
    raise StigmerError(
        f"The Stigmer server answered HTTP {status}.",
        hint="See its log: stigmer server logs -c server",
        code=ErrorCode.INTERNAL,
    )


def unauthorized(base_url: str) -> StigmerError:
    """HTTP 401 from our own server: the token this command sent is not the one the API runs with."""
    from stigmer.server.token import ENV

    if os.environ.get(ENV):
        hint = f"{ENV} is set in this environment and the server does not accept it: correct it or unset it."
    else:
        hint = (
            "The token in $STIGMER_HOME/api.token is not the one the server runs with (the file was replaced "
            "or removed while it ran). Repair it with: stigmer server"
        )
    return StigmerError(
        f"The Stigmer server at {base_url} refused this command's API token (unauthorized).",
        hint=hint,
        code=ErrorCode.UNAUTHORIZED,
    )


class NotReachable(StigmerError):
    """The server did not answer. `sent`: False when the connection was refused before any of the request
    went out (sending it again cannot do anything twice)."""

    def __init__(self, message: str, *, hint: str, sent: bool) -> None:
        super().__init__(message, hint=hint, code=ErrorCode.NOT_RUNNING)
        self.sent = sent


def not_reachable(base_url: str, e: BaseException, *, sent: bool = True) -> NotReachable:
    return NotReachable(
        f"The Stigmer server at {base_url} did not answer ({e or type(e).__name__}).",
        hint="Start it with: stigmer server    (its log: stigmer server logs -c server)",
        sent=sent,
    )

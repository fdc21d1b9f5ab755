"""The CLI's client of the Stigmer server API: http.client (light to import, no proxies: the API is on
this machine), the bearer token from $STIGMER_HOME/api.token, errors turned back into StigmerError.

The CLI never imports temporalio: everything it asks of Temporal goes through this API.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stigmer.errors import ErrorCode, StigmerError


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
            data = None if body is None else json.dumps(body).encode()
            headers = self._headers({"Content-Type": "application/json"} if data is not None else None)
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise not_reachable(self.base_url, e) from None
        finally:
            conn.close()
        return _decode(resp.status, raw)

    def get(self, path: str, *, timeout: float | None = None) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        return self.request("POST", path, body if body is not None else {}, timeout=timeout)

    def events(self, path: str, *, last_event_id: str | None = None) -> Iterator[tuple[str, str, str]]:
        """Server-sent events from `path` as (id, event, data), until the server ends the stream."""
        conn = self._connect(None)  # a stream may be quiet for long: no read timeout
        headers = self._headers({"Accept": "text/event-stream"})
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                _decode(resp.status, resp.read())
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


def not_reachable(base_url: str, e: BaseException) -> StigmerError:
    return StigmerError(
        f"The Stigmer server at {base_url} did not answer ({e or type(e).__name__}).",
        hint="Start it with: stigmer server    (its log: stigmer server logs -c server)",
        code=ErrorCode.NOT_RUNNING,
    )

"""The built-in engine's front door: a thin HTTP proxy on the public port, in the engine's own process.

llama.cpp's server cannot refuse a foreign Host header or a cross-origin request, so it listens on an
internal loopback port of its own choosing, behind a random key that only this proxy knows (a web page
that finds the port still cannot use it). The proxy applies net.guard (loopback Host, allowed Origins,
CORS without credentials), then forwards the request with the key and streams the answer back
unbuffered, so SSE token streams arrive chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stigmer.net.guard import LoopbackGuard, Receive, Scope, Send

# Hop-by-hop headers are the proxy's own business; llama.cpp's CORS headers are replaced by the guard's.
_DROP_REQUEST = {b"host", b"authorization", b"connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
_DROP_RESPONSE = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"server"}


class EngineProxy:
    """Pure ASGI app forwarding every request to the internal llama.cpp server."""

    def __init__(self, backend: str, key: str) -> None:
        import httpx

        self.backend = backend.rstrip("/")
        self.key = key
        # No timeout on reading: a long generation streams for minutes; connect fails fast.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import httpx

        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k, v) for k, v in scope.get("headers") or () if k.lower() not in _DROP_REQUEST]
        headers.append((b"authorization", f"Bearer {self.key}".encode()))
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        url = self.backend + path.decode("latin-1") + (("?" + query.decode("latin-1")) if query else "")
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            await _answer(send, 503, b'{"error":{"code":503,"message":"the model is not loaded yet"}}')
            del e
            return
        try:
            out = [
                (k.lower(), v)
                for k, v in response.headers.raw
                if k.lower() not in _DROP_RESPONSE and not k.lower().startswith(b"access-control-")
            ]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def guarded(backend: str, key: str, origins: Sequence[str]) -> Any:
    return LoopbackGuard(EngineProxy(backend, key), allowed_origins=origins, cors=True)

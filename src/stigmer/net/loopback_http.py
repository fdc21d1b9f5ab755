"""A minimal HTTP/1.1 client on asyncio streams for our own servers on loopback, and the ASGI relay that
streams their answers on as they come.

Two hops use it, each carrying every streamed token: the built-in engine's guard to its internal
llama.cpp (llm/llamacpp/proxy.py), and the API's OpenAI-compatible endpoint to the local LLM
(endpoint/relay.py). Its peers are servers of ours on this machine, so it needs no TLS, proxies,
pooling or redirects, and it costs half of httpx's CPU per token: 0.35 against 0.70 ms of the guard's
event loop per streamed token (bench/guard_tokens_per_second.py), 0.23 against 0.47 ms of the API
process (bench/endpoint_tokens.py --httpx). That matters because llama.cpp's threads take every core:
each millisecond a relay runs is a millisecond one decoding thread waits, and with httpx the guarded
stream lost ~5% of the engine's speed.

One request per connection (`Connection: close`): nothing to pool or expire, and closing the connection
is what makes llama.cpp stop a generation whose client went away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from stigmer.net.guard import Receive, Send

CONNECT_TIMEOUT = 5.0  # a server on this machine accepts at once or not at all
RESPONSE_HEAD_LIMIT = 64 * 1024  # llama.cpp's response heads are a few hundred bytes
READ_SIZE = 64 * 1024

# Hop-by-hop headers belong to each connection, not to the answer; CORS headers are the guard's to set
# (llama.cpp answers preflights with Allow-Credentials: true).
_DROP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)


class BackendError(Exception):
    """The server's answer could not be read (closed early, malformed)."""


@dataclass
class Head:
    status: int
    headers: list[tuple[bytes, bytes]]  # for the client: names lower-case, hop-by-hop and CORS left out
    chunked: bool
    length: int | None  # Content-Length, None when absent

    def get(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


async def connect(
    host: str, port: int, *, timeout: float = CONNECT_TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to host:port; OSError or TimeoutError when nothing accepts it."""
    return await asyncio.wait_for(asyncio.open_connection(host, port, limit=RESPONSE_HEAD_LIMIT), timeout)


def request_head(
    method: bytes, target: bytes, host: str, port: int, headers: Iterable[tuple[bytes, bytes]], length: int
) -> bytes:
    """The head of a request with a body of `length` bytes. Host, Content-Length, Connection and
    Accept-Encoding are set here; `headers` must hold none of them, nor CR, LF or NUL."""
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address
    lines = [method + b" " + target + b" HTTP/1.1", f"Host: {shown}:{port}".encode()]
    lines += [k + b": " + v for k, v in headers]
    # identity: compressing on loopback only costs CPU, and a compressed SSE stream would reach the
    # client in compressor-sized lumps rather than token by token.
    lines.append(b"Accept-Encoding: identity")
    lines.append(b"Content-Length: " + str(length).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def read_head(reader: asyncio.StreamReader) -> Head:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise BackendError("the connection closed before a response") from e
    except asyncio.LimitOverrunError as e:
        raise BackendError("the response head is too large") from e
    status_line, *lines = raw[:-4].split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise BackendError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    head = Head(int(code), [], chunked=False, length=None)
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            raise BackendError(f"malformed header line: {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        if name == b"transfer-encoding":
            head.chunked = b"chunked" in value.lower()
        elif name == b"content-length":
            if not value.isdigit():
                raise BackendError(f"bad Content-Length: {value[:40]!r}")
            head.length = int(value)
        if name not in _DROP_RESPONSE and not name.startswith(b"access-control-"):
            head.headers.append((name, value))
    return head


async def read_body(reader: asyncio.StreamReader, method: str, head: Head) -> AsyncIterator[bytes]:
    """The response body as it arrives: de-chunked, or Content-Length bytes, or up to the close."""
    if method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return
    try:
        if head.chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)  # chunk extensions are ignored
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers: none that a client of ours needs
                    return
                chunk = await reader.readexactly(size + 2)
                yield chunk[:-2]
        elif head.length is not None:
            left = head.length
            while left > 0:
                data = await reader.read(min(READ_SIZE, left))
                if not data:
                    raise BackendError(f"the body ended {left} bytes early")
                left -= len(data)
                yield data
        else:
            while data := await reader.read(READ_SIZE):
                yield data
    except asyncio.IncompleteReadError as e:
        raise BackendError("the body ended early") from e
    except (asyncio.LimitOverrunError, ValueError) as e:
        raise BackendError(f"malformed body framing: {e}") from e


async def read_all(body: AsyncIterator[bytes], limit: int) -> bytes:
    """At most `limit` bytes of `body` (an error answer is read whole to be shown, never a large one)."""
    data = bytearray()
    async for chunk in body:
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client goes away. uvicorn drops what is sent after a disconnect without telling
    the app: watch for it instead, or a closed client would keep a generation running to its end.
    Call once the request body has been read (it reads, and drops, whatever else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def relay(body: AsyncIterator[bytes], send: Send, gone: asyncio.Future[None]) -> bool:
    """Send `body` on as it comes, as ASGI body messages, until it ends (then the final message is sent)
    or `gone` completes (the client left: nothing more is sent). True when the client left. An error
    reading `body` is raised once the pump has unwound."""

    async def pump() -> None:
        async for chunk in body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    pumping = asyncio.ensure_future(pump())
    try:
        await asyncio.wait((pumping, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        pumping.cancel()
        await asyncio.wait((pumping,))  # unwound before the caller closes the connection
    error = None if pumping.cancelled() else pumping.exception()
    if error is not None:
        raise error  # a broken stream: uvicorn closes the client's connection mid-response
    return pumping.cancelled()

"""The built-in engine's front door: a thin HTTP proxy on the public port, in the engine's own process.

llama.cpp's server cannot refuse a foreign Host header or a cross-origin request, so it listens on an
internal loopback port of its own choosing, behind a random key that only this process knows (a web
page that finds the port still cannot use it). The public port applies net.guard (loopback Host,
allowed Origins, CORS without credentials), then forwards each request with the key and relays the
answer as it comes, so SSE token streams arrive chunk by chunk.

The internal hop is a minimal HTTP/1.1 client on asyncio streams rather than httpx: its peer is always
the llama.cpp of this process, and per token it costs half the CPU (measured 0.35 against 0.70 ms of
the event loop per streamed token). That matters because llama.cpp's threads take every core: each
millisecond the proxy runs is a millisecond one decoding thread waits, and with httpx the guarded
stream lost ~5% of the engine's speed (bench/guard_tokens_per_second.py).

While the model loads, xllamacpp's constructor holds the GIL (measured: no other Python thread runs
for the whole load), so nothing in this process can answer. LoadingResponder forks a small child that
answers on the public socket meanwhile: 503 like llama.cpp's own /health while loading, 403 for what
the guard refuses. A readiness probe sees 503 then 200, never a connection left hanging.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from stigmer.net.guard import LoopbackGuard, Receive, Scope, Send, refusal, refusal_body

log = logging.getLogger(__name__)

# Hop-by-hop headers belong to each connection, not to the request; whatever key the client sends
# (Authorization, X-Api-Key) is replaced by the internal one; Host, Content-Length, Connection and
# Accept-Encoding of the internal request are ours (see _request_head).
_DROP_REQUEST = frozenset(
    {
        b"host", b"authorization", b"x-api-key", b"content-length", b"connection", b"keep-alive",
        b"proxy-authorization", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"expect", b"accept-encoding",
    }
)  # fmt: skip
# llama.cpp's CORS headers go too (it answers preflights with Allow-Credentials: true): CORS is the guard's.
_DROP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
CONNECT_TIMEOUT = 5.0  # the internal server is in this process: it accepts at once or not at all
RESPONSE_HEAD_LIMIT = 64 * 1024  # llama.cpp's response heads are a few hundred bytes
READ_SIZE = 64 * 1024
LOADING_BODY = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
UNREACHABLE_BODY = b'{"error":{"code":502,"message":"the engine did not answer","type":"server_error"}}'


class BackendError(Exception):
    """The internal server's answer could not be read (closed early, malformed)."""


class EngineProxy:
    """Pure ASGI app forwarding every request to the internal llama.cpp server with its key."""

    def __init__(self, backend: str, key: str) -> None:
        parts = urlsplit(backend)
        if not parts.hostname or not parts.port:
            raise ValueError(f"not an internal server address: {backend}")
        self.host, self.port = parts.hostname, parts.port
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets here
        target: bytes = scope.get("raw_path") or scope["path"].encode()
        if not target.startswith(b"/"):  # an absolute-form target (`GET http://host/ HTTP/1.1`)
            await _answer(send, 400, b'{"error":{"code":400,"message":"bad request target"}}')
            return
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=RESPONSE_HEAD_LIMIT), CONNECT_TIMEOUT
            )
        except (TimeoutError, OSError) as e:
            log.warning("internal engine server unreachable: %s", e)
            await _answer(send, 502, UNREACHABLE_BODY)
            return
        try:
            writer.write(self._request_head(scope, target, len(body)) + bytes(body))
            try:
                head = await _read_head(reader)
            except (OSError, BackendError) as e:
                log.warning("internal engine server gave no answer: %s", e)
                await _answer(send, 502, UNREACHABLE_BODY)
                return
            await send({"type": "http.response.start", "status": head.status, "headers": head.headers})
            await _relay(_body(reader, scope["method"], head), receive, send)
        finally:
            # One connection per request (Connection: close): nothing to pool or expire, and closing
            # it is what makes llama.cpp stop a generation whose client went away.
            writer.close()

    def _request_head(self, scope: Scope, target: bytes, length: int) -> bytes:
        # Method, target and header values come from the server's HTTP parser (h11), which refuses
        # CR, LF and NUL in them: nothing here can split the internal request.
        lines = [scope["method"].encode() + b" " + target + b" HTTP/1.1"]
        lines.append(f"Host: {self.host}:{self.port}".encode())
        lines += [k + b": " + v for k, v in scope["headers"] if k.lower() not in _DROP_REQUEST]
        lines.append(b"Authorization: Bearer " + self.key)
        # identity: compressing on loopback only costs CPU, and a compressed SSE stream would reach
        # the client in compressor-sized lumps rather than token by token.
        lines.append(b"Accept-Encoding: identity")
        lines.append(b"Content-Length: " + str(length).encode())
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass
class _Head:
    status: int
    headers: list[tuple[bytes, bytes]]  # for the client: names lower-case, hop-by-hop and CORS left out
    chunked: bool
    length: int | None  # Content-Length, None when absent


async def _read_head(reader: asyncio.StreamReader) -> _Head:
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
    head = _Head(int(code), [], chunked=False, length=None)
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


async def _body(reader: asyncio.StreamReader, method: str, head: _Head) -> AsyncIterator[bytes]:
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


async def _relay(body: AsyncIterator[bytes], receive: Receive, send: Send) -> None:
    """Send `body` on as it comes, until it ends or the client goes away."""

    async def pump() -> None:
        async for chunk in body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def client_gone() -> None:
        # uvicorn drops what is sent after a disconnect without telling us: watch for it instead,
        # or a closed client would keep a generation running to its end.
        while (await receive())["type"] != "http.disconnect":
            pass

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        pumping.cancel()
        watching.cancel()
        await asyncio.wait((pumping, watching))  # both unwound before the connection is closed
    error = None if pumping.cancelled() else pumping.exception()
    if error is not None:
        raise error  # a broken internal stream: uvicorn closes the client's connection mid-response


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def guarded(backend: str, key: str, origins: Sequence[str]) -> LoopbackGuard:
    """The public app: guard in front of the proxy, with CORS for allowed origins (never credentials)."""
    return LoopbackGuard(EngineProxy(backend, key), allowed_origins=origins, cors=True)


# -- while the model loads ----------------------------------------------------------------------------

REQUEST_HEAD_LIMIT = 16 * 1024  # of a request while loading: only its headers are looked at
CLIENT_TIMEOUT = 1.0  # a client whose request head has not come within this is dropped: one at a time here
DRAIN_LIMIT = 64 * 1024


class LoadingResponder:
    """A forked child answering the public socket until the parent is ready (or gone)."""

    def __init__(self, pid: int, stop_fd: int) -> None:
        self.pid = pid
        self.stop_fd = stop_fd

    @classmethod
    def start(cls, sock: socket.socket, origins: Sequence[str]) -> LoadingResponder | None:
        """Fork the responder; None where there is no fork (Windows: clients wait in the backlog).

        Call before any thread exists (before xllamacpp is imported): forking a threaded process
        copies locks held by threads that do not exist in the child.
        """
        if not hasattr(os, "fork"):
            return None
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 0
            try:
                os.close(write_fd)
                _answer_while_loading(sock, read_fd, tuple(origins))
            except BaseException:  # a forked child must end in os._exit, whatever happened
                code = 1
            finally:
                os._exit(code)
        os.close(read_fd)
        return cls(pid, write_fd)

    def stop(self, timeout: float = 2.0) -> None:
        """Tell the child to finish the request in hand and exit; wait for it (kill it past `timeout`)."""
        os.close(self.stop_fd)  # EOF on the child's end: the same signal it gets if we die
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                return
            time.sleep(0.002)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _answer_while_loading(sock: socket.socket, stop_fd: int, origins: tuple[str, ...]) -> None:
    sock.setblocking(False)  # shared with the parent, whose asyncio server sets the same anyway
    while True:
        readable, _, _ = select.select([sock.fileno(), stop_fd], [], [])
        if stop_fd in readable:  # the parent is ready, or died: either way the port is not ours
            return
        try:
            conn, _addr = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionError):
            continue
        with conn:
            try:
                _answer_one(conn, origins)
            except OSError:
                pass  # that client's problem; keep answering the others


def _answer_one(conn: socket.socket, origins: tuple[str, ...]) -> None:
    deadline = time.monotonic() + CLIENT_TIMEOUT  # for the whole head, not for each piece of it
    head = b""
    while b"\r\n\r\n" not in head and len(head) < REQUEST_HEAD_LIMIT:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        data = conn.recv(4096)
        if not data:
            return
        head += data
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    why = refusal(headers, origins)
    status, reason, body = (
        (403, "Forbidden", refusal_body(why)) if why else (503, "Service Unavailable", LOADING_BODY)
    )
    conn.sendall(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n".encode()
        + body
    )
    # Read what the client still sends (a POST body) before closing: closing with unread data makes
    # the kernel send a reset, and the client could lose our answer.
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(0.2)
    drained = 0
    while drained < DRAIN_LIMIT:
        data = conn.recv(4096)
        if not data:
            break
        drained += len(data)

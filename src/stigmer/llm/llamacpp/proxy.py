"""The built-in engine's front door: a thin HTTP proxy on the public port, in the engine's own process.

llama.cpp's server cannot refuse a foreign Host header or a cross-origin request, so it listens on an
internal loopback port of its own choosing, behind a random key that only this process knows (a web
page that finds the port still cannot use it). The public port applies net.guard (loopback Host,
allowed Origins, CORS without credentials), then forwards each request with the key and relays the
answer as it comes, so SSE token streams arrive chunk by chunk.

The internal hop is net.loopback_http, the minimal HTTP/1.1 client shared with the API's
OpenAI-compatible endpoint: per streamed token it costs half of httpx's CPU, which the engine's
decoding threads would otherwise lose (that module says how much).

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
from collections.abc import Sequence
from urllib.parse import urlsplit

from stigmer.net.guard import LoopbackGuard, Receive, Scope, Send, refusal, refusal_body
from stigmer.net.loopback_http import (
    RESPONSE_HEAD_LIMIT,
    BackendError,
    connect,
    read_body,
    read_head,
    relay,
    request_head,
    wait_disconnect,
)

__all__ = ["RESPONSE_HEAD_LIMIT", "EngineProxy", "LoadingResponder", "guarded"]  # the head limit: tests

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
LOADING_BODY = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
UNREACHABLE_BODY = b'{"error":{"code":502,"message":"the engine did not answer","type":"server_error"}}'


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
            reader, writer = await connect(self.host, self.port)
        except (TimeoutError, OSError) as e:
            log.warning("internal engine server unreachable: %s", e)
            await _answer(send, 502, UNREACHABLE_BODY)
            return
        try:
            writer.write(self._request_head(scope, target, len(body)) + bytes(body))
            try:
                head = await read_head(reader)
            except (OSError, BackendError) as e:
                log.warning("internal engine server gave no answer: %s", e)
                await _answer(send, 502, UNREACHABLE_BODY)
                return
            await send({"type": "http.response.start", "status": head.status, "headers": head.headers})
            watching = asyncio.ensure_future(wait_disconnect(receive))
            try:
                await relay(read_body(reader, scope["method"], head), send, watching)
            finally:
                watching.cancel()
        finally:
            # One connection per request (Connection: close): nothing to pool or expire, and closing
            # it is what makes llama.cpp stop a generation whose client went away.
            writer.close()

    def _request_head(self, scope: Scope, target: bytes, length: int) -> bytes:
        # Method, target and header values come from the server's HTTP parser (h11), which refuses
        # CR, LF and NUL in them: nothing here can split the internal request.
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _DROP_REQUEST]
        headers.append((b"Authorization", b"Bearer " + self.key))
        return request_head(scope["method"].encode(), target, self.host, self.port, headers, length)


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

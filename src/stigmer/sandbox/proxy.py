"""The one place a sandboxed tool's network traffic may go: an HTTP proxy on 127.0.0.1 that lets through
only the hosts the tool's `sandbox: {network: [...]}` allows.

With Landlock ABI >= 4 the kernel restricts TCP connect by port only, so a tool granted network hosts
may connect to exactly one local port: this proxy's. The tool finds it through the usual environment
variables (proxy_env). Two kinds of request are served, one per client connection:
- `CONNECT host:port`: a byte tunnel (HTTPS stays end-to-end TLS; the proxy never sees plaintext);
- absolute-form plain HTTP (`GET http://host/path HTTP/1.1`): forwarded with `Connection: close`.
Which host and port may be reached is decided exactly as for the http tool (stigmer.tools.http_fetch:
the same entries, the same refusal of a public name resolving to a private address). The proxy
resolves the name itself and connects to an address it checked, never resolving it again.

Refusals are answered `403` with one line saying what is not allowed and how to allow it; a malformed
request `400`; too large a header `431`; a header not sent in time `408`; too many connections `503`;
an unreachable host `502`. Hostile input never ends the proxy, only that connection.

It runs an asyncio loop in a daemon thread (the worker runs tools in threads) and starts in about a
millisecond: the listening socket is bound before the thread starts, so its port is known at once and a
client connecting early waits in the kernel's backlog. Leaving the context closes every connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from urllib.parse import urlsplit

from stigmer.tools import http_fetch
from stigmer.tools.errors import ToolFailure
from stigmer.tools.http_fetch import AllowEntry, IPAddress

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
MAX_HEADER_BYTES = 16 * 1024
HEADER_TIMEOUT = 10.0  # seconds for a client to send its whole request header (slowloris)
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0  # a tunnel with no byte either way for this long is closed
CHUNK = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own: never passed to the origin. Host is rebuilt
# from the URL (an absolute-form request's Host header must be ignored), so it cannot name another site.
_DROPPED = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
    b"te", b"trailer", b"upgrade", b"host",
}  # fmt: skip
_REASONS = {
    400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431: "Request Header Fields Too Large",
    502: "Bad Gateway", 503: "Service Unavailable",
}  # fmt: skip


class _Refusal(Exception):
    """Answer this status with this one-line text, then close."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class HostProxy:
    """An allow-listed HTTP proxy on 127.0.0.1; `with HostProxy(allow=[...]) as proxy: proxy.url`.

    `allow` holds http-tool entries (`pypi.org`, `*.example.com`, `host:8080`, `127.0.0.1:8080`,
    `localhost:8080`); an invalid one raises ValueError here, before anything listens.
    """

    def __init__(
        self,
        allow: Sequence[str],
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_header_bytes: int = MAX_HEADER_BYTES,
        header_timeout: float = HEADER_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        if isinstance(allow, str):
            raise ValueError("allow is a list of hosts, not one string")
        self.allow = tuple(allow)
        self._entries = [http_fetch.parse_allow_entry(e) for e in self.allow]
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.port = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._conns: set[socket.socket] = set()  # accepted sockets, until their task ends
        # DNS is blocking: its own small pool, dropped without waiting at stop (a lookup can hang).
        self._dns = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="stigmer-proxy-dns"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HostProxy:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this proxy was already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._loop = asyncio.SelectorEventLoop()  # add_reader on every platform (not Proactor)
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name=f"stigmer-proxy-{self.port}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close every connection and tunnel; returns once the thread has ended."""
        loop, thread, stopping = self._loop, self._thread, self._stopping
        if loop is None or thread is None or stopping is None:
            return
        try:
            loop.call_soon_threadsafe(stopping.set)
        except RuntimeError:  # the loop is already closed
            pass
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the sandbox proxy on port %s did not stop within %gs", self.port, timeout)
        self._dns.shutdown(wait=False, cancel_futures=True)

    # -- the loop's thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        try:
            self._loop.run_until_complete(self._main())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        except Exception:  # never expected; logged so that a dead proxy is not silent
            log.exception("the sandbox proxy on port %s failed", self.port)
        finally:
            self._loop.close()
            if self._sock is not None:
                self._sock.close()

    async def _main(self) -> None:
        assert self._stopping is not None and self._sock is not None
        loop = asyncio.get_running_loop()
        loop.add_reader(self._sock.fileno(), self._accept)
        try:
            await self._stopping.wait()
        finally:
            loop.remove_reader(self._sock.fileno())
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=3)
            for conn in self._conns:  # any a task did not get to wrap, or left behind: closed now
                conn.close()

    def _accept(self) -> None:
        """Accept waiting connections, each served by its own task, created here with no await between
        (not asyncio.start_server or sock_accept: in 3.11 both can lose a connection accepted just as the
        proxy stops, leaving it open and out of reach)."""
        assert self._sock is not None
        for _ in range(64):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors: pause accepting rather than spin
                log.warning("the sandbox proxy could not accept a connection: %s", e)
                loop = asyncio.get_running_loop()
                loop.remove_reader(self._sock.fileno())
                loop.call_later(0.1, loop.add_reader, self._sock.fileno(), self._accept)
                return
            conn.setblocking(False)
            crowded = len(self._tasks) >= self.max_connections
            self._conns.add(conn)
            task = asyncio.ensure_future(self._connection(conn, crowded))
            self._tasks.add(task)  # every task, so that stop() cancels and awaits them all
            task.add_done_callback(self._tasks.discard)

    async def _connection(self, conn: socket.socket, crowded: bool) -> None:
        try:
            # The reader's limit bounds one header line; the whole header is bounded in _read_head.
            reader, writer = await asyncio.open_connection(sock=conn, limit=max(self.max_header_bytes, CHUNK))
        except OSError:
            conn.close()
        else:
            await self._serve(reader, writer, crowded)
        finally:
            self._conns.discard(conn)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, crowded: bool) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                if crowded:
                    # Answered rather than queued: a tool opening too many connections learns why at once.
                    raise _Refusal(
                        503, f"too many connections to the sandbox proxy (at most {self.max_connections})"
                    )
                method, target, version, headers = await self._head(reader)
                if method == b"CONNECT":
                    host, port = self._authority(target)
                    up_reader, upstream = await self._open(host, port, ("https", "http"))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                else:
                    up_reader, upstream = await self._forward(method, target, version, headers)
            except _Refusal as refusal:
                await self._answer(writer, refusal.status, refusal.text)
                return
            await self._pipe(reader, writer, up_reader, upstream)
        except asyncio.CancelledError:
            await _drop(writer, upstream)  # the proxy is stopping: both ends closed now, not flushed
            raise
        except (ConnectionError, OSError):
            pass  # a peer went away: nothing to answer
        finally:
            writer.close()
            if upstream is not None:
                upstream.close()

    async def _head(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes, list[bytes]]:
        try:
            return await asyncio.wait_for(self._read_head(reader), self.header_timeout)
        except TimeoutError:  # slowloris: the whole header has one deadline, not each read
            raise _Refusal(
                408, f"the request header was not received within {self.header_timeout:g}s"
            ) from None

    async def _answer(self, writer: asyncio.StreamWriter, status: int, text: str) -> None:
        if status == 403:
            log.info("sandbox proxy refused: %s", text)
        body = (text.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8", "replace")
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), self.header_timeout)
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes, list[bytes]]:
        """The request line's method, target and version, and the header lines (without line ends)."""
        try:
            first = await reader.readexactly(1)
            if not first.isalpha():  # TLS, binary garbage: refused before waiting for a line end
                raise _Refusal(
                    400, "not an HTTP request: use this address as an HTTP proxy (http://, not https://)"
                )
            line = first + await reader.readuntil(b"\n")
            size = len(line)
            parts = line.rstrip(b"\r\n").split(b" ")
            if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in _VERSIONS or not parts[1]:
                raise _Refusal(400, "malformed request line; expected e.g. CONNECT host:443 HTTP/1.1")
            if any(c <= 0x20 or c >= 0x7F for c in parts[1]):
                raise _Refusal(400, "the request target contains spaces, control or non-ASCII characters")
            headers: list[bytes] = []
            while True:
                line = await reader.readuntil(b"\n")
                size += len(line)
                if size > self.max_header_bytes:
                    raise _Refusal(431, f"the request header is larger than {self.max_header_bytes} bytes")
                text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                if not text:
                    return parts[0], parts[1], parts[2], headers
                name, colon, value = text.partition(b":")
                # Folded lines, bare CRs and odd names are how requests get smuggled: refused.
                if not colon or not _TOKEN.fullmatch(name) or b"\r" in value or b"\0" in value:
                    raise _Refusal(400, "malformed header line")
                headers.append(text)
        except asyncio.LimitOverrunError:
            raise _Refusal(431, f"the request header is larger than {self.max_header_bytes} bytes") from None
        except asyncio.IncompleteReadError:
            raise _Refusal(400, "the request ended before its header did") from None

    def _authority(self, target: bytes) -> tuple[str, int]:
        """CONNECT's host:port, the host normalised."""
        parts = urlsplit("//" + target.decode("ascii"))
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None or parts.hostname is None or parts.username is not None or parts.path or parts.query:
            raise _Refusal(400, "CONNECT needs host:port, such as CONNECT pypi.org:443 HTTP/1.1")
        return self._host(parts.hostname), port

    def _host(self, host: str) -> str:
        normal = http_fetch.normalize_host(host)
        if normal is None:
            raise _Refusal(400, f"{host[:100]!r} is not a valid host name or address")
        return normal

    async def _forward(
        self, method: bytes, target: bytes, version: bytes, headers: list[bytes]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the connection for an absolute-form plain HTTP request and send it its header."""
        parts = urlsplit(target.decode("ascii"))
        if parts.scheme.lower() != "http":
            raise _Refusal(
                400, "send https:// requests through CONNECT, and plain ones as GET http://host/path"
            )
        if parts.username is not None or parts.password is not None:
            raise _Refusal(400, "URLs with a user name or password are not forwarded")
        try:
            port = parts.port or 80
        except ValueError:
            raise _Refusal(400, "the URL's port must be a number from 1 to 65535") from None
        host = self._host(parts.hostname or "")
        names = {h.split(b":", 1)[0].strip().lower() for h in headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            raise _Refusal(400, "a request with both Content-Length and Transfer-Encoding is refused")
        connection = [
            v.strip().lower()
            for h in headers
            if h.split(b":", 1)[0].strip().lower() == b"connection"
            for v in h.split(b":", 1)[1].split(b",")
        ]
        kept = [
            h
            for h in headers
            if (n := h.split(b":", 1)[0].strip().lower()) not in _DROPPED and n not in connection
        ]
        reader, writer = await self._open(host, port, ("http",))
        shown = f"[{host}]" if ":" in host else host
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [method + b" " + path.encode("ascii") + b" " + version]
        head.append(b"Host: " + (shown if port == 80 else f"{shown}:{port}").encode("ascii"))
        head += kept
        head.append(b"Connection: close")
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        return reader, writer

    async def _open(
        self, host: str, port: int, schemes: tuple[str, ...]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to an allowed host at an address checked for it (tried in turn)."""
        # A CONNECT may use either scheme's default port: an entry `pypi.org` allows :443 and :80.
        for scheme in schemes:
            entry = http_fetch.match_entry(self._entries, host, port, scheme)
            if entry is not None:
                break
        else:
            raise _Refusal(403, _not_allowed(host, port, self.allow))
        addresses = await self._addresses(host, port, entry)
        if port == self.port and any(a.is_loopback for a in addresses):
            raise _Refusal(403, "the sandbox proxy does not connect to itself")
        failure: Exception | None = None
        for address in addresses:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=CHUNK), self.connect_timeout
                )
            except (OSError, TimeoutError) as e:
                failure = e
        raise _Refusal(502, f"could not connect to {_shown(host, port)}: {failure or 'no address'}")

    async def _addresses(self, host: str, port: int, entry: AllowEntry) -> list[IPAddress]:
        """The checked addresses (http_fetch's rules), resolved off the loop: DNS calls block."""
        loop = asyncio.get_running_loop()
        lookup = loop.run_in_executor(self._dns, http_fetch.checked_addresses, host, port, entry)
        try:
            found = await asyncio.wait_for(lookup, self.connect_timeout)
        except ToolFailure as e:
            if "could not resolve" in e.message:
                raise _Refusal(502, e.message) from None
            raise _Refusal(403, f"{e.message} (sandbox: {{network: [ADDRESS:{port}]}})") from None
        except TimeoutError:
            raise _Refusal(502, f"resolving {host} took more than {self.connect_timeout:g}s") from None
        except RuntimeError:  # the pool was shut down: the proxy is stopping
            raise _Refusal(502, "the sandbox proxy is stopping") from None
        if found is None:
            raise _Refusal(502, f"could not resolve the host name {host}")
        return found

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Copy bytes both ways until both sides have finished, or nothing moved for idle_timeout."""
        last = [time.monotonic()]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while True:
                try:
                    data = await asyncio.wait_for(source.read(CHUNK), min(self.idle_timeout, 30.0))
                except TimeoutError:
                    if time.monotonic() - last[0] >= self.idle_timeout:
                        raise
                    continue
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()  # half-close: the other direction may still be talking
                    return
                last[0] = time.monotonic()
                sink.write(data)
                await sink.drain()

        down = asyncio.ensure_future(copy(up_reader, writer))
        up = asyncio.ensure_future(copy(reader, upstream))
        try:
            done, _ = await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
            # The client having sent everything (EOF) leaves the answer to come; anything else ends it:
            # the origin finished, a side failed, or the exchange sat idle.
            if done == {up} and up.exception() is None:
                await down
        except TimeoutError:
            pass
        finally:
            for t in (down, up):
                t.cancel()
            await asyncio.gather(down, up, return_exceptions=True)


async def _drop(writer: asyncio.StreamWriter, upstream: asyncio.StreamWriter | None) -> None:
    """Close both ends at once, without flushing, and wait until their sockets are really closed (that
    happens a loop turn later, which must come before the loop ends)."""
    ends = [writer] if upstream is None else [writer, upstream]
    for end in ends:
        end.transport.abort()
    await asyncio.wait([asyncio.ensure_future(end.wait_closed()) for end in ends], timeout=1)


def proxy_env(url: str) -> dict[str, str]:
    """The environment that sends a tool's HTTP(S) traffic through the proxy at `url`, bypassing nothing."""
    env = {name: url for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    env |= {name.lower(): url for name in env}
    env |= {"NO_PROXY": "", "no_proxy": ""}
    return env


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _not_allowed(host: str, port: int, allow: Sequence[str]) -> str:
    entry = _shown(host, port)
    if port in (80, 443) and _literal(host) is None and host != "localhost":
        entry = host  # a name's entry covers both default ports
    listed = ", ".join(allow) or "nothing"
    return (
        f"{_shown(host, port)} is not allowed for this tool (allowed: {listed}); to allow it, add it to "
        f"the tool's sandbox in the agent file: sandbox: {{network: [{entry}]}}"
    )


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None

"""The sandbox's allow-listed HTTP proxy, on real sockets on 127.0.0.1: local HTTP servers play the
allowed and refused hosts. Only DNS is faked (http_fetch._resolve), as in the http tool's tests.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stigmer.sandbox.proxy import HostProxy, proxy_env
from stigmer.tools import http_fetch


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = f"{self.server.server_port} {self.path} host={self.headers.get('Host')}".encode()  # type: ignore[attr-defined]
        body += (
            f" conn={self.headers.get('Connection')} auth={self.headers.get('Proxy-Authorization')}".encode()
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def site() -> Iterator[ThreadingHTTPServer]:
    yield from _serve()


@pytest.fixture
def other() -> Iterator[ThreadingHTTPServer]:
    yield from _serve()


def _open_via(proxy: HostProxy, url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _connect(proxy: HostProxy, authority: str) -> tuple[socket.socket, bytes]:
    """A raw CONNECT: the socket (a tunnel when the answer is 200) and the proxy's answer header."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    return sock, _read_head(sock)


def _connect_answer(proxy: HostProxy, authority: str) -> bytes:
    sock, head = _connect(proxy, authority)
    sock.close()
    return head


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _raw(proxy: HostProxy, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(payload)
        return _read_all(sock)


# -- allowed hosts ----------------------------------------------------------------------------------


def test_plain_http_reaches_a_literal_entry_with_connection_close(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        status, body = _open_via(proxy, f"http://127.0.0.1:{port}/a/b?q=1")
    assert status == 200
    assert body.startswith(f"{port} /a/b?q=1 host=127.0.0.1:{port} conn=close")


def test_plain_http_rebuilds_host_and_drops_proxy_headers(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        request = (
            f"GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: evil.example\r\n"
            "Proxy-Authorization: Basic c2VjcmV0\r\nConnection: keep-alive\r\n\r\n"
        )
        answer = _raw(proxy, request.encode())
    assert answer.startswith(b"HTTP/1.0 200")
    assert f"host=127.0.0.1:{port} conn=close auth=None".encode() in answer


def test_a_request_body_is_forwarded(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
        with opener.open(f"http://127.0.0.1:{port}/post", data=b"x" * 200_000, timeout=5) as response:
            assert response.read() == b"x" * 200_000


def test_connect_tunnels_to_a_literal_entry(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        sock, head = _connect(proxy, f"127.0.0.1:{port}")
        with sock:
            assert head.startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /through HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.0 200") and f"{port} /through host=x".encode() in answer


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_through_the_proxy_environment(site: ThreadingHTTPServer, other: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        env = {"PATH": os.environ["PATH"], **proxy_env(proxy.url)}

        def curl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "-m", "5", "-w", " %{http_code}", *args],
                env=env, capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip

        # NO_PROXY is empty: curl would otherwise go straight to 127.0.0.1.
        assert curl(f"http://127.0.0.1:{port}/plain").stdout.endswith(" 200")
        assert curl("-p", f"http://127.0.0.1:{port}/tunnel").stdout.endswith(" 200")  # -p: CONNECT
        refused = curl(f"http://127.0.0.1:{other.server_port}/")
        assert refused.stdout.endswith(" 403") and "not allowed" in refused.stdout


def test_proxy_env_names_every_variable_and_bypasses_nothing() -> None:
    env = proxy_env("http://127.0.0.1:1234")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        assert env[name] == "http://127.0.0.1:1234"
    assert env["NO_PROXY"] == "" and env["no_proxy"] == ""


# -- refusals -----------------------------------------------------------------------------------------


def test_a_port_not_listed_is_refused(site: ThreadingHTTPServer, other: ThreadingHTTPServer) -> None:
    with HostProxy(allow=[f"127.0.0.1:{site.server_port}"]) as proxy:
        status, body = _open_via(proxy, f"http://127.0.0.1:{other.server_port}/")
        sock, head = _connect(proxy, f"127.0.0.1:{other.server_port}")
        sock.close()
    assert status == 403
    assert body.count("\n") == 1 and f"127.0.0.1:{other.server_port} is not allowed" in body
    assert f"sandbox: {{network: [127.0.0.1:{other.server_port}]}}" in body
    assert head.startswith(b"HTTP/1.1 403") and b"not allowed" in head


def test_a_name_not_listed_is_refused_before_any_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []
    monkeypatch.setattr(http_fetch, "_resolve", lambda host, port: looked_up.append(host) or [])
    with HostProxy(allow=["pypi.org", "files.pythonhosted.org"]) as proxy:
        sock, head = _connect(proxy, "evil.example:443")
        sock.close()
        status, body = _open_via(proxy, "http://evil.example/")
    assert head.startswith(b"HTTP/1.1 403")
    assert b"evil.example:443 is not allowed" in head and b"sandbox: {network: [evil.example]}" in head
    assert status == 403 and "evil.example:80 is not allowed" in body
    assert looked_up == []


def test_an_allowed_name_resolving_to_a_private_address_is_refused(
    site: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name is allowed, the address it points at is not."""
    monkeypatch.setattr(http_fetch, "_resolve", lambda host, port: [ipaddress.ip_address("127.0.0.1")])
    with HostProxy(allow=[f"allowed.test:{site.server_port}", "*.example.com"]) as proxy:
        sock, head = _connect(proxy, f"allowed.test:{site.server_port}")
        sock.close()
        status, body = _open_via(proxy, "http://a.example.com/")
    assert head.startswith(b"HTTP/1.1 403") and b"private or local address" in head
    assert status == 403 and "private or local address" in body


def test_an_allowed_name_connects_to_the_address_it_was_checked_at(
    site: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy resolves once and connects to that address: a public answer then a private one would be
    caught by the check; here the resolver is asked exactly once per request."""
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[http_fetch.IPAddress]:
        calls.append(host)
        return [ipaddress.ip_address("192.0.2.1")]  # TEST-NET: reserved, so refused

    monkeypatch.setattr(http_fetch, "_resolve", resolve)
    with HostProxy(allow=["pypi.org"]) as proxy:
        sock, head = _connect(proxy, "PyPI.org.:443")
        sock.close()
    assert calls == ["pypi.org"] and head.startswith(b"HTTP/1.1 403")


def test_localhost_entries_are_literal_and_distinct_from_addresses(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"localhost:{port}"]) as proxy:
        sock, head = _connect(proxy, f"localhost:{port}")
        with sock:
            assert head.startswith(b"HTTP/1.1 200")  # ::1 first on some hosts: the next address is tried
            sock.sendall(b"GET /l HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert b" /l host=localhost" in _read_all(sock)
        status, _ = _open_via(proxy, f"http://localhost:{port}/")
        assert status == 200
        assert _connect_answer(proxy, f"127.0.0.1:{port}").startswith(b"HTTP/1.1 403")  # not the same entry
        assert _connect_answer(proxy, "localhost:1").startswith(b"HTTP/1.1 403")  # another port
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        assert _connect_answer(proxy, f"localhost:{port}").startswith(b"HTTP/1.1 403")


def test_the_proxy_never_connects_to_itself() -> None:
    with HostProxy(allow=["127.0.0.1:1"]) as proxy:
        proxy._entries.append(http_fetch.parse_allow_entry(f"127.0.0.1:{proxy.port}"))
        sock, head = _connect(proxy, f"127.0.0.1:{proxy.port}")
        sock.close()
    assert head.startswith(b"HTTP/1.1 403") and b"itself" in head


def test_an_invalid_entry_fails_before_anything_listens() -> None:
    with pytest.raises(ValueError):
        HostProxy(allow=["https://pypi.org/simple"])
    with pytest.raises(ValueError):
        HostProxy(allow="pypi.org")


def test_an_unreachable_allowed_address_is_a_502() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        assert _connect_answer(proxy, f"127.0.0.1:{port}").startswith(b"HTTP/1.1 502")


# -- hostile input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, status",
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), b"400"),  # TLS to a plain proxy
        (b"\x00\xff\xfe garbage\r\n\r\n", b"400"),
        (b"GET /origin-form HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET https://pypi.org/ HTTP/1.1\r\n\r\n", b"400"),
        (b"GET http://pypi.org/ HTTP/2.0\r\n\r\n", b"400"),
        (b"GET  http://pypi.org/ HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT pypi.org HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT pypi.org:99999 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT user@pypi.org:443 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT pypi..org:443 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT pypi.org:443 HTTP/1.1\r\n folded: line\r\n\r\n", b"400"),
        (b"CONNECT pypi.org:443 HTTP/1.1\r\nNo colon here\r\n\r\n", b"400"),
        (b"GET http://u:p@pypi.org/ HTTP/1.1\r\n\r\n", b"400"),
        (
            b"POST http://pypi.org/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"400",
        ),
        (b"CONNECT pypi.org:443 HTTP/1.1\r\n" + b"X-A: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (b"CONNECT pypi.org:443 HTTP/1.1\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n", b"431"),
        (b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: x", b"400"),  # ends before the header does
    ],
    ids=lambda value: (
        value[:24].decode("latin-1").encode("unicode_escape").decode()
        if isinstance(value, bytes) and len(value) > 3
        else None
    ),
)
def test_malformed_requests_are_refused_and_the_proxy_keeps_serving(
    site: ThreadingHTTPServer, payload: bytes, status: bytes
) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}", "pypi.org"]) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert answer.endswith(b"\n") and answer.split(b"\r\n\r\n", 1)[1].count(b"\n") == 1
        assert _open_via(proxy, f"http://127.0.0.1:{port}/still")[0] == 200


def test_random_bytes_never_end_the_proxy(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        for i in range(50):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall((b"GET " if i % 2 else b"") + os.urandom(3000) + b"\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                answer = _read_all(sock)
            assert answer == b"" or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 502"))
        assert _open_via(proxy, f"http://127.0.0.1:{port}/still")[0] == 200


def test_a_slow_header_gets_408_at_its_deadline(site: ThreadingHTTPServer) -> None:
    """Slowloris: a byte now and then does not extend the deadline, which covers the whole header."""
    with HostProxy(allow=["pypi.org"], header_timeout=0.5) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"CONNECT pypi.org:443 HTTP/1.1\r\n")
            answer = b""
            for _ in range(20):
                try:
                    sock.sendall(b"X: y\r\n")
                except OSError:
                    break
                time.sleep(0.1)
            answer = _read_all(sock)
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408")
        assert elapsed < 3


def test_connections_beyond_the_bound_are_answered_503(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"], max_connections=8, header_timeout=10) as proxy:
        held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(8)]
        try:
            for sock in held:  # each holds a slot: a request line and no end of header yet
                sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n".encode())
            time.sleep(0.2)
            extra = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(20)]
            for sock in extra:
                with sock:
                    assert _read_all(sock).startswith(b"HTTP/1.1 503")
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)  # the held slots free up once their clients leave
        assert _open_via(proxy, f"http://127.0.0.1:{port}/again")[0] == 200


def test_many_concurrent_requests_are_all_served(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    results: list[int] = []
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        threads = [
            threading.Thread(target=lambda: results.append(_open_via(proxy, f"http://127.0.0.1:{port}/c")[0]))
            for _ in range(40)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert results == [200] * 40


# -- lifetime -----------------------------------------------------------------------------------------


def test_leaving_the_context_closes_open_tunnels_and_the_port(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"]) as proxy:
        tunnels = []
        for _ in range(3):
            sock, head = _connect(proxy, f"127.0.0.1:{port}")
            assert head.startswith(b"HTTP/1.1 200")
            tunnels.append(sock)
        half = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        half.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")  # still sending its header
        thread = proxy._thread
    assert thread is not None and not thread.is_alive()
    for sock in [*tunnels, half]:
        with sock:
            sock.settimeout(2)
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


def test_an_idle_tunnel_is_closed(site: ThreadingHTTPServer) -> None:
    port = site.server_port
    with HostProxy(allow=[f"127.0.0.1:{port}"], idle_timeout=0.3) as proxy:
        sock, head = _connect(proxy, f"127.0.0.1:{port}")
        with sock:
            assert head.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            assert sock.recv(100) == b""
            assert time.monotonic() - started < 3


def test_stop_without_start_and_twice_is_harmless() -> None:
    proxy = HostProxy(allow=[])
    proxy.stop()
    with proxy:
        pass
    proxy.stop()

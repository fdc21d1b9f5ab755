"""The HTTP API against what a careless or hostile client sends: bodies too large (declared or not),
JSON and YAML nested past any use, fields of the wrong type, and connections that never send their
request. Each gets a JSON error of its own code, or the connection closed, never a bare 500.

The API runs as the product runs it (`python -m stigmer.server.api`, uvicorn), on a free port, with
the request-head deadline lowered to 1 s. Its /v1/status is made to fail as a bug would, to show what
an unexpected error in a route answers."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stigmer.server.api.app import MAX_BODY
from tests.conftest import PROXY_VARS
from tests.doubles.archives import free_port

HEAD_TIMEOUT = 1.0

# The real entry point, with one route broken as a bug would break it.
_MAIN = """
import sys
import stigmer.server.status

def broken(*_args, **_kwargs):
    raise RuntimeError("a bug in a route")

stigmer.server.status.server_status = broken
from stigmer.server.api.__main__ import main
sys.exit(main())
"""


@dataclass
class Api:
    proc: subprocess.Popen[bytes]
    port: int
    token: str
    log: Path

    def request(
        self, method: str, path: str, body: bytes | None = None, *, auth: bool = True
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post_json(self, path: str, data: Any) -> tuple[int, dict[str, Any]]:
        status, _headers, body = self.request("POST", path, json.dumps(data).encode())
        return status, json.loads(body)

    def head(self, method: str, path: str, *extra: str) -> bytes:
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            f"Authorization: Bearer {self.token}",
            "Content-Type: application/json",
            *extra,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("api")
    home = root / "stigmer-home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STIGMER_") and k not in PROXY_VARS}
    env.update(
        {
            "STIGMER_HOME": str(home),
            "HOME": str(root),
            "STIGMER_SERVER_PORT": str(port),
            "STIGMER_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",  # none: no route here needs it
            "STIGMER_TEMPORAL_UI_PORT": str(free_port()),  # the API serves the UI's door there too
            "STIGMER_HTTP_HEAD_TIMEOUT": str(HEAD_TIMEOUT),
        }
    )
    log = root / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _MAIN], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.05)
            finally:
                conn.close()
        token = (home / "api.token").read_text().strip()
        yield Api(proc, port, token, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed the connection (nothing else may come); fails past `seconds`."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s")
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    return time.monotonic() - started


# -- bodies too large -------------------------------------------------------------------------------------
def test_a_body_declared_too_large_is_refused_before_it_is_sent(api: Api) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(api.head("POST", "/v1/agents", f"Content-Length: {100 * 1024 * 1024}"))
        # not one byte of the 100 MB: the answer comes from the Content-Length alone
        status, headers, body = _response(sock)
    assert status == 413
    assert json.loads(body)["error"] == {
        "code": "too_large",
        "message": "The request body is larger than 2 MB.",
        "hint": "",
    }
    assert headers["connection"] == "close"  # what was not read is not waited for


def test_a_chunked_body_is_counted_while_read_and_cut_off_at_the_limit(api: Api) -> None:
    piece = b"x" * 65536
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(api.head("POST", "/v1/executions", "Transfer-Encoding: chunked"))
        for _ in range(MAX_BODY // len(piece)):  # exactly the limit: still fine
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"1\r\nx\r\n")  # one byte over it, and the body never ends
        status, headers, body = _response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert headers["connection"] == "close"


def test_a_body_within_the_limit_is_read(api: Api) -> None:
    status, data = api.post_json("/v1/agents", {"name": "big", "instructions": "x" * (MAX_BODY - 100)})
    assert status == 400  # read and parsed: refused by the field's own limit, not by the body's size
    assert "field 'instructions' must be text of at most" in data["error"]["message"]


# -- nesting and types ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/agents", "/v1/executions"])
@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 150 + b"]" * 150],
    ids=["100000-brackets", "100000-objects", "valid-150-deep"],
)
def test_json_nested_too_deeply_is_a_400(api: Api, path: str, body: bytes) -> None:
    status, headers, raw = api.request("POST", path, body)
    assert status == 400 and headers["content-type"] == "application/json", raw[:200]
    error = json.loads(raw)["error"]
    assert error["code"] == "invalid_input" and "nests more than 100 levels" in error["message"]


@pytest.mark.parametrize("yaml", [5, None, True, ["name: a"], {"name": "a"}])
def test_yaml_that_is_not_text_is_a_400(api: Api, yaml: Any) -> None:
    status, data = api.post_json("/v1/agents", {"yaml": yaml})
    assert status == 400
    assert data["error"]["code"] == "invalid_input" and "`yaml` must be the text" in data["error"]["message"]


@pytest.mark.parametrize(
    "yaml",
    [
        # past ruamel's recursion: seconds of CPU, within the client's 30 s only without company
        pytest.param("[" * 100_000, marks=pytest.mark.alone),
        "name: a\ntools: " + "[" * 200 + "]" * 200,  # parsed, then refused by depth
        "name: a\ninstructions: " + "{a: " * 150 + "b" + "}" * 150,
    ],
    ids=["100000-brackets", "tools-200-deep", "mapping-150-deep"],
)
def test_yaml_nested_too_deeply_is_a_400(api: Api, yaml: str) -> None:
    status, data = api.post_json("/v1/agents", {"yaml": yaml, "source": "deep.yaml"})
    assert status == 400 and data["error"]["code"] == "invalid_input"
    assert data["error"]["message"] == "deep.yaml: nested more than 100 levels deep."


@pytest.mark.parametrize("tools", [[{"shell": 5}], [{"shell": "x"}], [{"workspace": ["a"]}]])
def test_tool_options_that_are_not_a_mapping_are_a_400(api: Api, tools: Any) -> None:
    status, data = api.post_json("/v1/agents", {"name": "odd", "tools": tools})
    assert status == 400 and data["error"]["code"] == "invalid_input"
    assert "are a mapping" in data["error"]["message"]


def test_good_agents_are_still_taken(api: Api) -> None:
    status, data = api.post_json("/v1/agents", {"yaml": "name: poet\ninstructions: Short poems.\n"})
    assert status in (200, 201) and data["agent"]["name"] == "poet"
    status, data = api.post_json("/v1/agents", {"name": "plain", "tools": [{"shell": None}]})
    assert status in (200, 201) and data["agent"]["tools"] == [{"shell": None}]


# -- a bug in a route -------------------------------------------------------------------------------------
def test_an_unexpected_error_is_a_json_500_and_logged(api: Api) -> None:
    status, headers, raw = api.request("GET", "/v1/status")
    assert status == 500 and headers["content-type"] == "application/json", raw[:200]
    assert json.loads(raw)["error"] == {
        "code": "internal",
        "message": "The server failed unexpectedly (a bug).",
        "hint": "Its log has the details: stigmer server logs -c server",
    }
    logged = ("GET /v1/status failed: RuntimeError: a bug in a route", "Traceback")  # and where it happened
    deadline = time.monotonic() + 10
    while not all(text in api.log.read_text() for text in logged):
        assert time.monotonic() < deadline, api.log.read_text()
        time.sleep(0.05)
    assert api.request("GET", "/health", auth=False)[0] == 200  # the API carries on


# -- connections that never send their request ------------------------------------------------------------
@pytest.mark.parametrize(
    "sent", [b"", b"GET /health HTTP/1.1\r\n", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"]
)
def test_a_connection_without_a_whole_request_head_is_closed(api: Api, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(sent)
        waited = _closed_within(sock, 10 * HEAD_TIMEOUT)
    assert waited >= HEAD_TIMEOUT * 0.5


def test_a_dribbled_request_head_is_closed_at_its_deadline(api: Api) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.settimeout(0.2)
        started = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 1000:  # a byte every 0.2 s: minutes
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    break  # closed by the server
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the whole dribbled head was taken")
        waited = time.monotonic() - started
    assert HEAD_TIMEOUT * 0.5 <= waited < 10 * HEAD_TIMEOUT  # each byte did not restart the deadline


def test_a_partial_next_request_on_a_kept_alive_connection_is_closed(api: Api) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _headers, _body = _response(sock)
        assert status == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: ")  # any byte stops uvicorn's keep-alive timer
        waited = _closed_within(sock, 10 * HEAD_TIMEOUT)
    assert waited < 4.5  # ours, not uvicorn's keep-alive timeout (5 s)


def test_a_request_whose_head_has_come_is_not_cut_off(api: Api) -> None:
    body = json.dumps({"name": "patient"}).encode()
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(api.head("POST", "/v1/agents", f"Content-Length: {len(body)}"))
        time.sleep(2.5 * HEAD_TIMEOUT)  # the body takes its time: that is the application's to judge
        sock.sendall(body)
        status, _headers, raw = _response(sock)
    assert status in (200, 201), raw


def test_digits_that_are_not_ascii_are_no_500(api: Api) -> None:
    """`str.isdigit()` takes "²", which int() refuses: a limit or a Last-Event-ID like that is ignored."""
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    try:
        conn.request("GET", "/v1/executions?limit=%C2%B2", headers={"Authorization": f"Bearer {api.token}"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        conn.request(
            "GET", "/v1/executions/ex-none/events",
            headers={"Authorization": f"Bearer {api.token}", "Last-Event-ID": "\u00b2"},
        )  # fmt: skip
        resp = conn.getresponse()
        assert resp.status == 404, resp.read()
    finally:
        conn.close()

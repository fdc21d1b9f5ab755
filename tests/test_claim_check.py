"""The payload codec's claim check (issue 15, point 3): a sealed payload over codec.THRESHOLD goes to a
payload store and Temporal's history holds only its sha256. The codec with an in-memory store; the
API's /v1/runner/payloads routes in-process (auth, bounds, sha check); end to end, a 200 KB file read by
an agent's tool leaves a small history with none of the file in it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stigmer.executions import codec as codec_module
from stigmer.executions.codec import (
    CLAIM_CHECK,
    ENCODING,
    ClaimCheckError,
    codec,
    data_converter,
    decode_json,
)
from stigmer.executions.payload_store import MAX_PAYLOAD, DatabaseStore, MemoryStore, PayloadRefused
from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import in_state, tool_call, wait_until

KEY = bytes(range(32))
SECRET = "the vault combination is 31-41-59"


def _payload(text: str) -> Any:
    from temporalio.api.common.v1 import Payload

    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the codec, with an in-memory store -------------------------------------------------------------------
def test_small_payloads_stay_inline_and_large_ones_go_by_reference() -> None:
    store = MemoryStore()
    c = codec(KEY, store)
    small, large = _payload("hello"), _payload(SECRET + " " + "x" * 100_000)
    out = _run(c.encode([small, large]))
    assert out[0].metadata["encoding"] == ENCODING and len(out[0].data) < 200
    assert out[1].metadata["encoding"] == CLAIM_CHECK
    ref = bytes(out[1].data).decode()
    assert len(ref) == 64 and list(store.data) == [ref]
    stored = store.data[ref]
    assert hashlib.sha256(stored).hexdigest() == ref and len(stored) > 100_000
    assert SECRET.encode() not in stored and b"xxxxxxxx" not in stored  # sealed bytes only
    assert int(out[1].metadata["stigmer-size"]) == len(stored)
    back = _run(c.decode(out))
    assert back == [small, large]


def test_the_threshold_is_a_module_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec_module, "THRESHOLD", 100)
    store = MemoryStore()
    [out] = _run(codec(KEY, store).encode([_payload("y" * 200)]))
    assert out.metadata["encoding"] == CLAIM_CHECK and len(store.data) == 1
    monkeypatch.setattr(codec_module, "THRESHOLD", 1000)
    [out] = _run(codec(KEY, store).encode([_payload("y" * 200)]))
    assert out.metadata["encoding"] == ENCODING


def test_tampered_or_missing_stored_bytes_are_refused() -> None:
    store = MemoryStore()
    c = codec(KEY, store)
    [out] = _run(c.encode([_payload("z" * 50_000)]))
    ref = bytes(out.data).decode()
    good = store.data[ref]
    store.data[ref] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(ClaimCheckError, match="changed"):
        _run(c.decode([out]))
    del store.data[ref]
    with pytest.raises(ClaimCheckError, match="cannot be found"):
        _run(c.decode([out]))
    with pytest.raises(ClaimCheckError, match="no payload store"):
        _run(codec(KEY).decode([out]))
    # the store itself refuses bytes that are not the ref's
    with pytest.raises(PayloadRefused, match="another sha256"):
        _run(store.put(ref, b"other bytes"))
    with pytest.raises(PayloadRefused, match="not a payload reference"):
        _run(store.put("../etc", b""))


def test_foreign_plaintext_passes_and_another_key_is_named() -> None:
    from stigmer.executions.codec import UnknownKey

    foreign = _payload("started by someone else")
    assert _run(codec(KEY, MemoryStore()).decode([foreign])) == [foreign]
    store = MemoryStore()
    [out] = _run(codec(KEY, store).encode([_payload("w" * 50_000)]))
    with pytest.raises(UnknownKey):
        _run(codec(bytes(32), store).decode([out]))


def test_a_store_that_fails_fails_the_encode_never_inline() -> None:
    class Down(MemoryStore):
        async def put(self, ref: str, data: bytes) -> None:
            raise RuntimeError("the Stigmer API did not answer")

    with pytest.raises(RuntimeError, match="did not answer"):
        _run(codec(KEY, Down()).encode([_payload(SECRET * 2000)]))
    # small payloads do not need the store
    [out] = _run(codec(KEY, Down()).encode([_payload("short")]))
    assert out.metadata["encoding"] == ENCODING


def test_too_large_for_the_store_is_refused() -> None:
    with pytest.raises(PayloadRefused, match="larger than"):
        _run(codec(KEY, MemoryStore()).encode([_payload("v" * (MAX_PAYLOAD + 10))]))


def test_the_data_converter_and_the_ui_decode_endpoint_resolve_references(isolated_home: Paths) -> None:
    from google.protobuf import json_format
    from temporalio.api.common.v1 import Payloads

    from stigmer.server.db import Database
    from stigmer.server.keys import ensure_keys

    ensure_keys(isolated_home)
    isolated_home.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(isolated_home.data_dir / "stigmer.db")
    store = DatabaseStore(db)
    dc = data_converter(isolated_home, store)
    value = {"tool_result": SECRET + " " + "q" * 60_000}
    encoded = _run(dc.encode([value]))
    assert encoded[0].metadata["encoding"] == CLAIM_CHECK and encoded[0].ByteSize() < 300
    assert _run(dc.decode(encoded)) == [value]
    rows = sqlite3.connect(db.path).execute("SELECT ref, data FROM payloads").fetchall()
    assert len(rows) == 1 and SECRET.encode() not in rows[0][1]
    # the Web UI's remote codec: a reference in, the plaintext payload out
    from stigmer.server.keys import payload_key

    body = json_format.MessageToDict(Payloads(payloads=encoded))
    out = _run(decode_json(payload_key(isolated_home), body, store))
    [plain] = json_format.ParseDict(out, Payloads()).payloads
    assert plain.metadata["encoding"] == b"json/plain" and json.loads(plain.data) == value
    db.close()


# -- the API's routes, in-process -------------------------------------------------------------------------
@pytest.fixture
def api(isolated_home: Paths) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from stigmer.config import store
    from stigmer.server.api.app import create_app
    from stigmer.server.keys import ensure_keys

    ensure_keys(isolated_home)
    isolated_home.data_dir.mkdir(parents=True, exist_ok=True)
    settings = store.load(isolated_home)
    app = create_app(settings, isolated_home, token="api-token", worker_token="worker-token")
    with TestClient(app, base_url=f"http://127.0.0.1:{settings.server.port}") as client:
        yield client


WORKER = {"Authorization": "Bearer worker-token"}


def test_payload_routes_need_the_worker_token_check_the_sha_and_are_bounded(api: Any) -> None:
    data = os.urandom(40_000)
    ref = hashlib.sha256(data).hexdigest()
    for headers in ({}, {"Authorization": "Bearer api-token"}, {"Authorization": "Bearer nope"}):
        assert api.post(f"/v1/runner/payloads?ref={ref}", content=data, headers=headers).status_code == 401
        assert api.get(f"/v1/runner/payloads/{ref}", headers=headers).status_code == 401
    assert api.get(f"/v1/runner/payloads/{ref}", headers=WORKER).status_code == 404
    r = api.post(f"/v1/runner/payloads?ref={ref}", content=data, headers=WORKER)
    assert r.status_code == 201 and r.json() == {"ref": ref, "size": len(data)}
    got = api.get(f"/v1/runner/payloads/{ref}", headers=WORKER)
    assert got.status_code == 200 and got.content == data
    # other bytes under that ref: refused, and what is stored stays
    r = api.post(f"/v1/runner/payloads?ref={ref}", content=b"forged", headers=WORKER)
    assert r.status_code == 400 and "sha256" in r.json()["error"]["message"]
    assert api.get(f"/v1/runner/payloads/{ref}", headers=WORKER).content == data
    # the same bytes again: fine, once
    assert api.post(f"/v1/runner/payloads?ref={ref}", content=data, headers=WORKER).status_code == 201
    # no ref given: the API says what it is
    r = api.post("/v1/runner/payloads", content=b"abc", headers=WORKER)
    assert r.status_code == 201 and r.json()["ref"] == hashlib.sha256(b"abc").hexdigest()
    # malformed refs
    assert api.get("/v1/runner/payloads/" + "A" * 64, headers=WORKER).status_code == 400
    assert api.get("/v1/runner/payloads/abc", headers=WORKER).status_code == 400
    assert api.post("/v1/runner/payloads?ref=xyz", content=b"abc", headers=WORKER).status_code == 400
    # bounded: by Content-Length at once, and while reading a chunked body
    big = b"\0" * (MAX_PAYLOAD + 1)
    r = api.post("/v1/runner/payloads", content=big, headers=WORKER)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_PAYLOAD // (1024 * 1024) + 1):
            yield b"\0" * (1024 * 1024)

    assert api.post("/v1/runner/payloads", content=chunks(), headers=WORKER).status_code == 413


# -- end to end: the real server, worker and Temporal ------------------------------------------------------
@pytest.fixture
def server(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeOpenAI]:
    with FakeOpenAI(key="sk-claim") as fake:
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "openai")
        monkeypatch.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-claim")
        r = run_cli("server", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        f = tmp_path / "reader.yaml"
        f.write_text("name: reader\ninstructions: You read files.\ntools: [workspace]\n")
        r = run_cli("agent", "apply", "-f", str(f))
        assert r.returncode == 0, r.stderr
        yield fake


def _history(exec_id: str, paths: Paths) -> str:
    from stigmer.server.specs import temporal_binary

    r = subprocess.run(
        [temporal_binary(paths), "workflow", "show", "-w", exec_id, "--output", "json",
         "--address", os.environ["STIGMER_TEMPORAL_ADDRESS"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def _read_file_run(paths: Paths, server: FakeOpenAI, name: str) -> tuple[dict[str, Any], str]:
    """An execution whose model reads `name` with the workspace tool, then answers; its record and
    its Temporal history (`temporal workflow show --output json`)."""
    server.script += [tool_call("read_file", path=name), {"content": "I read it."}]
    exec_id = run_cli("run", "reader", "--detach", "-m", f"Read {name}").stdout.strip()
    rec = wait_until(lambda: in_state(exec_id, "COMPLETED", "FAILED", "CANCELLED"), 120)
    assert rec["state"] == "COMPLETED", rec.get("error")
    assert rec["output"] == "I read it."
    return rec, _history(exec_id, paths)


@pytest.mark.usefixtures("stop_server")
def test_a_200_kb_tool_result_stays_out_of_temporal_history(isolated_home: Paths, server: FakeOpenAI) -> None:
    folder = isolated_home.data_dir / "workspace" / "reader"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "small.txt").write_text("a few words\n")
    lines = [f"{i:05d} {SECRET} and some more words to fill the line" for i in range(2800)]
    text = "\n".join(lines) + "\n"
    assert len(text) > 200_000
    (folder / "big.txt").write_text(text)

    # The same execution with a 12-byte file: what its history costs whatever the tool returns (~65 KB
    # of events: two model requests, a tool call, Stigmer's own activities, each encrypted).
    _, baseline = _read_file_run(isolated_home, server, "small.txt")
    _, history = _read_file_run(isolated_home, server, "big.txt")
    # the model was sent the whole file as the tool's result: it went through, by reference
    assert lines[-1] in json.dumps(server.requests[-1])
    print(f"history: {len(baseline)} bytes reading 12 bytes, {len(history)} bytes reading {len(text)} bytes")
    assert len(history) < len(baseline) + 4_000  # the file added only references
    assert len(history) < len(text) // 2
    biggest = max(len(json.dumps(e)) for e in json.loads(history)["events"])
    assert biggest < 20_000  # no event carries the file (the threshold bounds each payload to 16 KB)
    assert SECRET not in history and SECRET not in baseline
    assert "YmluYXJ5L3N0aWdtZXItY2xhaW0tY2hlY2s" in history  # base64 of binary/stigmer-claim-check
    # the database holds the sealed bytes only
    db = sqlite3.connect(isolated_home.data_dir / "stigmer.db")
    rows = db.execute("SELECT ref, data FROM payloads").fetchall()
    db.close()
    assert rows and all(hashlib.sha256(data).hexdigest() == ref for ref, data in rows)
    assert not any(SECRET.encode() in data for _, data in rows)
    assert max(len(data) for _, data in rows) > 200_000

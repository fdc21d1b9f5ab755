"""Quick proofs that the test doubles behave like the real things they stand in for."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.doubles import archives
from tests.doubles.fake_ollama import SCRIPT, FakeOllama, install_model, parse_name, stop_process
from tests.doubles.release_server import ReleaseServer

# -- helpers ----------------------------------------------------------------------------------------


def request(
    url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def serve_env(models: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "OLLAMA_FAKE_"))}
    env.update(OLLAMA_HOST=f"127.0.0.1:{port}", OLLAMA_MODELS=str(models), **extra)
    return env


# -- fake ollama --------------------------------------------------------------------------------------


def test_version_flag() -> None:
    for flag in ("--version", "-v"):
        out = subprocess.run([sys.executable, str(SCRIPT), flag], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        assert out.stdout.strip() == "ollama version is 0.33.0"


def test_names_normalise_like_ollama() -> None:
    a = parse_name("qwen2.5-coder")
    b = parse_name("REGISTRY.ollama.ai/library/Qwen2.5-Coder:latest")
    assert a is not None and b is not None and a.key == b.key and a.display() == "qwen2.5-coder:latest"
    hf = parse_name("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")
    assert hf is not None and hf.display() == "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
    for bad in ("", "a b", "x:", "/x", "ns.dot/x", "-x", "a/b/c/d"):
        assert parse_name(bad) is None, bad


def test_serve_pull_list_show_delete(tmp_path: Path) -> None:
    models = tmp_path / "models"
    with FakeOllama(models) as fake:
        assert "Listening on 127.0.0.1:" in fake.log and "(version 0.33.0)" in fake.log
        status, headers, body = request(fake.url, "GET", "/")
        assert (status, body) == (200, b"Ollama is running")
        assert headers["content-type"].startswith("text/plain")
        assert request(fake.url, "HEAD", "/")[0] == 200
        assert json.loads(request(fake.url, "GET", "/api/version")[2]) == {"version": "0.33.0"}
        assert json.loads(request(fake.url, "GET", "/api/tags")[2]) == {"models": []}
        assert json.loads(request(fake.url, "GET", "/api/ps")[2]) == {"models": []}

        status, headers, raw = request(fake.url, "POST", "/api/pull", {"model": "smollm2:135m"})
        assert status == 200 and headers["content-type"] == "application/x-ndjson"
        lines = ndjson(raw)
        assert lines[0] == {"status": "pulling manifest"}
        assert [x["status"] for x in lines[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
        progress = [x for x in lines if "digest" in x]
        digests = list(dict.fromkeys(x["digest"] for x in progress))
        assert len(digests) == 4  # model, template, params, config
        for digest in digests:
            mine = [x for x in progress if x["digest"] == digest]
            assert "completed" not in mine[0]  # absent while 0
            assert mine[-1]["completed"] == mine[-1]["total"]
            assert mine[0]["status"] == f"pulling {digest[7:19]}"
            blob = models / "blobs" / digest.replace(":", "-")
            assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == digest
        assert len([x for x in progress if x["digest"] == digests[0]]) > 2  # real progress on the model
        manifest_path = models / "manifests/registry.ollama.ai/library/smollm2/135m"
        manifest = json.loads(manifest_path.read_bytes())
        assert manifest["schemaVersion"] == 2
        assert [x["mediaType"] for x in manifest["layers"]] == [
            "application/vnd.ollama.image.model",
            "application/vnd.ollama.image.template",
            "application/vnd.ollama.image.params",
        ]

        tags = json.loads(request(fake.url, "GET", "/api/tags")[2])["models"]
        assert [m["name"] for m in tags] == ["smollm2:135m"]
        entry = tags[0]
        assert entry["model"] == "smollm2:135m"
        assert entry["digest"] == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        assert entry["size"] == sum(x["size"] for x in [manifest["config"], *manifest["layers"]])
        assert entry["modified_at"].endswith("Z") or entry["modified_at"][-6] in "+-"
        assert entry["details"]["format"] == "gguf" and entry["details"]["parameter_size"] == "134.52M"
        openai = json.loads(request(fake.url, "GET", "/v1/models")[2])
        assert openai["object"] == "list" and openai["data"][0]["id"] == "smollm2:135m"

        # Pulling again: every layer is present, one line each with total == completed.
        again = ndjson(request(fake.url, "POST", "/api/pull", {"name": "SmolLM2:135m", "stream": True})[2])
        present = [x for x in again if "digest" in x]
        assert len(present) == 4 and all(x["total"] == x["completed"] for x in present)
        assert again[-1] == {"status": "success"}

        full = "registry.ollama.ai/library/smollm2:135m"
        status, _, body = request(fake.url, "POST", "/api/show", {"model": full})
        assert status == 200 and json.loads(body)["details"]["family"] == "llama"
        status, _, body = request(fake.url, "POST", "/api/show", {"model": "nope"})
        assert (status, json.loads(body)) == (404, {"error": "model 'nope' not found"})

        unknown = request(fake.url, "POST", "/api/pull", {"model": "does-not-exist"})
        assert unknown[0] == 200
        assert ndjson(unknown[2])[-1] == {"error": "pull model manifest: file does not exist"}
        invalid = request(fake.url, "POST", "/api/pull", {"model": "bad name!"})
        assert (invalid[0], json.loads(invalid[2])) == (400, {"error": "invalid model name"})
        assert request(fake.url, "GET", "/", headers={"Host": "evil.example.com"})[:3:2] == (403, b"")

        status, _, body = request(fake.url, "DELETE", "/api/delete", {"model": "smollm2:135m"})
        assert (status, body) == (200, b"")
        assert not manifest_path.exists() and not list((models / "blobs").iterdir())
        status, _, body = request(fake.url, "DELETE", "/api/delete", {"model": "smollm2:135m"})
        assert (status, json.loads(body)) == (404, {"error": "model 'smollm2:135m' not found"})
        assert json.loads(request(fake.url, "GET", "/api/tags")[2]) == {"models": []}
    assert fake.proc is not None and fake.proc.returncode == 0  # SIGTERM is a clean exit
    assert '"/api/pull"' in fake.log  # gin-style request lines


def test_store_is_shared_and_survives_restart(tmp_path: Path) -> None:
    models = tmp_path / "shared"
    install_model(models, "qwen2.5-coder:1.5b")  # as if another Ollama had pulled it
    for _ in range(2):
        with FakeOllama(models) as fake:
            tags = json.loads(request(fake.url, "GET", "/api/tags")[2])["models"]
            assert [m["name"] for m in tags] == ["qwen2.5-coder:1.5b"]


def test_shared_layers_survive_deleting_one_name(tmp_path: Path) -> None:
    models = tmp_path / "models"
    install_model(models, "qwen2.5-coder:7b")
    with FakeOllama(models) as fake:
        lines = ndjson(request(fake.url, "POST", "/api/pull", {"model": "qwen2.5-coder"})[2])
        assert all(x["total"] == x["completed"] for x in lines if "digest" in x)  # same blobs as :7b
        assert request(fake.url, "DELETE", "/api/delete", {"model": "qwen2.5-coder:7b"})[0] == 200
        assert request(fake.url, "POST", "/api/show", {"model": "qwen2.5-coder:latest"})[0] == 200
        assert len(list((models / "blobs").iterdir())) == 4


def test_busy_port_is_refused(tmp_path: Path) -> None:
    port = archives.free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        out = subprocess.run(
            [sys.executable, str(SCRIPT), "serve"],
            env=serve_env(tmp_path / "m", port),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 1
    assert f"Error: listen tcp 127.0.0.1:{port}: bind: address already in use" in out.stderr


def test_fault_knobs(tmp_path: Path) -> None:
    models = tmp_path / "models"
    want = "digest mismatch, file must be downloaded again: want sha256:aaa, got sha256:bbb"
    with FakeOllama(models, env={"OLLAMA_FAKE_PULL_ERROR": want}) as fake:
        lines = ndjson(request(fake.url, "POST", "/api/pull", {"model": "llama3.2"})[2])
        assert any("completed" in x for x in lines) and lines[-1] == {"error": want}
        status, _, body = request(fake.url, "POST", "/api/pull", {"model": "llama3.2", "stream": False})
        assert (status, json.loads(body)) == (500, {"error": want})
    assert not list((models / "blobs").iterdir()) and not list((models / "manifests").iterdir())

    out = subprocess.run(
        [sys.executable, str(SCRIPT), "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        env=serve_env(models, archives.free_port(), OLLAMA_FAKE_EXIT_AT_ONCE="1"),
    )
    assert out.returncode == 1 and out.stderr.startswith("Error: ")

    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps({"tiny:1b": {"model_size": 1000}}))
    with FakeOllama(models, env={"OLLAMA_FAKE_CATALOG": str(catalog)}) as fake:
        tiny = ndjson(request(fake.url, "POST", "/api/pull", {"model": "tiny:1b"})[2])
        assert tiny[-1] == {"status": "success"}
        gone = ndjson(request(fake.url, "POST", "/api/pull", {"model": "smollm2:135m"})[2])
        assert gone[-1] == {"error": "pull model manifest: file does not exist"}


def _wait_for_handler(pid: int, signum: int, timeout: float = 30.0) -> None:
    """Until the process catches signum (Linux: its SigCgt mask; elsewhere a fixed half second)."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout
    while True:
        caught = next(line for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signum - 1)):
            return
        assert time.monotonic() < deadline, "the fake never installed its handler"
        time.sleep(0.01)


def test_sigterm_during_start_delay_exits_zero(tmp_path: Path) -> None:
    env = serve_env(tmp_path / "m", archives.free_port(), OLLAMA_FAKE_START_DELAY="30")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "serve"], env=env, stderr=subprocess.DEVNULL)
    try:
        _wait_for_handler(proc.pid, signal.SIGTERM)  # in the delay, not in Python's start-up before it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)


def test_unpacked_release_runs(tmp_path: Path) -> None:
    assets = archives.build_release(tmp_path / "rel", "0.32.1", platforms=("linux-amd64",))
    dest = tmp_path / "ollama"
    with (
        assets["ollama-linux-amd64.tar.zst"].open("rb") as raw,
        tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(raw), mode="r|") as tar,
    ):
        tar.extractall(dest, filter="data")
    program = dest / "bin" / "ollama"
    assert os.access(program, os.X_OK)
    with FakeOllama(tmp_path / "models", argv=[str(program)]) as fake:
        assert json.loads(request(fake.url, "GET", "/api/version")[2]) == {"version": "0.32.1"}


# -- release server ----------------------------------------------------------------------------------


@pytest.fixture()
def release(tmp_path: Path) -> tuple[ReleaseServer, bytes]:
    data = bytes(range(256)) * 1000  # 256,000 bytes
    (tmp_path / "v0.33.0").mkdir()
    (tmp_path / "v0.33.0" / "asset.bin").write_bytes(data)
    return ReleaseServer(tmp_path, latest="0.33.0"), data


def test_release_server_ranges_and_redirect(release: tuple[ReleaseServer, bytes]) -> None:
    server, data = release
    with server:
        path = "/download/v0.33.0/asset.bin"
        status, headers, body = request(server.url, "GET", path)
        assert (status, body, headers["content-length"]) == (200, data, str(len(data)))
        status, headers, body = request(server.url, "GET", path, headers={"Range": "bytes=1000-"})
        assert (status, body) == (206, data[1000:])
        assert headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        status, headers, body = request(server.url, "GET", path, headers={"Range": "bytes=10-19"})
        assert (status, body, headers["content-length"]) == (206, data[10:20], "10")
        status, headers, _ = request(server.url, "GET", path, headers={"Range": f"bytes={len(data)}-"})
        assert (status, headers["content-range"]) == (416, f"bytes */{len(data)}")
        status, headers, body = request(server.url, "HEAD", path)
        assert (status, body, headers["content-length"]) == (200, b"", str(len(data)))
        status, headers, _ = request(server.url, "GET", "/latest/download/asset.bin")
        assert (status, headers["location"]) == (302, server.url + path)
        assert request(server.url, "GET", "/download/v0.33.0/missing.bin")[0] == 404
        assert request(server.url, "GET", "/download/0.33.0/asset.bin")[0] == 404  # the tag keeps its v
        server.ignore_range = True
        assert request(server.url, "GET", path, headers={"Range": "bytes=5-"})[::2] == (200, data)
        assert [r.status for r in server.requests] == [200, 206, 206, 416, 200, 302, 404, 404, 200]


def test_release_server_faults(release: tuple[ReleaseServer, bytes]) -> None:
    server, data = release
    path = "/download/v0.33.0/asset.bin"
    with server:
        server.cut_after = 100_000
        with pytest.raises(http.client.IncompleteRead) as cut:
            request(server.url, "GET", path)
        assert len(cut.value.partial) == 100_000
        assert server.cut_after is None  # one cut by default, then the knob resets
        status, _, body = request(server.url, "GET", path, headers={"Range": "bytes=100000-"})
        assert (status, body) == (206, data[100_000:])
        assert server.bytes_sent[path] == len(data)  # the resume fetched nothing twice

        server.reset_stats()
        server.fail_status, server.fail_times = 503, 2
        assert [request(server.url, "GET", path)[0] for _ in range(3)] == [503, 503, 200]

        server.stall_seconds, server.stall_times = 0.4, 1
        started = time.monotonic()
        assert request(server.url, "GET", path)[2] == data
        assert time.monotonic() - started >= 0.4
        assert server.stall_seconds == 0


# -- archives --------------------------------------------------------------------------------------


def test_release_assets_and_checksums(tmp_path: Path) -> None:
    assets = archives.build_release(
        tmp_path, "0.33.0", tamper={"ollama-darwin.tgz"}, omit_checksum={"ollama-windows-amd64.zip"}
    )
    sums = archives.read_checksums(assets["sha256sum.txt"])
    assert sorted(sums) == ["ollama-darwin.tgz", "ollama-linux-amd64.tar.zst", "ollama-linux-arm64.tar.zst"]
    assert "  ./ollama-linux-amd64.tar.zst" in assets["sha256sum.txt"].read_text()
    assert sums["ollama-linux-amd64.tar.zst"] == archives.sha256_file(assets["ollama-linux-amd64.tar.zst"])
    assert sums["ollama-darwin.tgz"] != archives.sha256_file(assets["ollama-darwin.tgz"])

    linux = archives.archive_members(assets["ollama-linux-amd64.tar.zst"])
    assert linux["bin/ollama"][:2] == ("file", 0o755)
    assert {"lib/ollama/libggml-base.so", "lib/ollama/llama-server"} <= set(linux)
    with pytest.raises(zstandard.ZstdError):  # no content size in the frame, like `zstd` in a pipe
        zstandard.ZstdDecompressor().decompress(assets["ollama-linux-amd64.tar.zst"].read_bytes())
    assert "ollama" in archives.archive_members(assets["ollama-darwin.tgz"])
    assert "ollama.exe" in archives.archive_members(assets["ollama-windows-amd64.zip"])

    old = archives.build_release(tmp_path, "0.13.5", platforms=("linux-amd64",))
    assert "ollama-linux-amd64.tgz" in old
    with tarfile.open(old["ollama-linux-amd64.tgz"]) as tar:
        assert tar.getmember("bin/ollama").uid == 0


@pytest.mark.parametrize(
    ("kind", "asset", "member"),
    [
        ("traversal", "ollama-linux-amd64.tar.zst", "../evil.txt"),
        ("absolute", "ollama-linux-amd64.tgz", None),
        ("symlink", "ollama-linux-amd64.tar.zst", "lib/ollama/link"),
        ("fifo", "ollama-linux-amd64.tar.zst", "lib/ollama/fifo"),
        ("device", "ollama-linux-amd64.tgz", "lib/ollama/null"),
        ("traversal", "ollama-windows-amd64.zip", "../evil.txt"),
    ],
)
def test_malicious_archives(tmp_path: Path, kind: str, asset: str, member: str | None) -> None:
    built = archives.build_malicious(tmp_path, "0.33.0", kind, asset=asset)
    members = archives.archive_members(built[asset])
    assert (member or str(built["target"])) in members
    assert "bin/ollama" in members or "ollama.exe" in members
    assert archives.read_checksums(built["sha256sum.txt"])[asset] == archives.sha256_file(built[asset])

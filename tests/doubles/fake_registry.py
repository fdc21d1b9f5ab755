"""A loopback stand-in for the Ollama registry and the CDN its blob URLs redirect to.

Protocol as in shared/reference/ollama.md: `GET /v2/NS/MODEL/manifests/TAG` answers a docker v2 manifest
(404 for unknown models); `GET /v2/NS/MODEL/blobs/sha256:HEX` answers 307 to a second server (the "CDN",
another port) with a fake signed query string; the CDN serves the blob with Range support (206).

Knobs (attributes, read at each request, so a test may change them between calls):
  ignore_range   answer 200 with the whole blob to every request
  ignore_range_after  ... or only after this many blob requests were served normally
  cut_after      close the connection after this many body bytes ...
  cut_times      ... for this many responses (then serve normally)
  stall_seconds  once (stall_times), go silent for this long after stall_after body bytes
  corrupt        digests whose bytes are served with one byte flipped
  throttle       bytes per second per response (None: as fast as the kernel goes)
  cdn_fail       HTTP statuses answered to the next CDN requests, one each (e.g. [503])
Every CDN request is logged in `cdn_log` (digest, Range header, status, bytes sent). Large files are
served with os.sendfile straight from disk. `add_model` again with another spec publishes a new version
under the same name (the old blobs stay served); `set_manifest` serves given manifest bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

SIGNATURE = "secret-signature-0123456789"
MEDIA = "application/vnd.ollama.image."
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
SEND_PIECE = 4 * 1024 * 1024


@dataclass
class CdnRequest:
    digest: str
    range: str | None
    status: int
    start: int = 0
    end: int = 0  # exclusive: what this response was to carry
    sent: int = 0


@dataclass
class RegistryRequest:
    path: str
    accept: str | None
    status: int


@dataclass
class _Blob:
    source: Path | bytes
    size: int


@dataclass
class _Model:
    manifest: bytes
    layers: dict[str, str] = field(default_factory=dict)  # kind -> digest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(8 * 1024 * 1024)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _split_name(name: str) -> tuple[str, str, str]:
    base, _, tag = name.partition(":")
    ns, _, model = base.rpartition("/")
    return (ns or "library").lower(), model.lower(), (tag or "latest").lower()


class FakeRegistry:
    def __init__(
        self,
        models: dict[str, dict[str, Any]],
        *,
        ignore_range: bool = False,
        ignore_range_after: int | None = None,
        cut_after: int | None = None,
        cut_times: int = 1,
        stall_seconds: float = 0.0,
        stall_after: int = 256 * 1024,
        stall_times: int = 1,
        corrupt: set[str] | None = None,
        throttle: int | None = None,
        cdn_fail: list[int] | None = None,
    ) -> None:
        self.ignore_range, self.ignore_range_after = ignore_range, ignore_range_after
        self.cut_after, self.cut_times = cut_after, cut_times
        self.stall_seconds, self.stall_after, self.stall_times = stall_seconds, stall_after, stall_times
        self.corrupt: set[str] = set(corrupt or ())
        self.throttle = throttle
        self.cdn_fail: list[int] = list(cdn_fail or [])
        self.cdn_log: list[CdnRequest] = []
        self.registry_log: list[RegistryRequest] = []
        self.blobs: dict[str, _Blob] = {}
        self.models: dict[tuple[str, str, str], _Model] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        for name, spec in models.items():
            self.add_model(name, spec)
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = self.cdn_url = ""

    # --- content ------------------------------------------------------------------------------------

    def _add_blob(self, source: Path | bytes) -> tuple[str, int]:
        if isinstance(source, Path):
            digest, size = "sha256:" + _sha256_file(source), source.stat().st_size
        else:
            digest, size = "sha256:" + hashlib.sha256(source).hexdigest(), len(source)
        self.blobs[digest] = _Blob(source, size)
        return digest, size

    def add_model(self, name: str, spec: dict[str, Any]) -> None:
        layers: list[dict[str, Any]] = []
        kinds: dict[str, str] = {}
        contents: list[tuple[str, Path | bytes]] = [("model", spec["model"])]
        if "template" in spec:
            contents.append(("template", spec["template"].encode()))
        if "system" in spec:
            contents.append(("system", spec["system"].encode()))
        if "params" in spec:
            contents.append(("params", json.dumps(spec["params"]).encode()))
        if "license" in spec:
            contents.append(("license", spec["license"].encode()))
        for kind, source in contents:
            digest, size = self._add_blob(source)
            kinds[kind] = digest
            layers.append({"mediaType": MEDIA + kind, "digest": digest, "size": size})
        config_json = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
        config, config_size = self._add_blob(config_json)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": config,
                "size": config_size,
            },
            "layers": layers,
        }
        self.models[_split_name(name)] = _Model(json.dumps(manifest).encode(), kinds)

    def set_manifest(self, name: str, manifest: bytes) -> None:
        """Serve these exact manifest bytes for `name` (e.g. the manifest an Ollama store holds), its
        blobs taken from `blobs` when it names bytes held there."""
        self.models[_split_name(name)] = _Model(manifest)

    def manifest(self, name: str) -> bytes:
        return self.models[_split_name(name)].manifest

    def digest(self, name: str, kind: str = "model") -> str:
        return self.models[_split_name(name)].layers[kind]

    def blob_url(self, digest: str, name: str = "library/x") -> str:
        ns, model, _ = _split_name(name)
        return f"{self.url}/v2/{ns}/{model}/blobs/{digest}"

    def sent(self, digest: str) -> int:
        """Body bytes the CDN sent for a digest, over all requests."""
        with self.lock:
            return sum(r.sent for r in self.cdn_log if r.digest == digest)

    def requests_for(self, digest: str) -> list[CdnRequest]:
        with self.lock:
            return [r for r in self.cdn_log if r.digest == digest]

    # --- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> FakeRegistry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        registry = self._serve(_RegistryHandler)
        cdn = self._serve(_CdnHandler)
        self.url = f"http://127.0.0.1:{registry.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{cdn.server_address[1]}"

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self._servers.append(server)
        self._threads.append(thread)
        return server

    def close(self) -> None:
        self.closing.set()  # ends stalls
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def fake(self) -> FakeRegistry:
        return self.server.fake  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)


_MANIFEST = re.compile(r"^/v2/([^/]+)/([^/]+)/manifests/([^/]+)$")
_BLOB = re.compile(r"^/v2/([^/]+)/([^/]+)/blobs/(sha256:[0-9a-f]{64})$")


class _RegistryHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        status = self._answer(path)
        with self.fake.lock:
            self.fake.registry_log.append(RegistryRequest(path, self.headers.get("Accept"), status))

    def _answer(self, path: str) -> int:
        fake = self.fake
        if m := _MANIFEST.match(path):
            model = fake.models.get((m[1].lower(), m[2].lower(), m[3].lower()))
            if model is None:
                body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
                self._reply(404, json.dumps(body).encode(), {"Content-Type": "application/json"})
                return 404
            self._reply(200, model.manifest, {"Content-Type": MANIFEST_TYPE})
            return 200
        if (m := _BLOB.match(path)) and m[3] in fake.blobs:
            location = f"{fake.cdn_url}/blobs/{m[3]}?X-Amz-Expires=86400&X-Amz-Signature={SIGNATURE}"
            self._reply(307, b"", {"Location": location})
            return 307
        self._reply(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', {"Content-Type": "application/json"})
        return 404


class _CdnHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        fake = self.fake
        parts = urlsplit(self.path)
        digest = parts.path.removeprefix("/blobs/")
        rec = CdnRequest(digest, self.headers.get("Range"), 0)
        with fake.lock:
            fake.cdn_log.append(rec)
            fail = fake.cdn_fail.pop(0) if fake.cdn_fail else None
            ignore = fake.ignore_range or (
                fake.ignore_range_after is not None and len(fake.cdn_log) > fake.ignore_range_after
            )
        blob = fake.blobs.get(digest)
        if parse_qs(parts.query).get("X-Amz-Signature") != [SIGNATURE]:
            rec.status = 403
        elif blob is None:
            rec.status = 404
        elif fail is not None:
            rec.status = fail
        if rec.status:
            self._reply(rec.status, b"<Error/>", {"Content-Type": "application/xml"})
            return
        assert blob is not None
        start, end = 0, blob.size
        rng = None if ignore else self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None or int(m[1]) >= blob.size:
                rec.status = 416
                self._reply(416, b"", {"Content-Range": f"bytes */{blob.size}"})
                return
            start = int(m[1])
            end = min(blob.size, int(m[2]) + 1) if m[2] else blob.size
        rec.status, rec.start, rec.end = (206 if rng else 200), start, end
        self.send_response(rec.status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{blob.size}")
        self.end_headers()
        self.wfile.flush()
        with fake.lock:
            cut = None
            if fake.cut_after is not None and fake.cut_times > 0 and end - start > fake.cut_after:
                fake.cut_times -= 1
                cut = fake.cut_after
            stall = None
            if fake.stall_seconds and fake.stall_times > 0 and end - start > fake.stall_after:
                fake.stall_times -= 1
                stall = start + fake.stall_after
            corrupt_at = blob.size // 2 if digest in fake.corrupt else None
        stop = end if cut is None else start + cut
        try:
            self._send_body(rec, blob, start, stop, stall=stall, corrupt_at=corrupt_at)
        except OSError:
            self.close_connection = True  # the client went away (a stall timeout, a cancelled part)
            return
        if cut is not None:
            self.close_connection = True  # socketserver shuts the socket down: the client sees EOF early

    def _send_body(
        self,
        rec: CdnRequest,
        blob: _Blob,
        start: int,
        stop: int,
        *,
        stall: int | None,
        corrupt_at: int | None,
    ) -> None:
        marks = {
            p
            for p in (stall, corrupt_at, None if corrupt_at is None else corrupt_at + 1)
            if p is not None and start < p < stop
        }
        bounds = [start, *sorted(marks), stop]
        src = blob.source
        with src.open("rb") if isinstance(src, Path) else open(os.devnull, "rb") as f:
            for a, b in zip(bounds, bounds[1:], strict=False):
                if a == stall:
                    self.fake.closing.wait(self.fake.stall_seconds)
                if a == corrupt_at:
                    orig = src[a] if isinstance(src, bytes) else os.pread(f.fileno(), 1, a)[0]
                    self.connection.sendall(bytes([orig ^ 0xFF]))
                    rec.sent += 1
                    continue
                self._send_range(rec, src, f, a, b)

    def _send_range(self, rec: CdnRequest, src: Path | bytes, f: Any, a: int, b: int) -> None:
        throttle = self.fake.throttle
        piece = SEND_PIECE if throttle is None else max(16 * 1024, throttle // 20)
        pos = a
        while pos < b:
            n = min(piece, b - pos)
            if isinstance(src, bytes):
                self.connection.sendall(memoryview(src)[pos : pos + n])
            else:
                n = os.sendfile(self.connection.fileno(), f.fileno(), pos, n)
                if n == 0:
                    raise OSError("file shorter than expected")
            pos += n
            rec.sent += n
            if throttle is not None and self.fake.closing.wait(n / throttle):
                raise OSError("server closing")

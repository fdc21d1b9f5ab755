#!/usr/bin/env python3
"""A stand-in for the `ollama` program, for offline tests.

Stdlib only and a single file, because the archive builder copies it into fake release archives as
`bin/ollama` (replacing the first line with a shebang). It follows /work/shared/reference/ollama.md:
the REST API, the model-name rules and the on-disk store (`manifests/HOST/NS/MODEL/TAG`,
`blobs/sha256-HEX`), so a store it writes is a real Ollama store and vice versa.

Environment knobs (besides OLLAMA_HOST, OLLAMA_MODELS, OLLAMA_NOPRUNE):
  OLLAMA_FAKE_CATALOG      path to JSON {"name:tag": {"model_size": N, ...}}; replaces the built-in catalog
  OLLAMA_FAKE_PULL_DELAY   seconds slept per progress step of a pull (default 0.02)
  OLLAMA_FAKE_PULL_ERROR   message: every pull streams some progress, then {"error": message}, writes nothing
  OLLAMA_FAKE_EXIT_AT_ONCE "1" (or a message): `serve` prints an error and exits 1 before binding
  OLLAMA_FAKE_START_DELAY  seconds slept before binding
  OLLAMA_FAKE_READY_DELAY  seconds after "Listening on" during which requests wait (GPU discovery)
  OLLAMA_FAKE_REPLY        text of the canned answer of /api/generate, /api/chat, /v1/chat/completions
  OLLAMA_FAKE_SIZE_VRAM    share (0 to 1) of a loaded model that /api/ps reports in GPU memory
                           (size_vram = share x size; default 1: all of it; 0: a CPU-only runner)

The bottom of the file has helpers for the tests themselves (FakeOllama, install_model, stop_process);
the script never uses them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

VERSION = "0.33.0"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DEFAULT_PORT = 11434

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_PARAMS = "application/vnd.ollama.image.params"

_BLOCK = 64 * 1024  # generation block of model bytes; fixed so content never depends on pacing
_FINISHED_BLOB = re.compile(r"^sha256-[0-9a-f]{64}$")

# ---------------------------------------------------------------------------------------------------
# Model names: [host/][namespace/]model[:tag], as ollama's types/model/name.go parses them.

_PART_MODEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_PART_NAMESPACE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$")
_PART_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$")


@dataclass(frozen=True)
class Name:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity of the model: ollama matches names case-insensitively."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def display(self) -> str:
        """Ollama's DisplayShortest: default host and namespace left out, tag always shown."""
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"

    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)


def parse_name(text: str) -> Name | None:
    """Parse a model name with ollama's defaults; None when it is invalid."""
    s = text.strip()
    tag = DEFAULT_TAG
    if s.rfind(":") > s.rfind("/"):
        s, tag = s.rsplit(":", 1)
    if "@" in s:  # a digest suffix selects by digest; the fake ignores it
        s = s.rsplit("@", 1)[0]
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    parts = s.split("/")
    if len(parts) > 3:
        return None
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        model = parts[0]
    ok = (
        bool(_PART_HOST.match(host))
        and bool(_PART_NAMESPACE.match(namespace))
        and bool(_PART_MODEL.match(model))
        and bool(_PART_MODEL.match(tag))
    )
    return Name(host, namespace, model, tag) if ok else None


# ---------------------------------------------------------------------------------------------------
# Logging to stderr, shaped like ollama's slog lines and gin's access log.

_log_lock = threading.Lock()


def _log(level: str, msg: str, **attrs: object) -> None:
    now = _dt.datetime.now().astimezone().isoformat(timespec="milliseconds")
    quoted = {k: json.dumps(v) if isinstance(v, str) and " " in v else v for k, v in attrs.items()}
    extra = "".join(f" {k}={v}" for k, v in quoted.items())
    with _log_lock:
        sys.stderr.write(f'time={now} level={level} source=routes.go:1 msg="{msg}"{extra}\n')
        sys.stderr.flush()


def _go_duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.6f}ms"
    return f"{seconds:.6f}s"


def _gin_log(status: int, seconds: float, client: str, method: str, path: str) -> None:
    stamp = time.strftime("%Y/%m/%d - %H:%M:%S")
    took = _go_duration(seconds)
    line = f'[GIN] {stamp} | {status:3d} | {took:>13} | {client:>15} | {method:<7} "{path}"\n'
    with _log_lock:
        sys.stderr.write(line)
        sys.stderr.flush()


def rfc3339nano(ns: int) -> str:
    """Go's time.RFC3339Nano in local time: trailing zeros of the fraction trimmed, Z for UTC."""
    secs, frac = divmod(ns, 1_000_000_000)
    moment = _dt.datetime.fromtimestamp(secs).astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{frac:09d}".rstrip("0")
    if digits:
        text += "." + digits
    offset = moment.utcoffset() or _dt.timedelta(0)
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


# ---------------------------------------------------------------------------------------------------
# The pull catalog: deterministic small models, so tests are fast and digests are stable.

_TEMPLATE = (
    b"{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    b"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    b"<|im_start|>assistant\n"
)
_PARAMS = b'{"stop":["<|im_start|>","<|im_end|>"]}'

_BUILTIN_CATALOG: dict[str, dict[str, Any]] = {
    "qwen2.5-coder:7b": {"family": "qwen2", "parameter_size": "7.6B", "quantization_level": "Q4_K_M"},
    # Same blobs as :7b, as on the real registry, so "layer already present" paths get exercised.
    "qwen2.5-coder:latest": {
        "family": "qwen2",
        "parameter_size": "7.6B",
        "quantization_level": "Q4_K_M",
        "seed": "qwen2.5-coder:7b",
    },
    "qwen2.5-coder:1.5b": {"family": "qwen2", "parameter_size": "1.5B", "quantization_level": "Q4_K_M"},
    # The other sizes the default model is chosen among (by RAM and GPU memory).
    "qwen2.5-coder:3b": {"family": "qwen2", "parameter_size": "3.1B", "quantization_level": "Q4_K_M"},
    "qwen2.5-coder:14b": {"family": "qwen2", "parameter_size": "14.8B", "quantization_level": "Q4_K_M"},
    "qwen2.5-coder:32b": {"family": "qwen2", "parameter_size": "32.8B", "quantization_level": "Q4_K_M"},
    "llama3.2:latest": {"family": "llama", "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
    "llama3.2:3b": {
        "family": "llama",
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
        "seed": "llama3.2:latest",
    },
    "smollm2:135m": {"family": "llama", "parameter_size": "134.52M", "quantization_level": "F16"},
    "deepseek-coder:6.7b": {"family": "llama", "parameter_size": "7B", "quantization_level": "Q4_0"},
    "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M": {
        "family": "llama",
        "parameter_size": "1.24B",
        "quantization_level": "Q4_K_M",
    },
}


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # "sha256:HEX"
    size: int
    seed: str = ""  # model layers are generated from a seed; others are held in `data`
    data: bytes = b""

    def chunks(self, start: int = 0) -> Generator[bytes, None, None]:
        """The layer's bytes from `start`, in generation blocks (the first may be shorter)."""
        if not self.seed:
            yield self.data[start:]
            return
        for index in range(start // _BLOCK, math.ceil(self.size / _BLOCK)):
            block = _model_block(self.seed, self.size, index)
            yield block[start - index * _BLOCK :] if index * _BLOCK < start else block


def _model_block(seed: str, size: int, index: int) -> bytes:
    length = min(_BLOCK, size - index * _BLOCK)
    block = random.Random(f"{seed}#{index}").randbytes(length)
    if index == 0:  # a GGUF v3 magic, so a sniffing reader sees a GGUF file
        block = (b"GGUF\x03\x00\x00\x00" + block[8:])[:length]
    return block


_digest_cache: dict[tuple[str, int], str] = {}


def _model_digest(seed: str, size: int) -> str:
    key = (seed, size)
    if key not in _digest_cache:
        h = hashlib.sha256()
        for index in range(math.ceil(size / _BLOCK)):
            h.update(_model_block(seed, size, index))
        _digest_cache[key] = "sha256:" + h.hexdigest()
    return _digest_cache[key]


def _bytes_layer(media_type: str, data: bytes) -> Layer:
    return Layer(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)


@dataclass(frozen=True)
class CatalogModel:
    name: Name
    layers: tuple[Layer, ...]
    config: Layer
    manifest: bytes
    error: str | None = None


def _catalog_model(name: Name, spec: Mapping[str, Any]) -> CatalogModel:
    seed = str(spec.get("seed") or name.display()).lower()
    size = spec.get("model_size")
    if not isinstance(size, int) or size <= 0:
        size = 200_000 + int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) % 400_000
    family = str(spec.get("family", "llama"))
    model = Layer(MEDIA_MODEL, _model_digest(seed, size), size, seed=seed)
    layers = (model, _bytes_layer(MEDIA_TEMPLATE, _TEMPLATE), _bytes_layer(MEDIA_PARAMS, _PARAMS))
    config_doc = {
        "model_format": "gguf",
        "model_family": family,
        "model_families": [family],
        "model_type": str(spec.get("parameter_size", "1B")),
        "file_type": str(spec.get("quantization_level", "Q4_K_M")),
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
    }
    config = _bytes_layer(MEDIA_CONFIG, _dumps(config_doc))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": x.media_type, "digest": x.digest, "size": x.size} for x in layers],
    }
    error = spec.get("error")
    return CatalogModel(name, layers, config, _dumps(manifest), str(error) if error else None)


def load_catalog(path: str | None = None) -> dict[tuple[str, str, str, str], CatalogModel]:
    """The pull catalog: OLLAMA_FAKE_CATALOG's JSON file when set, else the built-in one."""
    path = path if path is not None else os.environ.get("OLLAMA_FAKE_CATALOG")
    specs: Mapping[str, Any] = _BUILTIN_CATALOG
    if path:
        specs = json.loads(Path(path).read_text(encoding="utf-8"))
    catalog = {}
    for text, spec in specs.items():
        name = parse_name(text)
        if name is None:
            raise ValueError(f"invalid model name in catalog: {text!r}")
        catalog[name.key] = _catalog_model(name, spec or {})
    return catalog


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------------
# The model store on disk.


class PullError(Exception):
    pass


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifests = root / "manifests"
        self.blobs = root / "blobs"
        self.lock = threading.RLock()  # manifest writes and unused-blob removal
        self._blob_locks: dict[str, threading.Lock] = {}

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")

    def blob_lock(self, digest: str) -> threading.Lock:
        with self.lock:
            return self._blob_locks.setdefault(digest, threading.Lock())

    def entries(self) -> list[tuple[Name, Path]]:
        """Every manifest in the store: manifests/HOST/NAMESPACE/MODEL/TAG."""
        found: list[tuple[Name, Path]] = []
        if not self.manifests.is_dir():
            return found
        for path in sorted(self.manifests.glob("*/*/*/*")):
            if not path.is_file():
                continue
            host, namespace, model, tag = path.relative_to(self.manifests).parts
            name = parse_name(f"{host}/{namespace}/{model}:{tag}")
            if name is not None:
                found.append((name, path))
        return found

    def find(self, name: Name) -> Path | None:
        for other, path in self.entries():
            if other.key == name.key:
                return path
        return None

    @staticmethod
    def read_manifest(path: Path) -> dict[str, Any]:
        doc = json.loads(path.read_bytes())
        if not isinstance(doc, dict):
            raise ValueError("manifest is not an object")
        return doc

    @staticmethod
    def digests(manifest: Mapping[str, Any]) -> set[str]:
        items = [manifest.get("config") or {}, *(manifest.get("layers") or [])]
        return {str(x["digest"]) for x in items if isinstance(x, dict) and x.get("digest")}

    def referenced(self) -> set[str]:
        used: set[str] = set()
        for _, path in self.entries():
            with contextlib.suppress(OSError, ValueError):
                used |= self.digests(self.read_manifest(path))
        return used

    def remove_unused(self, candidates: set[str]) -> None:
        with self.lock:
            for digest in candidates - self.referenced():
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(digest).unlink()

    def write_manifest(self, name: Name, data: bytes, existing: Path | None) -> None:
        target = existing or self.manifests.joinpath(*name.parts())
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def prune(self) -> int:
        """At start ollama drops blob-store files that are not finished blobs and over an hour old."""
        removed = 0
        if not self.blobs.is_dir():
            return removed
        cutoff = time.time() - 3600
        for path in self.blobs.iterdir():
            if path.is_file() and not _FINISHED_BLOB.match(path.name) and path.stat().st_mtime < cutoff:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        return removed

    def details(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {}
        digest = (manifest.get("config") or {}).get("digest")
        if digest:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(self.blob_path(str(digest)).read_bytes())
                config = loaded if isinstance(loaded, dict) else {}
        family = str(config.get("model_family") or "")
        return {
            "parent_model": "",
            "format": str(config.get("model_format") or "gguf"),
            "family": family,
            "families": list(config.get("model_families") or ([family] if family else [])) or None,
            "parameter_size": str(config.get("model_type") or ""),
            "quantization_level": str(config.get("file_type") or ""),
        }

    def summary(self, name: Name, path: Path) -> dict[str, Any]:
        """One model as /api/tags lists it."""
        data = path.read_bytes()
        manifest = self.read_manifest(path)
        items = [manifest.get("config") or {}, *(manifest.get("layers") or [])]
        return {
            "name": name.display(),
            "model": name.display(),
            "modified_at": rfc3339nano(path.stat().st_mtime_ns),
            "size": sum(int(x.get("size") or 0) for x in items if isinstance(x, dict)),
            "digest": hashlib.sha256(data).hexdigest(),
            "details": self.details(manifest),
        }

    def layer_text(self, manifest: Mapping[str, Any], media_type: str) -> str:
        for layer in manifest.get("layers") or []:
            if isinstance(layer, dict) and layer.get("mediaType") == media_type:
                with contextlib.suppress(OSError):
                    return self.blob_path(str(layer["digest"])).read_text(encoding="utf-8", errors="replace")
        return ""


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


def pull_events(
    store: Store,
    name: Name,
    catalog: Mapping[tuple[str, str, str, str], CatalogModel],
    *,
    delay: float | None = None,
    fault: str | None = None,
) -> Generator[dict[str, Any], None, None]:
    """The progress of a pull, as the ndjson objects ollama streams; raises PullError on failure.

    `delay` and `fault` default to OLLAMA_FAKE_PULL_DELAY and OLLAMA_FAKE_PULL_ERROR.
    Closing the generator mid-way (client gone) leaves the `-partial` file, as ollama does.
    """
    yield {"status": "pulling manifest"}
    entry = catalog.get(name.key)
    if entry is None:
        raise PullError("pull model manifest: file does not exist")
    if fault is None:
        fault = os.environ.get("OLLAMA_FAKE_PULL_ERROR", "")
    fault = fault or entry.error
    if delay is None:
        delay = _env_float("OLLAMA_FAKE_PULL_DELAY", 0.02)
    existing = store.find(name)
    old: set[str] = set()
    if existing is not None:
        with contextlib.suppress(OSError, ValueError):
            old = store.digests(store.read_manifest(existing))
    store.blobs.mkdir(parents=True, exist_ok=True)
    fetched: list[Layer] = []
    for layer in (*entry.layers, entry.config):
        status = {"status": f"pulling {layer.digest[7:19]}", "digest": layer.digest, "total": layer.size}
        final = store.blob_path(layer.digest)
        if final.exists():
            yield {**status, "completed": layer.size}
            continue
        with store.blob_lock(layer.digest):
            if final.exists():  # another pull finished it while this one waited for the lock
                yield {**status, "completed": layer.size}
                continue
            partial = final.with_name(final.name + "-partial")
            done = partial.stat().st_size if partial.exists() else 0
            if done > layer.size:
                done = 0
            # Steps of whole blocks, at most ~8 a layer, so a pull takes a fraction of a second.
            step = max(_BLOCK, math.ceil(layer.size / 8 / _BLOCK) * _BLOCK)
            yield {**status, "completed": done} if done else status
            with partial.open("r+b" if done else "wb") as out:
                out.seek(done)
                pending = b""
                for chunk in layer.chunks(done):
                    pending += chunk
                    while len(pending) >= step or (pending and done + len(pending) == layer.size):
                        piece, pending = pending[:step], pending[step:]
                        out.write(piece)
                        out.flush()
                        done += len(piece)
                        time.sleep(delay)
                        if fault and (done * 2 >= layer.size or done == layer.size):
                            out.close()
                            partial.unlink(missing_ok=True)
                            raise PullError(fault)
                        yield {**status, "completed": done}
            os.replace(partial, final)
            fetched.append(layer)
    yield {"status": "verifying sha256 digest"}
    if fault:  # every layer was already present: fail where ollama checks digests
        raise PullError(fault)
    for layer in fetched:
        path = store.blob_path(layer.digest)
        got = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        if got != layer.digest:
            path.unlink(missing_ok=True)
            raise PullError(f"digest mismatch, file must be downloaded again: want {layer.digest}, got {got}")
    yield {"status": "writing manifest"}
    with store.lock:
        store.write_manifest(entry.name, entry.manifest, existing)
    if old and not os.environ.get("OLLAMA_NOPRUNE"):
        yield {"status": "removing unused layers"}
        store.remove_unused(old)
    yield {"status": "success"}


# ---------------------------------------------------------------------------------------------------
# The HTTP server.


@dataclass
class App:
    store: Store
    bound_loopback: bool
    ready: threading.Event = field(default_factory=threading.Event)
    loaded: dict[tuple[str, str, str, str], float] = field(default_factory=dict)  # name -> expiry
    loaded_lock: threading.Lock = field(default_factory=threading.Lock)


_PRIVATE_NETS = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
]


def host_allowed(host_header: str, *, bound_loopback: bool) -> bool:
    """Ollama's allowedHostsMiddleware: only checked when the server listens on a loopback address."""
    if not bound_loopback:
        return True
    host = host_header
    if host.startswith("[") and "]" in host:
        host = host[1 : host.index("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return ip.is_loopback or ip.is_unspecified or any(ip in net for net in _PRIVATE_NETS)
    host = host.lower()
    if host in ("", "localhost", socket.gethostname().lower()):
        return True
    return host.endswith((".localhost", ".local", ".internal"))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like Go's net/http
    server: _Server

    # -- plumbing -----------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        pass  # our own gin-style line is written per request instead

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        self.send_response_only(code, message)  # Go sends no Server header
        self.send_header("Date", self.date_time_string())

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, _dumps(obj), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _request_json(self) -> dict[str, Any] | None:
        """The body as an object; None after answering 400 as ollama does."""
        if not self._body.strip():
            self._error(400, "missing request body")
            return None
        try:
            doc = json.loads(self._body)
        except ValueError as exc:
            self._error(400, f"invalid character in request body: {exc}")
            return None
        if not isinstance(doc, dict):
            self._error(400, f"json: cannot unmarshal {type(doc).__name__} into Go value of type api.Request")
            return None
        return doc

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        started = time.monotonic()
        self._status = 0
        path = self.path.split("?", 1)[0]
        app = self.server.app
        try:
            self._body = self._read_body()
            app.ready.wait()
            if not host_allowed(self.headers.get("Host", ""), bound_loopback=app.bound_loopback):
                self._send(403, b"", None)
                return
            route = _ROUTES.get((self.command, path))
            if route is None:
                self._send(404, b"404 page not found", "text/plain")
                return
            route(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            _gin_log(self._status, time.monotonic() - started, self.client_address[0], self.command, path)

    # -- routes -------------------------------------------------------------------------------------

    def root(self) -> None:
        self._send(200, b"Ollama is running", "text/plain; charset=utf-8")

    def version(self) -> None:
        self._json(200, {"version": VERSION})

    def tags(self) -> None:
        store = self.server.app.store
        models = []
        for name, path in store.entries():
            with contextlib.suppress(OSError, ValueError, KeyError):
                models.append((path.stat().st_mtime_ns, store.summary(name, path)))
        models.sort(key=lambda item: -item[0])  # newest first, like ollama's ListHandler
        self._json(200, {"models": [m for _, m in models]})

    def ps(self) -> None:
        app = self.server.app
        now = time.time()
        models = []
        with app.loaded_lock:
            for key, expiry in list(app.loaded.items()):
                if expiry <= now:
                    del app.loaded[key]
            loaded = dict(app.loaded)
        for name, path in app.store.entries():
            until = loaded.get(name.key)
            if until is not None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    info = app.store.summary(name, path)
                    info.pop("modified_at")
                    share = min(1.0, max(0.0, _env_float("OLLAMA_FAKE_SIZE_VRAM", 1.0)))
                    info.update(
                        {
                            "expires_at": rfc3339nano(int(until * 1e9)),
                            "size_vram": int(info["size"] * share),
                            "context_length": 4096,
                        }
                    )
                    models.append(info)
        self._json(200, {"models": models})

    def pull(self) -> None:
        req = self._request_json()
        if req is None:
            return
        name = parse_name(str(req.get("model") or req.get("name") or ""))
        if name is None:
            self._error(400, "invalid model name")
            return
        events = pull_events(self.server.app.store, name, load_catalog())
        if req.get("stream") is False:
            try:
                for _ in events:
                    pass
            except PullError as exc:
                self._error(500, str(exc))
                return
            self._json(200, {"status": "success"})
            return
        self._start_stream("application/x-ndjson")
        try:
            for event in events:
                self._chunk(_dumps(event) + b"\n")
        except PullError as exc:
            self._chunk(_dumps({"error": str(exc)}) + b"\n")
        finally:
            events.close()
        self._end_stream()

    def _find(self, req: Mapping[str, Any]) -> tuple[str, Name | None, Path | None]:
        given = str(req.get("model") or req.get("name") or "")
        name = parse_name(given)
        return given, name, self.server.app.store.find(name) if name else None

    def show(self) -> None:
        req = self._request_json()
        if req is None:
            return
        given, name, path = self._find(req)
        if not given:
            self._error(400, "model is required")
            return
        if name is None or path is None:
            self._error(404, f"model '{given}' not found")
            return
        store = self.server.app.store
        manifest = store.read_manifest(path)
        details = store.details(manifest)
        template = store.layer_text(manifest, MEDIA_TEMPLATE)
        params: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            params = json.loads(store.layer_text(manifest, MEDIA_PARAMS) or "{}")
        parameters = "\n".join(
            f"{key:<30} {json.dumps(v)}"
            for key, values in params.items()
            for v in (values if isinstance(values, list) else [values])
        )
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {name.display()}\n\nFROM {store.blob_path(manifest['layers'][0]['digest'])}\n"
            f'TEMPLATE """{template}"""\n'
        )
        self._json(
            200,
            {
                "license": "",
                "modelfile": modelfile,
                "parameters": parameters,
                "template": template,
                "details": details,
                "model_info": {"general.architecture": details["family"], "general.file_type": 15},
                "capabilities": ["completion"],
                "modified_at": rfc3339nano(path.stat().st_mtime_ns),
            },
        )

    def delete(self) -> None:
        req = self._request_json()
        if req is None:
            return
        given, name, path = self._find(req)
        if name is None:
            self._error(400, f"name {json.dumps(given)} is invalid")
            return
        if path is None:
            self._error(404, f"model '{given}' not found")
            return
        store = self.server.app.store
        with store.lock:
            digests: set[str] = set()
            with contextlib.suppress(OSError, ValueError):
                digests = store.digests(store.read_manifest(path))
            path.unlink(missing_ok=True)
            for parent in list(path.parents)[:3]:  # drop emptied MODEL/NAMESPACE/HOST folders
                with contextlib.suppress(OSError):
                    parent.rmdir()
            if not os.environ.get("OLLAMA_NOPRUNE"):
                store.remove_unused(digests)
        with self.server.app.loaded_lock:
            self.server.app.loaded.pop(name.key, None)
        self._send(200, b"", None)

    def openai_models(self) -> None:
        store = self.server.app.store
        data = []
        for name, path in store.entries():
            with contextlib.suppress(OSError):
                data.append(
                    {
                        "id": name.display(),
                        "object": "model",
                        "created": int(path.stat().st_mtime),
                        "owned_by": name.namespace,
                    }
                )
        self._json(200, {"object": "list", "data": data})

    # -- canned inference, enough for smoke checks --------------------------------------------------

    def _load(self, req: Mapping[str, Any]) -> tuple[str, Name] | None:
        given, name, path = self._find(req)
        if not given:
            self._error(400, "model is required")
            return None
        if name is None or path is None:
            self._error(404, f"model {json.dumps(given)} not found, try pulling it first")
            return None
        keep = req.get("keep_alive")
        app = self.server.app
        with app.loaded_lock:
            if keep in (0, "0", "0s"):
                app.loaded.pop(name.key, None)
            else:
                app.loaded[name.key] = time.time() + 300
        return given, name

    def _answer(self, req: Mapping[str, Any], *, chat: bool) -> None:
        found = self._load(req)
        if found is None:
            return
        given, _ = found
        empty = not req.get("messages") if chat else not req.get("prompt")
        words = [] if empty else os.environ.get("OLLAMA_FAKE_REPLY", "Hello from fake Ollama.").split(" ")
        tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]

        def piece(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": given, "created_at": rfc3339nano(time.time_ns())}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = done
            if done:
                out["done_reason"] = "load" if empty else "stop"
                if not empty:
                    out.update(
                        {"total_duration": 1000000, "eval_count": len(tokens), "eval_duration": 500000}
                    )
            return out

        if req.get("stream") is False or empty:
            self._json(200, piece("".join(tokens), True))
            return
        self._start_stream("application/x-ndjson")
        for token in tokens:
            self._chunk(_dumps(piece(token, False)) + b"\n")
        self._chunk(_dumps(piece("", True)) + b"\n")
        self._end_stream()

    def generate(self) -> None:
        req = self._request_json()
        if req is not None:
            self._answer(req, chat=False)

    def chat(self) -> None:
        req = self._request_json()
        if req is not None:
            self._answer(req, chat=True)

    def openai_chat(self) -> None:
        try:
            req = json.loads(self._body or b"null")
        except ValueError:
            req = None
        if not isinstance(req, dict):
            self._json(
                400,
                {
                    "error": {
                        "message": "invalid request",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
            )
            return
        given, name, path = self._find(req)
        if name is None or path is None:
            message = f"model {json.dumps(given)} not found, try pulling it first"
            self._json(404, {"error": {"message": message, "type": "api_error", "param": None, "code": None}})
            return
        reply = os.environ.get("OLLAMA_FAKE_REPLY", "Hello from fake Ollama.")
        base = {
            "id": "chatcmpl-123",
            "created": int(time.time()),
            "model": given,
            "system_fingerprint": "fp_ollama",
        }
        if not req.get("stream"):
            self._json(
                200,
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 10,
                        "completion_tokens": len(reply.split()),
                        "total_tokens": 10,
                    },
                },
            )
            return
        self._start_stream("text/event-stream")
        for i, word in enumerate(reply.split(" ")):
            delta = {"role": "assistant", "content": word if i == 0 else " " + word}
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            self._chunk(b"data: " + _dumps(chunk) + b"\n\n")
        end = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
        last = {**base, "object": "chat.completion.chunk", "choices": [end]}
        self._chunk(b"data: " + _dumps(last) + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self._end_stream()


_ROUTES: dict[tuple[str, str], Any] = {
    **{(m, "/"): _Handler.root for m in ("GET", "HEAD")},
    **{(m, "/api/version"): _Handler.version for m in ("GET", "HEAD")},
    **{(m, "/api/tags"): _Handler.tags for m in ("GET", "HEAD")},
    ("GET", "/api/ps"): _Handler.ps,
    ("POST", "/api/pull"): _Handler.pull,
    ("POST", "/api/show"): _Handler.show,
    ("DELETE", "/api/delete"): _Handler.delete,
    ("POST", "/api/generate"): _Handler.generate,
    ("POST", "/api/chat"): _Handler.chat,
    ("GET", "/v1/models"): _Handler.openai_models,
    ("POST", "/v1/chat/completions"): _Handler.openai_chat,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stream in flight must not hold up shutdown
    allow_reuse_address = True  # as Go does on Linux; a port someone listens on is still refused
    allow_reuse_port = False

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, app: App) -> None:
        self.address_family = family
        self.app = app
        super().__init__(address, _Handler)


def parse_ollama_host(value: str | None) -> tuple[str, int]:
    """OLLAMA_HOST as ollama's envconfig.Host() reads it: `[scheme://]host[:port][/path]`."""
    s = (value or "").strip().strip("\"'")
    default_port = DEFAULT_PORT
    scheme, sep, hostport = s.partition("://")
    if not sep:
        hostport = s
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport = hostport.split("/", 1)[0]
    host, port_text = "", ""
    if hostport.startswith("[") and "]:" in hostport:
        host, port_text = hostport[1:].split("]:", 1)
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":", 1)
    else:
        host, port_text = "127.0.0.1", str(default_port)
        try:
            host = str(ipaddress.ip_address(hostport.strip("[]")))
        except ValueError:
            if hostport:
                host = hostport
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(port_text)
    except ValueError:
        _log("WARN", "invalid port, using default", port=port_text, default=default_port)
        port = default_port
    return host, port


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve() -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    # Installed first so SIGTERM at any moment of the start means a clean exit 0.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if stop.wait(_env_float("OLLAMA_FAKE_START_DELAY", 0.0)):
        return 0
    models = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    exit_at_once = os.environ.get("OLLAMA_FAKE_EXIT_AT_ONCE", "")
    if exit_at_once:
        message = (
            exit_at_once
            if exit_at_once not in ("1", "true")
            else (f"could not create directory mkdir {models}: permission denied")
        )
        sys.stderr.write(f"Error: {message}\n")
        return 1
    host, port = parse_ollama_host(os.environ.get("OLLAMA_HOST"))
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        sys.stderr.write(f"Error: listen tcp {_join(host, port)}: lookup {host}: {exc.strerror}\n")
        return 1
    store = Store(models)
    app = App(store=store, bound_loopback=False)
    # Bind first, touch the store after: ollama's RunServer listens before server.Serve prunes.
    try:
        server = _Server((host, port), family[0][0], app)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        sys.stderr.write(f"Error: listen tcp {_join(host, port)}: bind: {reason}\n")
        return 1
    bound_host, bound_port = server.server_address[:2]
    # The Host check only applies when listening on loopback, as in ollama.
    app.bound_loopback = ipaddress.ip_address(str(bound_host).split("%")[0]).is_loopback
    hosted = os.environ.get("OLLAMA_HOST", "")
    _log("INFO", "server config", env=f"map[OLLAMA_HOST:{hosted} OLLAMA_MODELS:{models}]")
    try:
        store.blobs.mkdir(parents=True, exist_ok=True)
        store.manifests.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        server.server_close()
        sys.stderr.write(f"Error: could not create directory {exc}\n")
        return 1
    removed = 0 if os.environ.get("OLLAMA_NOPRUNE") else store.prune()
    _log("INFO", f"total blobs: {sum(1 for _ in store.blobs.iterdir())}")
    _log("INFO", f"total unused blobs removed: {removed}")
    _log("INFO", f"Listening on {_join(str(bound_host), int(bound_port))} (version {VERSION})")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    _log("INFO", "discovering available GPUs...")
    ready_delay = _env_float("OLLAMA_FAKE_READY_DELAY", 0.0)
    if ready_delay > 0:
        stop.wait(ready_delay)
    _log("INFO", "inference compute", id="cpu", library="cpu", compute="", name="cpu", total="15.5 GiB")
    app.ready.set()
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    sys.stderr.flush()
    return 0


_USAGE = """Large language model runner

Usage:
  ollama [flags]
  ollama [command]

Available Commands:
  serve       Start ollama
  help        Help about any command

Flags:
  -h, --help      help for ollama
  -v, --version   Show version information
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(_USAGE)
        return 0
    if args[0] in ("-v", "--version"):
        print(f"ollama version is {VERSION}")
        return 0
    if args[0] == "serve":
        return serve()
    sys.stderr.write(f'Error: unknown command "{args[0]}" for "ollama"\n')
    return 1


# ---------------------------------------------------------------------------------------------------
# Helpers for tests (import this module); the script itself never runs them.

SCRIPT = Path(__file__).resolve()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never ollama's default one."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != DEFAULT_PORT:
            return port


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """Terminate, wait with a deadline, then kill: never leave a child behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def install_model(models: Path, name: str, *, catalog_path: str | None = None) -> Path:
    """Write a catalog model into a store directly (no server), e.g. to fake a shared Ollama store."""
    parsed = parse_name(name)
    if parsed is None:
        raise ValueError(f"invalid model name: {name}")
    store = Store(Path(models))
    for _ in pull_events(store, parsed, load_catalog(catalog_path), delay=0, fault=""):
        pass
    path = store.find(parsed)
    assert path is not None
    return path


class FakeOllama:
    """Runs `ollama serve` (this script, or an unpacked `bin/ollama`) on 127.0.0.1 and stops it.

    with FakeOllama(tmp_path / "models") as fake: urlopen(fake.url + "/api/version")
    """

    def __init__(
        self,
        models: Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        self.models = Path(models)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})
        self.argv = list(argv) if argv else [sys.executable, str(SCRIPT)]
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_lines: list[str] = []
        self._reader: threading.Thread | None = None

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "OLLAMA_FAKE_"))}
        env.update({"OLLAMA_HOST": f"127.0.0.1:{self.port}", "OLLAMA_MODELS": str(self.models)})
        env.update(self.extra_env)
        return env

    def start(self, *, wait: bool = True) -> FakeOllama:
        self.proc = subprocess.Popen(
            [*self.argv, "serve"],
            env=self.environ(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()
        return self

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            self.log_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    def wait_ready(self) -> None:
        """Poll HEAD / until 200, with a deadline; the log tail goes into the failure message."""
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake ollama exited with {self.proc.returncode}:\n{self.log}")
            try:
                req = urllib.request.Request(self.url + "/", method="HEAD")
                with urllib.request.urlopen(req, timeout=1) as resp:
                    # The log reader thread may lag behind: also wait for the line tests look for.
                    if resp.status == 200 and any("Listening on" in line for line in self.log_lines):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake ollama not ready after {self.startup_timeout}s:\n{self.log}")

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())

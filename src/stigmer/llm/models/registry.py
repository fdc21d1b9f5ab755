"""Pull a model from an Ollama-protocol registry natively (no Ollama): manifest, then layers by digest.

`GET {registry}/v2/{namespace}/{model}/manifests/{tag}` lists the layers; each is fetched from
`{registry}/v2/{namespace}/{model}/blobs/{digest}` (a 307 to a signed CDN URL). The `.model` layer (the
GGUF file) goes through net.parts (parallel ranges, resumable, sha256-verified) into `downloads/` and is
then moved into the store by digest; the small `.template` and `.params` layers are read into memory,
checked against their digests, and kept in the store's index entry. `.system`, `.license` and the
config blob are not needed by the engine and are skipped.

Pulling a name again (an update) fetches only what changed: a model layer already in the store and a
small layer whose digest the existing entry records are reused. The entry also records the sha256 of
the manifest, which the weekly update check compares with the registry's (llm.models.updates).

Which registry: names on registry.ollama.ai (the default host), or on the host of the configured
`llm.registry_url`, go to that configured URL, so a mirror serves the default names; any other host in
a name (`example.com/ns/model:tag`, `hf.co/ORG/REPO:QUANT`, which speaks the same protocol) is asked
directly over https.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.events import INSTALLING, Event, Reporter
from stigmer.hashing import sha256_file
from stigmer.llm.models.store import ModelStore, StoredModel
from stigmer.llm.names import DEFAULT_HOST, ModelName
from stigmer.net import http, parts
from stigmer.net.download import check_disk, human_bytes
from stigmer.net.fetch import fetch_small

log = logging.getLogger(__name__)

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
LAYER = "application/vnd.ollama.image."
MODEL, TEMPLATE, PARAMS = LAYER + "model", LAYER + "template", LAYER + "params"
MAX_MANIFEST = 1024 * 1024
MAX_SMALL_LAYER = 1024 * 1024  # templates and params are a few KB; refuse to buffer anything large
STALL_TIMEOUT = http.DEFAULT_TIMEOUT  # no byte for this long: the part is retried (tests lower it)
MIRROR_HINT = (
    "Run the same command again: the download resumes where it stopped. If the registry is "
    "blocked on your network, use a mirror: stigmer config set llm.registry_url URL"
)
# What the download layer adds to its own advice when the registry serves a wrong or no file.
REGISTRY_HINT = "If it repeats, check the registry or mirror (llm.registry_url)."
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str  # sha256:<hex>
    size: int

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


def registry_base(name: ModelName, registry_url: str) -> str:
    """The registry URL serving this name (see the module docstring)."""
    configured = registry_url.rstrip("/")
    host = name.host.lower()
    if host == DEFAULT_HOST or host == urlsplit(configured).netloc.lower():
        return configured
    return f"https://{name.host}"


def manifest_url(name: ModelName, registry_url: str) -> str:
    return f"{registry_base(name, registry_url)}/v2/{name.namespace}/{name.model}/manifests/{name.tag}"


def blob_url(name: ModelName, registry_url: str, digest: str) -> str:
    return f"{registry_base(name, registry_url)}/v2/{name.namespace}/{name.model}/blobs/{digest}"


def pull_from_registry(
    name: ModelName,
    *,
    registry_url: str,
    store: ModelStore,
    downloads: Path,
    report: Reporter,
) -> StoredModel:
    """Download `name` into the store (skipping a model layer it already holds) and index it."""
    url = manifest_url(name, registry_url)
    report(Event(INSTALLING, f"Pulling manifest for {name}"))
    raw = fetch_manifest_bytes(name, url)
    layers = parse_manifest(name, raw)
    models = [layer for layer in layers if layer.media_type == MODEL]
    if len(models) != 1:
        raise StigmerError(
            f"Model {name} has {len(models)} model layers in the registry; expected one.",
            hint="This kind of model (an adapter or multi-file model) is not supported by "
            "the built-in engine; use the ollama provider for it.",
            code=ErrorCode.UNSUPPORTED,
        )
    model = models[0]
    small = [layer for layer in layers if layer.media_type in (TEMPLATE, PARAMS)]
    blob = store.blob_path(model.digest)
    have_model = blob.is_file() and blob.stat().st_size == model.size
    # Everything this pull will write, checked before the first byte is fetched.
    check_disk(
        downloads, sum(layer.size for layer in small) + (0 if have_model else model.size), f"model {name}"
    )

    template: str | None = None
    params: dict[str, Any] | None = None
    before = store.get(name.short)
    for layer in small:
        if before is not None and before.layers.get(layer.media_type) == layer.digest:
            log.info("%s: layer %s unchanged, reused", name, layer.hex[:12])
            if layer.media_type == TEMPLATE:
                template = before.template
            else:
                params = before.params
            continue
        data = _fetch_small(name, registry_url, layer, report)
        if layer.media_type == TEMPLATE:
            template = data.decode("utf-8", "replace")
        else:
            params = _params(name, data)

    label = f"pulling {model.hex[:12]}"
    if have_model:
        log.info("%s: layer %s already in the store", name, model.hex[:12])
        report(Event(INSTALLING, label, key=model.digest, done=model.size, total=model.size))
    else:
        got = _download_model(name, registry_url, model, downloads, report, label)
        blob = store.adopt(got, model.hex)

    stored = StoredModel(
        name=name.short,
        source="registry",
        size=model.size,
        sha256=model.hex,
        path=str(blob),
        template=template,
        params=params,
        origin=http.redact(url),
        manifest_digest=hashlib.sha256(raw).hexdigest(),
        layers={layer.media_type: layer.digest for layer in small},
    )
    store.add(stored)
    return stored


def _download_model(
    name: ModelName, registry_url: str, model: Layer, downloads: Path, report: Reporter, label: str
) -> Path:
    """The verified model layer in downloads/, fetched in parallel parts (resuming an earlier try)."""
    dest = downloads / f"sha256-{model.hex}"
    # Finished but not yet moved into the store (a crash between the two): check it, do not fetch again.
    if dest.is_file() and dest.stat().st_size == model.size and sha256_file(dest) == model.hex:
        report(Event(INSTALLING, label, key=model.digest, done=model.size, total=model.size))
        return dest

    def progress(done: int, total: int | None) -> None:
        report(Event(INSTALLING, label, key=model.digest, done=done, total=total))

    try:
        got = parts.download_parts(
            blob_url(name, registry_url, model.digest),
            dest,
            sha256=model.hex,
            size=model.size,
            what=f"model {name} ({human_bytes(model.size)})",
            on_progress=progress,
            timeout=STALL_TIMEOUT,
            hint=REGISTRY_HINT,
        )
    except NetworkUnreachable as e:
        raise NetworkUnreachable(f"Pulling {name} failed: {e.message}", hint=MIRROR_HINT, code=e.code) from e
    return got.path


def fetch_manifest(name: ModelName, url: str) -> list[Layer]:
    return parse_manifest(name, fetch_manifest_bytes(name, url))


def fetch_manifest_bytes(
    name: ModelName, url: str, *, timeout: float | None = None, purpose: str = "pull"
) -> bytes:
    """The manifest as the registry sends it (its sha256 is the model's version); errors translated.
    `purpose` completes "Could not reach the model registry ... to <purpose> <name>"."""
    headers = {"Accept": MANIFEST_TYPE}
    try:
        with http.request(url, headers=headers, timeout=timeout or STALL_TIMEOUT) as resp:
            raw: bytes = resp.read(MAX_MANIFEST + 1)
    except urllib.error.HTTPError as e:
        e.close()
        raise _manifest_error(name, url, e) from None
    except (urllib.error.URLError, OSError) as e:
        raise NetworkUnreachable(
            f"Could not reach the model registry {http.redact(url)} to {purpose} {name}: {http.describe(e)}.",
            hint="Check your connection (and HTTPS_PROXY). If the registry is blocked on your network, use "
            "a mirror: stigmer config set llm.registry_url URL",
            code=ErrorCode.NETWORK_UNREACHABLE,
        ) from None
    return raw


def parse_manifest(name: ModelName, raw: bytes) -> list[Layer]:
    try:
        if len(raw) > MAX_MANIFEST:
            raise ValueError("too large")
        data = json.loads(raw)
        return [_layer(item) for item in data["layers"]]
    except (ValueError, KeyError, TypeError) as e:
        raise StigmerError(
            f"The registry sent an unreadable manifest for {name} ({e}).",
            hint="Check llm.registry_url points at an Ollama-compatible registry.",
            code=ErrorCode.REGISTRY_BAD_MANIFEST,
        ) from None


def _layer(item: Any) -> Layer:
    media, digest, size = item["mediaType"], item["digest"], item["size"]
    if not isinstance(media, str) or not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"bad layer {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"bad size for layer {digest}")
    return Layer(media, digest, size)


def _manifest_error(name: ModelName, url: str, e: urllib.error.HTTPError) -> StigmerError:
    where = http.redact(_registry_of(url))
    if e.code == 404:
        return StigmerError(
            f"Model {name} was not found in the model registry ({where}).",
            hint="Check the model name and tag (e.g. qwen2.5-coder:7b); the models on the "
            "default registry are listed at https://ollama.com/library.",
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    if e.code in (401, 403):
        return StigmerError(
            f"The model registry ({where}) refused access to {name} (HTTP {e.code}).",
            hint="Private models are not supported by the built-in engine; check the name.",
            code=ErrorCode.ACCESS_DENIED,
        )
    if e.code >= 500 or e.code == 429:
        return NetworkUnreachable(
            f"The model registry ({where}) is unavailable: HTTP {e.code}.",
            hint=MIRROR_HINT,
            code=ErrorCode.REGISTRY_UNAVAILABLE,
        )
    return StigmerError(
        f"The model registry ({where}) answered HTTP {e.code} for {name}.",
        hint="Check llm.registry_url (stigmer config list).",
        code=ErrorCode.REGISTRY_ERROR,
    )


def _registry_of(url: str) -> str:
    return url.split("/v2/", 1)[0]


def _fetch_small(name: ModelName, registry_url: str, layer: Layer, report: Reporter) -> bytes:
    """A small layer, read into memory and checked against its digest."""
    if layer.size > MAX_SMALL_LAYER:
        raise StigmerError(
            f"Layer {layer.digest} of {name} is too large ({human_bytes(layer.size)}).",
            code=ErrorCode.REGISTRY_BAD_MANIFEST,
            hint="Check llm.registry_url.",
        )
    url = blob_url(name, registry_url, layer.digest)
    label = f"pulling {layer.hex[:12]}"
    report(Event(INSTALLING, label, key=layer.digest, done=0, total=layer.size))
    try:
        # One byte more than announced, so that a longer body fails the size check below.
        data = fetch_small(
            url, what=f"layer {layer.digest} of {name}", limit=layer.size + 1, timeout=STALL_TIMEOUT
        ).data
    except StigmerError as e:
        e.hint = MIRROR_HINT  # the registry's advice (resume, use a mirror) instead of the generic one
        raise
    got = hashlib.sha256(data).hexdigest()
    if len(data) != layer.size or got != layer.hex:
        raise IntegrityError(
            f"Checksum mismatch for layer {layer.digest} of {name}: expected sha256 "
            f"{layer.hex} ({layer.size} bytes), got {got} ({len(data)} bytes).",
            hint="Nothing was installed. Run the command again; if it repeats, check the "
            "registry or mirror (llm.registry_url).",
            code=ErrorCode.CHECKSUM_MISMATCH,
        )
    report(Event(INSTALLING, label, key=layer.digest, done=layer.size, total=layer.size))
    return data


def _params(name: ModelName, data: bytes) -> dict[str, Any]:
    try:
        params = json.loads(data)
    except ValueError:
        params = None
    if not isinstance(params, dict):
        raise StigmerError(
            f"The params layer of {name} is not a JSON object.",
            code=ErrorCode.REGISTRY_BAD_MANIFEST,
            hint="Check llm.registry_url points at an Ollama-compatible registry.",
        )
    return params

"""What a model that is not downloaded yet would take: its size and its GGUF header, read from the first
few MB of the file by a Range request, so that memory can be estimated before a multi-GB download.

Ollama-protocol registries: the manifest gives the layers and their sizes; the `.model` layer is the
GGUF file, fetched from its blob URL (a redirect to the CDN, which honours Range). Hugging Face: the repo
listing gives the file and its size (the same choice of file a pull makes); its resolve URL redirects
to the CDN, asked without the token (huggingface_hub resolves the redirect, so the token only goes to
the Hub).

Bounded: FIRST_RANGE bytes first (most headers are under 2 MB); a longer header (GgufTruncated.needed
says how much at least) is asked again with enough, never more than MAX_RANGE. A server that ignores
Range is read only as far as asked, then the connection is closed. One try per request (a check that
fails is reported, not retried for minutes): the download itself has the retry policy.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from stigmer.errors import ErrorCode, StigmerError
from stigmer.llm.gguf import GgufError, GgufHeader, GgufTruncated, read_header
from stigmer.llm.names import ModelName
from stigmer.net import http, retry
from stigmer.net.fetch import fetch_small

log = logging.getLogger(__name__)

FIRST_RANGE = 4 << 20
MAX_RANGE = 64 << 20  # the largest real headers (260k-token vocabularies with merges) are ~30 MB
ONE_TRY = retry.RetryPolicy(attempts=1)
TIMEOUT = 15.0


@dataclass(frozen=True)
class RemoteModel:
    name: str
    origin: str  # where the header was read (a URL without its query)
    file_size: int  # bytes of the GGUF file
    download_size: int  # bytes a pull would fetch (the GGUF and its small layers)
    header: GgufHeader
    manifest_digest: str = ""  # registry models: sha256 of the manifest (the model's version)


def header_from_url(
    url: str,
    *,
    size: int,
    what: str,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> GgufHeader:
    """The GGUF header of the `size`-byte file at url, from as few leading bytes as it needs."""
    want = min(FIRST_RANGE, size) if size > 0 else FIRST_RANGE
    while True:
        sent = {**(headers or {}), "Range": f"bytes=0-{want - 1}"}
        data = fetch_small(url, what=what, limit=want, headers=sent, timeout=timeout, policy=ONE_TRY).data
        try:
            return read_header(data)
        except GgufTruncated as e:
            if len(data) < want or (size and want >= size):
                raise StigmerError(
                    f"The GGUF file of {what} ends inside its header ({len(data)} bytes).",
                    hint="The file on the server is damaged or not a model; choose another model.",
                    code=ErrorCode.INVALID_MODEL_FILE,
                ) from None
            if want >= MAX_RANGE:
                raise StigmerError(
                    f"The GGUF header of {what} is larger than {MAX_RANGE >> 20} MiB.",
                    hint="It cannot be checked before the download; use --force to download it anyway.",
                    code=ErrorCode.INVALID_MODEL_FILE,
                ) from None
            # What the parser says it needs at least, with room for what follows, or twice as much.
            more = max((e.needed or 0) + (1 << 20), 2 * want)
            want = min(more, MAX_RANGE, size) if size > 0 else min(more, MAX_RANGE)
            log.debug("%s: header longer than the first bytes; asking for %d", what, want)
        except GgufError as e:
            raise StigmerError(
                f"{what} is not a GGUF model the engines can load: {e}.",
                hint="Choose another model (the built-in engine and the Local LLM serve GGUF files).",
                code=ErrorCode.INVALID_MODEL_FILE,
            ) from None


def from_registry(name: ModelName, registry_url: str, *, timeout: float = TIMEOUT) -> RemoteModel:
    """Size and header of a registry model (`registry_url` as the pulls use it: mirrors included)."""
    from stigmer.llm.models import registry

    url = registry.manifest_url(name, registry_url)
    raw = registry.fetch_manifest_bytes(name, url, timeout=timeout, purpose="read the size of")
    layers = registry.parse_manifest(name, raw)
    models = [layer for layer in layers if layer.media_type == registry.MODEL]
    if len(models) != 1:
        raise StigmerError(
            f"Model {name} has {len(models)} model layers in the registry; expected one.",
            hint="Its memory cannot be estimated before the download; use --force to download it anyway.",
            code=ErrorCode.UNSUPPORTED,
        )
    model = models[0]
    blob = registry.blob_url(name, registry_url, model.digest)
    header = header_from_url(blob, size=model.size, what=f"model {name}", timeout=timeout)
    return RemoteModel(
        name=name.short,
        origin=http.redact(url),
        file_size=model.size,
        download_size=sum(layer.size for layer in layers),
        header=header,
        manifest_digest=hashlib.sha256(raw).hexdigest(),
    )


def from_huggingface(name: ModelName, *, timeout: float = TIMEOUT) -> RemoteModel:
    """Size and header of the GGUF file `hf.co/ORG/REPO[:QUANT]` names (the file a pull would take)."""
    from stigmer.llm.models import huggingface

    file, url, headers = huggingface.remote_file(name, timeout=timeout)
    header = header_from_url(
        url, size=file.size or 0, what=f"{file.path} of {name}", headers=headers, timeout=timeout
    )
    return RemoteModel(
        name=name.short,
        origin=http.redact(url),
        file_size=file.size or 0,
        download_size=file.size or 0,
        header=header,
    )


def remote_model(name: ModelName, registry_url: str, *, timeout: float = TIMEOUT) -> RemoteModel:
    if name.is_huggingface:
        return from_huggingface(name, timeout=timeout)
    return from_registry(name, registry_url, timeout=timeout)

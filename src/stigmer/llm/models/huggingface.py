"""Pull a GGUF file from a Hugging Face model repo (`hf.co/ORG/REPO[:QUANT]`) through huggingface_hub.

The file goes into the normal Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub), where other tools
(llama.cpp's -hf, transformers, `hf cache`) share it; our store's index only points at it, nothing is
copied. The repo listing (`GET /api/models/ORG/REPO?blobs=true`) gives each file's size and LFS sha256:
the sha256 is checked against the downloaded file before the model is registered. Offline
(HF_HUB_OFFLINE), the file is found in that cache by huggingface_hub's own functions (hf_cache).

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when it is imported; we read them
at each call and pass them on, so a change of environment in a running process (tests) is honoured.
The token (HF_TOKEN, or the one saved by `hf auth login`) is left to huggingface_hub, which looks it up
per request; it is never logged nor put in an error message.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.events import Reporter
from stigmer.hashing import sha256_file
from stigmer.llm.models import hf_cache, hf_errors
from stigmer.llm.models.hf_files import HfFile, choose_gguf, model_files, quants
from stigmer.llm.models.hf_progress import progress_bar, throttled
from stigmer.llm.models.store import ModelStore, StoredModel
from stigmer.llm.names import DEFAULT_TAG, ModelName
from stigmer.net.download import check_disk, human_bytes

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
REVISION = hf_cache.REVISION
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "on", "yes", "true"}


# -- environment, read at each call ----------------------------------------------------------------
def hf_endpoint(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_offline(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE


# -- registering a verified file ---------------------------------------------------------------------
def _register(
    name: ModelName, store: ModelStore, path: Path, file: HfFile, expected: str | None, report: Reporter
) -> StoredModel:
    label = f"Verifying {file.basename}"
    got = sha256_file(path, on_progress=throttled(report, f"{file.path} (verify)", label))
    if expected is not None and got != expected:
        _discard(path)
        raise IntegrityError(
            f"Checksum mismatch for {file.path} of hf.co/{name.namespace}/{name.model}: expected sha256 "
            f"{expected}, got {got}.",
            hint="The damaged file was removed from the Hugging Face cache and nothing was installed. "
            "Run the command again; if it repeats, check HF_ENDPOINT (when set).",
            code=ErrorCode.CHECKSUM_MISMATCH,
        )
    model = StoredModel(
        name=name.short,
        source="hf",
        size=path.stat().st_size,
        sha256=got,
        path=str(path),
        origin=f"hf.co/{name.namespace}/{name.model}/{file.path}",
    )
    store.add(model)
    log.info("registered %s -> %s", model.name, path)
    return model


def _discard(pointer: Path) -> None:
    """Drop a damaged file from the cache (blob and snapshot link), or every later pull would reuse it."""
    blob = pointer.parent / os.readlink(pointer) if pointer.is_symlink() else pointer
    # The link's own blob, whatever it links on to (a shared store), then the link.
    for p in dict.fromkeys((Path(os.path.realpath(pointer)), blob, pointer)):
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove %s: %s", p, e)


def pull_from_hf(name: ModelName, *, store: ModelStore, report: Reporter) -> StoredModel:
    """Download the GGUF that `hf.co/ORG/REPO[:QUANT]` names into the HF cache and register it."""
    quant = None if name.tag.lower() == DEFAULT_TAG else name.tag
    cache = hf_cache.cache_dir()
    if hf_offline():
        return _pull_offline(name, quant, cache, store, report)
    endpoint = hf_endpoint()
    with _translated(name, endpoint):
        return _pull_online(name, quant, cache, endpoint, store, report)


@contextmanager
def _translated(name: ModelName, endpoint: str) -> Iterator[None]:
    """huggingface_hub's errors as ours (what happened, what to do); anything else goes on as it is."""
    try:
        yield
    except StigmerError:
        raise
    except Exception as e:
        ours = hf_errors.translate(e, name, endpoint)
        if ours is None:
            raise
        log.debug("huggingface_hub: %s: %s", type(e).__name__, hf_errors.scrub(str(e)))
        raise ours from None  # huggingface_hub's chain holds request details; ours says what matters


def _listed_file(name: ModelName, quant: str | None, endpoint: str, timeout: float | None = None) -> HfFile:
    """The GGUF file of the repo a pull takes, from the Hub's listing (sizes and LFS sha256 included)."""
    from huggingface_hub import HfApi

    from stigmer import __version__

    repo = f"{name.namespace}/{name.model}"
    # library_name: our name in the User-Agent, as huggingface_hub asks of libraries built on it.
    api = HfApi(endpoint=endpoint, library_name="stigmer", library_version=__version__)
    info = api.model_info(repo, files_metadata=True, timeout=timeout)
    files = [
        HfFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None) for s in info.siblings or []
    ]
    return choose_gguf(files, quant, f"hf.co/{repo}")


def remote_file(name: ModelName, *, timeout: float) -> tuple[HfFile, str, dict[str, str]]:
    """The file a pull of `name` would take, the URL its bytes are read from, and the headers to send:
    the CDN the Hub redirects to is asked without the token, the Hub itself with it (gated repos)."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    # Public in huggingface_hub's docs, but its utils package does not list it in __all__.
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    from stigmer import __version__

    if hf_offline() or constants.is_offline_mode():
        raise NetworkUnreachable(
            f"Hugging Face offline mode is on (HF_HUB_OFFLINE): {name} cannot be looked at.",
            hint="Unset HF_HUB_OFFLINE, or use --force to skip the check.",
            code=ErrorCode.HF_OFFLINE,
        )
    quant = None if name.tag.lower() == DEFAULT_TAG else name.tag
    endpoint = hf_endpoint()
    repo = f"{name.namespace}/{name.model}"
    with _translated(name, endpoint):
        file = _listed_file(name, quant, endpoint, timeout)
        url = hf_hub_url(repo, file.path, revision=REVISION, endpoint=endpoint)
        meta = get_hf_file_metadata(
            url, timeout=timeout, library_name="stigmer", library_version=__version__, endpoint=endpoint
        )
    location = str(meta.location or url)
    same_host = urlsplit(location).netloc == urlsplit(endpoint).netloc
    headers = build_hf_headers(library_name="stigmer", library_version=__version__) if same_host else {}
    if meta.size and not file.size:
        file = HfFile(file.path, int(meta.size), file.sha256)
    return file, location, dict(headers)


def _pull_online(
    name: ModelName, quant: str | None, cache: Path, endpoint: str, store: ModelStore, report: Reporter
) -> StoredModel:
    from huggingface_hub import constants, hf_hub_download

    from stigmer import __version__

    if constants.is_offline_mode():  # HF_HUB_OFFLINE was set when huggingface_hub was imported
        return _pull_offline(name, quant, cache, store, report)
    repo = f"{name.namespace}/{name.model}"
    where = f"hf.co/{repo}"
    file = _listed_file(name, quant, endpoint)
    log.info("pulling %s from %s (%s)", file.path, where, human_bytes(file.size or 0))

    cached = file.sha256 is not None and hf_cache.cached_sha256(repo, file.path, cache) == file.sha256
    if file.size is not None and not cached:
        try:
            check_disk(cache, file.size, f"{file.basename} ({where})")
        except StigmerError as e:
            raise StigmerError(
                e.message,
                hint="Free some space, or point HF_HOME (or HF_HUB_CACHE) at a bigger disk, and run "
                "the command again.",
                code=e.code,
            ) from None

    bar = progress_bar(report, file.path, f"Downloading {file.basename}", file.size)
    path = hf_hub_download(
        repo,
        file.path,
        revision=REVISION,
        cache_dir=str(cache),
        endpoint=endpoint,
        library_name="stigmer",
        library_version=__version__,
        tqdm_class=bar,
    )
    return _register(name, store, Path(path), file, file.sha256, report)


def _pull_offline(
    name: ModelName, quant: str | None, cache: Path, store: ModelStore, report: Reporter
) -> StoredModel:
    """Offline (HF_HUB_OFFLINE): no request at all; the file must already be in the HF cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = f"{name.namespace}/{name.model}"

    def missing(why: str) -> NetworkUnreachable:
        return NetworkUnreachable(
            f"Hugging Face offline mode is on (HF_HUB_OFFLINE) and {name} is not in the Hugging Face "
            f"cache ({cache}): {why}",
            hint="Unset HF_HUB_OFFLINE to download it, or choose a model that is already here: "
            "stigmer server llm list",
            code=ErrorCode.HF_OFFLINE,
        )

    snapshot, damaged = hf_cache.cached_snapshot(repo, cache)
    if snapshot is None:
        raise missing("its cache folder is damaged." if damaged else "the repository was never downloaded.")
    files = [HfFile(f.path, f.size, None) for f in snapshot.files]
    try:
        file = choose_gguf(files, quant, f"hf.co/{repo}")
    except StigmerError:
        held = quants(model_files(files))
        raise missing(f"only {held} of it is cached." if held else "no GGUF file of it is cached.") from None
    try:
        path = hf_cache.cached_file(snapshot, file.path, cache)
    except LocalEntryNotFoundError:
        raise missing(f"{file.path} was removed from it meanwhile.") from None
    # An LFS blob is named by its sha256 (the Hub's ETag for it): verify against that name.
    blob = next(f.blob for f in snapshot.files if f.path == file.path)
    expected = blob if _SHA256.fullmatch(blob) else None
    return _register(name, store, path, file, expected, report)

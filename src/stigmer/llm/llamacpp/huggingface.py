"""Pull a GGUF file from a Hugging Face model repo (`hf.co/ORG/REPO[:QUANT]`) through huggingface_hub.

The file goes into the normal Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub), where other tools
(llama.cpp's -hf, transformers, `hf cache`) share it; our store's index only points at it, nothing is
copied. The repo listing (`GET /api/models/ORG/REPO?blobs=true`) gives each file's size and LFS sha256:
the sha256 is checked against the downloaded file before the model is registered.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, when it is imported; we read them
at each call and pass them on, so a change of environment in a running process (tests) is honoured.
The token (HF_TOKEN, or the one saved by `hf auth login`) is left to huggingface_hub, which looks it up
per request; it is never logged nor put in an error message.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.events import INSTALLING, Event, Reporter
from stigmer.llm.llamacpp.store import ModelStore, StoredModel
from stigmer.llm.names import DEFAULT_TAG, ModelName
from stigmer.net.download import CHUNK, check_disk, human_bytes
from stigmer.net.http import redact

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
PREFERRED_QUANTS = ("Q4_K_M", "Q4_0")  # without a tag: a good size/quality balance, then the classic one
REVISION = "main"
PROGRESS_INTERVAL = 0.1  # seconds between two progress events of one download
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "on", "yes", "true"}


# -- environment, read at each call ----------------------------------------------------------------
def hf_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache, found the way huggingface_hub finds it."""
    env = os.environ if environ is None else environ

    def expand(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return expand(env[var])
    if env.get("HF_HOME"):
        return expand(env["HF_HOME"]) / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return expand(xdg) / "huggingface" / "hub"


def hf_endpoint(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hf_offline(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE


def _secrets() -> list[str]:
    return [t for t in (os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if t]


def _scrub(text: str) -> str:
    """Belt and braces: whatever text from huggingface_hub we show, the token never appears in it."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


# -- choosing the file -----------------------------------------------------------------------------
@dataclass(frozen=True)
class HfFile:
    path: str  # relative to the repo root, '/'-separated
    size: int | None
    sha256: str | None  # the LFS sha256, when the listing gave one

    @property
    def basename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def split(self) -> tuple[int, int] | None:
        """(part, parts) for a multi-part GGUF (`-00001-of-00003.gguf`)."""
        m = _SPLIT.search(self.basename)
        return (int(m.group(1)), int(m.group(2))) if m else None

    @property
    def quant(self) -> str:
        """The quantisation label: what follows the last '-' or '.' of the name (`Model-Q4_K_M.gguf`)."""
        stem = _SPLIT.sub("", self.basename)
        stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
        return re.split(r"[-.]", stem)[-1]


def _model_files(files: Iterable[HfFile]) -> list[HfFile]:
    # mmproj-*.gguf are vision projectors that go with a model, not models themselves.
    return [
        f
        for f in files
        if f.basename.lower().endswith(".gguf") and not f.basename.lower().startswith("mmproj")
    ]


def _quants(files: Iterable[HfFile]) -> str:
    labels: dict[str, str] = {}
    for f in files:
        label = f.quant + (" (split)" if f.split else "")
        labels.setdefault(label.lower(), label)
    return ", ".join(sorted(labels.values(), key=str.lower))


def _size_key(f: HfFile) -> int:
    return f.size if f.size is not None else 1 << 62


def _preferred(files: list[HfFile]) -> HfFile:
    """Q4_K_M, then Q4_0, then the smallest file."""
    for quant in PREFERRED_QUANTS:
        exact = [f for f in files if f.quant.lower() == quant.lower()]
        named = exact or [f for f in files if quant.lower() in f.basename.lower()]
        if named:
            return min(named, key=_size_key)
    return min(files, key=_size_key)


def choose_gguf(files: Iterable[HfFile], quant: str | None, where: str) -> HfFile:
    """The GGUF file to pull: the one named by quant (case-insensitive), else the preferred one.

    Raises StigmerError (model_not_found) when there is no fitting file; `where` names the repo in
    messages. Multi-part GGUFs are refused: llama.cpp needs every part, which we do not fetch.
    """
    models = _model_files(files)
    if not models:
        raise StigmerError(
            f"{where} has no GGUF model file.",
            hint="The built-in engine runs GGUF files: look for a -GGUF variant of the repository "
            "(e.g. hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF).",
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    if quant is None:
        candidates = models
    else:
        q = quant.lower()
        candidates = [f for f in models if f.quant.lower() == q] or [
            f for f in models if q in f.basename.lower()
        ]
        if not candidates:
            raise StigmerError(
                f"{where} has no GGUF file for quantisation {quant}.",
                hint=f"Available: {_quants(models)}. Pull one of them, e.g. "
                f"{where}:{_preferred(models).quant}",
                code=ErrorCode.MODEL_NOT_FOUND,
            )
    whole = [f for f in candidates if f.split is None]
    if whole:
        return _preferred(whole)
    first = min(candidates, key=lambda f: f.path)
    parts = first.split[1] if first.split else 0
    singles = [f for f in models if f.split is None]
    raise StigmerError(
        f"{first.basename} in {where} is split into {parts} files, which the built-in engine cannot pull.",
        hint=f"Pull a quantisation stored as one file: {_quants(singles)}."
        if singles
        else "Download and merge the parts (llama-gguf-split --merge), then: "
        "stigmer server llm import FILE --name NAME",
        code=ErrorCode.UNSUPPORTED,
    )


# -- progress ----------------------------------------------------------------------------------------
def _progress_bar(report: Reporter, key: str, label: str, size: int | None) -> type:
    """A tqdm stand-in for hf_hub_download's `tqdm_class`: it turns progress into our Events.

    huggingface_hub builds it with tqdm's keyword arguments and calls update(); for Xet downloads it
    also calls update_transfer() (network bytes), which we ignore: the bytes written are what count.
    """

    class Bar:
        def __init__(self, *_args: Any, total: float | None = None, initial: float = 0, **_kw: Any) -> None:
            self.n = int(initial or 0)
            self.total = total if total else size
            self._sent = 0.0
            self._emit(force=True)

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *_exc: object) -> None:
            self.close()

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            self._emit()

        def update_transfer(self, _n: float | None = 1) -> None:
            pass  # defined on the class so that Xet downloads report through one bar, not two

        def close(self) -> None:
            self._emit(force=True)

        def _emit(self, force: bool = False) -> None:
            now = time.monotonic()
            if force or now - self._sent >= PROGRESS_INTERVAL:
                self._sent = now
                total = int(self.total) if self.total else None
                report(Event(INSTALLING, label, key=key, done=self.n, total=total))

        def __getattr__(self, _name: str) -> Callable[..., None]:
            # Any other tqdm method (set_postfix_str, refresh, ...) does nothing.
            return lambda *_a, **_k: None

    return Bar


def _sha256(path: Path, report: Reporter, key: str, label: str) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    sent = 0.0
    with path.open("rb") as f:
        while block := f.read(CHUNK * 4):
            h.update(block)
            done += len(block)
            if time.monotonic() - sent >= PROGRESS_INTERVAL or done == size:
                sent = time.monotonic()
                report(Event(INSTALLING, label, key=key, done=done, total=size))
    return h.hexdigest()


# -- errors ------------------------------------------------------------------------------------------
def _reason(e: BaseException) -> str:
    text = str(e).lower()
    if "refused" in text:
        return "connection refused"
    if "timed out" in text or "timeout" in type(e).__name__.lower():
        return "timed out"
    if "name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        return "host name could not be resolved"
    return _scrub(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _unreachable(name: ModelName, endpoint: str, e: BaseException) -> NetworkUnreachable:
    return NetworkUnreachable(
        f"Could not reach Hugging Face ({redact(endpoint)}) to pull {name}: {_reason(e)}.",
        hint="Check your connection (and HTTPS_PROXY). To use a mirror, set HF_ENDPOINT; models already "
        "in the Hugging Face cache work offline with HF_HUB_OFFLINE=1.",
        code=ErrorCode.NETWORK_UNREACHABLE,
    )


def _translate(e: BaseException, name: ModelName, endpoint: str) -> StigmerError | None:
    """Our error for one raised by huggingface_hub (or its HTTP client); None when it is not one of those."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = f"{name.namespace}/{name.model}"
    page = f"https://huggingface.co/{repo}"
    if isinstance(e, GatedRepoError):
        status = e.response.status_code
        if status == 401:  # no token, or an invalid one
            hint = f"Accept its terms on {page} while logged in, then set HF_TOKEN to a read token of "
            hint += "that account."
        else:
            hint = "Your Hugging Face token has no access to it: accept its terms on "
            hint += f"{page} with the account the token belongs to."
        return StigmerError(
            f"hf.co/{repo} is a gated repository: its files need an accepted licence and a token "
            f"(Hugging Face answered HTTP {status}).",
            hint=hint,
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError):
        return StigmerError(
            f"Hugging Face repository hf.co/{repo} was not found (or is private).",
            hint="Check the name: hf.co/ORG/REPO[:QUANT], as in the repository's address on huggingface.co. "
            "For a private repository, set HF_TOKEN to a token that can read it.",
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
        return StigmerError(
            f"A file of hf.co/{repo} was not found on Hugging Face (the repository changed meanwhile?).",
            hint="Run the command again.",
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code
        if status >= 500 or status == 429:
            return NetworkUnreachable(
                f"Hugging Face ({redact(endpoint)}) is unavailable: HTTP {status}.",
                hint="Try again later; models already in the Hugging Face cache work offline with "
                "HF_HUB_OFFLINE=1.",
                code=ErrorCode.HF_UNAVAILABLE,
            )
        return StigmerError(
            f"Hugging Face ({redact(endpoint)}) answered HTTP {status} for hf.co/{repo}.",
            hint="Check the name and HF_ENDPOINT (when set); if a token is needed, set HF_TOKEN.",
            code=ErrorCode.HF_ERROR,
        )
    if isinstance(e, httpx2.TransportError | OfflineModeIsEnabled | LocalEntryNotFoundError):
        return _unreachable(name, endpoint, e)
    if isinstance(e, HFValidationError):
        return StigmerError(
            f"{name} is not a valid Hugging Face repository name: {_scrub(str(e))}",
            hint="Names look like hf.co/ORG/REPO[:QUANT].",
            code=ErrorCode.INVALID_MODEL_NAME,
        )
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return StigmerError(
            f"The disk holding the Hugging Face cache is full: {_scrub(str(e))}",
            hint="Free some space, or point HF_HOME (or HF_HUB_CACHE) at a bigger disk, and run the "
            "command again.",
            code=ErrorCode.DISK_FULL,
        )
    if isinstance(e, PermissionError):
        return StigmerError(
            f"Cannot write to the Hugging Face cache: {_scrub(str(e))}",
            hint="Fix the folder's permissions, or point HF_HOME (or HF_HUB_CACHE) at a writable folder.",
            code=ErrorCode.FILESYSTEM,
        )
    if isinstance(e, OSError):
        # e.g. "Consistency check failed": the body was shorter than announced (a dropped connection).
        return NetworkUnreachable(
            f"Downloading {name} from Hugging Face failed: {_reason(e)}",
            hint="Run the command again.",
            code=ErrorCode.DOWNLOAD_FAILED,
        )
    return None


# -- pulling ---------------------------------------------------------------------------------------
def _storage_folder(cache: Path, repo: str, *, any_case: bool = False) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    if folder.is_dir() or not any_case or not cache.is_dir():
        return folder
    # Repo ids are case-insensitive on the Hub; a cache written under another spelling still counts.
    return next((c for c in cache.iterdir() if c.name.lower() == folder.name.lower()), folder)


def _register(
    name: ModelName, store: ModelStore, path: Path, file: HfFile, expected: str | None, report: Reporter
) -> StoredModel:
    label = f"Verifying {file.basename}"
    got = _sha256(path, report, f"{file.path} (verify)", label)
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
    blob = Path(os.path.realpath(pointer))
    for p in (blob, pointer):
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove %s: %s", p, e)


def pull_from_hf(name: ModelName, *, store: ModelStore, report: Reporter) -> StoredModel:
    """Download the GGUF that `hf.co/ORG/REPO[:QUANT]` names into the HF cache and register it."""
    quant = None if name.tag.lower() == DEFAULT_TAG else name.tag
    cache = hf_cache_dir()
    if hf_offline():
        return _pull_offline(name, quant, cache, store, report)
    endpoint = hf_endpoint()
    try:
        return _pull_online(name, quant, cache, endpoint, store, report)
    except StigmerError:
        raise
    except Exception as e:
        ours = _translate(e, name, endpoint)
        if ours is None:
            raise
        log.debug("huggingface_hub: %s: %s", type(e).__name__, _scrub(str(e)))
        raise ours from None  # huggingface_hub's chain holds request details; ours says what matters


def _pull_online(
    name: ModelName, quant: str | None, cache: Path, endpoint: str, store: ModelStore, report: Reporter
) -> StoredModel:
    from huggingface_hub import HfApi, constants, hf_hub_download

    from stigmer import __version__

    if constants.is_offline_mode():  # HF_HUB_OFFLINE was set when huggingface_hub was imported
        return _pull_offline(name, quant, cache, store, report)
    repo = f"{name.namespace}/{name.model}"
    where = f"hf.co/{repo}"
    # library_name: our name in the User-Agent, as huggingface_hub asks of libraries built on it.
    api = HfApi(endpoint=endpoint, library_name="stigmer", library_version=__version__)
    info = api.model_info(repo, files_metadata=True)
    files = [
        HfFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs is not None else None) for s in info.siblings or []
    ]
    file = choose_gguf(files, quant, where)
    log.info("pulling %s from %s (%s)", file.path, where, human_bytes(file.size or 0))

    blob = _storage_folder(cache, repo) / "blobs" / (file.sha256 or "")
    if file.size is not None and not (file.sha256 and blob.is_file()):
        try:
            check_disk(cache, file.size, f"{file.basename} ({where})")
        except StigmerError as e:
            raise StigmerError(
                e.message,
                hint="Free some space, or point HF_HOME (or HF_HUB_CACHE) at a bigger disk, and run "
                "the command again.",
                code=e.code,
            ) from None

    bar = _progress_bar(report, file.path, f"Downloading {file.basename}", file.size)
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
    repo = f"{name.namespace}/{name.model}"
    folder = _storage_folder(cache, repo, any_case=True)

    def missing(why: str) -> NetworkUnreachable:
        return NetworkUnreachable(
            f"Hugging Face offline mode is on (HF_HUB_OFFLINE) and {name} is not in the Hugging Face "
            f"cache ({cache}): {why}",
            hint="Unset HF_HUB_OFFLINE to download it, or choose a model that is already here: "
            "stigmer server llm list",
            code=ErrorCode.HF_OFFLINE,
        )

    snapshot = _cached_snapshot(folder)
    if snapshot is None:
        raise missing("the repository was never downloaded.")
    files = [
        HfFile(p.relative_to(snapshot).as_posix(), p.stat().st_size, None)
        for p in sorted(snapshot.rglob("*.gguf"))
        if p.is_file()
    ]
    try:
        file = choose_gguf(files, quant, f"hf.co/{repo}")
    except StigmerError:
        held = _quants(_model_files(files))
        raise missing(f"only {held} of it is cached." if held else "no GGUF file of it is cached.") from None
    path = snapshot / file.path
    # An LFS blob is named by its sha256 (the Hub's ETag for it): verify against that name.
    blob_name = Path(os.path.realpath(path)).name
    expected = blob_name if _SHA256.fullmatch(blob_name) else None
    return _register(name, store, path, file, expected, report)


def _cached_snapshot(folder: Path) -> Path | None:
    """The snapshot that refs/main points at, else the most recent one."""
    snapshots = folder / "snapshots"
    try:
        commit = (folder / "refs" / REVISION).read_text(encoding="utf-8").strip()
    except OSError:
        commit = ""
    if commit and (snapshots / commit).is_dir():
        return snapshots / commit
    try:
        found = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(found, key=lambda p: p.stat().st_mtime) if found else None

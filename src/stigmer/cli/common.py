"""What every command needs: the paths, the settings (with their warnings shown), the output."""

from __future__ import annotations

from stigmer.config import store
from stigmer.config.store import Settings
from stigmer.paths import Paths


def context() -> tuple[Paths, Settings]:
    paths = Paths.from_env()
    settings = store.load(paths)
    warn_notices(settings)
    return paths, settings


def warn_notices(settings: Settings) -> None:
    if settings.notices:
        from stigmer.cli.render import Out

        out = Out()
        for notice in settings.notices:
            out.warn(notice)

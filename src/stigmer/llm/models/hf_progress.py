"""Progress of Hugging Face downloads and checks, as our Events."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from stigmer.events import INSTALLING, Event, Reporter

PROGRESS_INTERVAL = 0.1  # seconds between two progress events of one download or check


def progress_bar(report: Reporter, key: str, label: str, size: int | None) -> type:
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


def throttled(report: Reporter, key: str, label: str) -> Callable[[int, int | None], None]:
    """An on_progress(done, total) that reports at most every PROGRESS_INTERVAL, and always the end."""
    sent = 0.0

    def on_progress(done: int, total: int | None) -> None:
        nonlocal sent
        now = time.monotonic()
        if now - sent >= PROGRESS_INTERVAL or done == total:
            sent = now
            report(Event(INSTALLING, label, key=key, done=done, total=total))

    return on_progress

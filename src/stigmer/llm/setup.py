"""The seed's llm.Setup(): running? -> runtime -> start -> ready -> model (-> offline fallback)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from stigmer.config.store import Settings
from stigmer.errors import NetworkUnreachable
from stigmer.llm import fallback
from stigmer.llm.provider import INITIALIZING, Event, LlmStatus, Reporter, get_provider, silent, stop_managed
from stigmer.paths import Paths
from stigmer.proc import record as records

log = logging.getLogger(__name__)


@dataclass
class SetupResult:
    status: LlmStatus
    started: bool  # False when a running server was reused
    seconds: float


def setup(settings: Settings, paths: Paths, report: Reporter = silent) -> SetupResult:
    t0 = time.monotonic()
    report(Event(INITIALIZING, "Setting up local LLM"))
    try:
        return _setup(settings, paths, report, t0)
    except NetworkUnreachable as e:
        if not fallback.applies(settings):
            raise
        planned = fallback.plan(settings, paths, e.message)
        if planned is None:
            raise
        fb_settings, info = planned
        log.info("runtime unavailable (%s); falling back to the built-in engine", e.message)
        result = _setup(fb_settings, paths, report, t0, extra={"fallback": info})
        result.status.fallback = info
        return result


def _setup(
    settings: Settings, paths: Paths, report: Reporter, t0: float, extra: dict[str, Any] | None = None
) -> SetupResult:
    provider = get_provider(settings, paths, report)
    provider.extra_info = extra or {}
    started = False
    if not provider.is_running():
        provider.ensure_runtime()
        _stop_other(paths, provider.name, provider.base_url)
        provider.start()
        started = True
    provider.ensure_model(settings.model)
    status = provider.status()
    return SetupResult(status, started, time.monotonic() - t0)


def _stop_other(paths: Paths, name: str, base_url: str) -> None:
    """Before starting, stop a server we started earlier for another provider or address (a switch of
    llm.provider, or an offline fallback now replaced by the real runtime): never leave an orphan."""
    rec = records.live_record(paths.llm_pid)
    if rec is not None and (rec.info.get("provider") != name or rec.info.get("base_url") != base_url):
        log.info("stopping the earlier %s server (pid %s)", rec.info.get("provider"), rec.pid)
        stop_managed(paths)

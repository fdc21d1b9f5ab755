"""The seed's llm.Setup(): running? -> runtime -> start -> ready -> model (-> offline fallback).

The caller holds the control lock (services.lock) so that two starts never race.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from stigmer.config.store import Settings
from stigmer.errors import NetworkUnreachable
from stigmer.events import INITIALIZING, Event, Reporter, silent
from stigmer.llm import fallback
from stigmer.llm.provider import SERVICE, LlmStatus, LocalRuntime, Provider, get_provider, stop_llm
from stigmer.paths import Paths

log = logging.getLogger(__name__)


@dataclass
class SetupResult:
    status: LlmStatus
    started: bool  # False when a running server was reused (or there is nothing local to run)
    seconds: float


def setup(settings: Settings, paths: Paths, report: Reporter = silent) -> SetupResult:
    t0 = time.monotonic()
    report(Event(INITIALIZING, "Setting up local LLM"))
    provider = get_provider(settings, paths)
    try:
        started = serve(provider, report)
    except NetworkUnreachable as e:
        planned = fallback.plan(settings, paths, e.message) if fallback.applies(settings) else None
        if planned is None:
            raise
        log.info("runtime unavailable (%s); falling back to the built-in engine", e.message)
        provider = planned
        started = serve(provider, report)
    status = provider.status()
    status.fallback = provider.extra.get("fallback")
    return SetupResult(status, started, time.monotonic() - t0)


def serve(provider: Provider, report: Reporter) -> bool:
    """Make a local provider serve its model; True when a server was started. Remote: nothing to do."""
    if not isinstance(provider, LocalRuntime):
        return False
    if provider.is_running():
        provider.ensure_model(provider.model, report)
        return False
    provider.ensure_runtime(report)
    stop_other(provider)
    provider.start(report)
    provider.ensure_model(provider.model, report)
    return True


def stop_other(provider: LocalRuntime) -> None:
    """Before starting, stop a server we started earlier for another provider or address (a switch of
    llm.provider, or an offline fallback now replaced by the real runtime): never leave an orphan."""
    from stigmer.services.manager import Services

    rec = Services(provider.paths).record(SERVICE)
    if rec is not None and (rec.info.get("provider"), rec.info.get("base_url")) != (
        provider.name,
        provider.base_url,
    ):
        log.info("stopping the earlier %s server (pid %s)", rec.info.get("provider"), rec.pid)
        stop_llm(provider.paths)

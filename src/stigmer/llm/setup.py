"""The seed's llm.Setup(): running? -> runtime -> start -> ready -> model (-> offline fallback).

Before that, for a local provider, the machine is looked at once: under ~6 GB of RAM a warning (never a
refusal: the user may have chosen the model on purpose), and the default model for this machine when
llm.model is not set (the runtime's tiers). Right before the model would be downloaded (the built-in
engine: before its runtime step, which fetches the model; the runtime: once it runs, before its pull) the
fit check runs, and refuses a model that does not fit unless `force`. What is worth saying comes back
in `notices`.

The caller holds the control lock (services.lock) so that two starts never race.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stigmer.config.store import Settings
from stigmer.errors import NetworkUnreachable
from stigmer.events import INITIALIZING, Event, Reporter, silent
from stigmer.llm import fallback
from stigmer.llm.provider import SERVICE, LocalRuntime, Provider, get_provider, stop_llm
from stigmer.llm.status import LlmStatus
from stigmer.paths import Paths

if TYPE_CHECKING:
    from stigmer.hw.report import HardwareReport

log = logging.getLogger(__name__)

FORCE_COMMAND = "stigmer server --force"


@dataclass
class SetupResult:
    status: LlmStatus
    started: bool  # False when a running server was reused (or there is nothing local to run)
    seconds: float
    notices: list[str] = field(default_factory=list)  # warnings for the user (low RAM, a forced misfit)


def setup(settings: Settings, paths: Paths, report: Reporter = silent, *, force: bool = False) -> SetupResult:
    t0 = time.monotonic()
    report(Event(INITIALIZING, "Setting up local LLM"))
    hardware, notices = look_at_machine(settings, paths) if settings.llm.is_local else (None, [])
    provider = get_provider(settings, paths)

    def fits() -> None:
        notices.extend(check_fit(provider, settings, paths, hardware, force=force))

    try:
        started = serve(provider, report, before_download=fits)
    except NetworkUnreachable as e:
        planned = (
            fallback.plan(settings, paths, e.message, configured_model=provider.model)
            if fallback.applies(settings)
            else None
        )
        if planned is None:
            raise
        log.info("runtime unavailable (%s); falling back to the built-in engine", e.message)
        provider = planned
        started = serve(provider, report)
    for notice in notices:
        log.info("%s", notice)  # shown by the caller; logged by the daemon
    status = provider.status()
    status.fallback = provider.extra.get("fallback")
    return SetupResult(status, started, time.monotonic() - t0, notices)


def look_at_machine(settings: Settings, paths: Paths) -> tuple[HardwareReport, list[str]]:
    """The hardware report, the low-RAM warning, and (runtime, llm.model not set) this machine's default
    model chosen again and remembered, so that a machine that gained memory gets a bigger one."""
    from stigmer.hw.fit import requirements_warning
    from stigmer.llm.models.fit_check import download_folder, machine

    hardware = machine(download_folder(settings.llm.provider, settings.llm.model, paths))
    notices = []
    warning = requirements_warning(hardware.ram_total)
    if warning:
        notices.append(warning)
    if settings.llm.provider == "ollama":
        from stigmer.llm.ollama.provider import default_choice, uses_default_model

        if uses_default_model(settings):
            paths.ensure(paths.data_dir)
            default_choice(paths, hardware=hardware)
    return hardware, notices


def check_fit(
    provider: Provider, settings: Settings, paths: Paths, hardware: HardwareReport | None, *, force: bool
) -> list[str]:
    """The fit check of the model a local server is to serve, when serving it means downloading it."""
    if not isinstance(provider, LocalRuntime) or provider.is_downloaded(provider.model):
        return []
    from stigmer.llm.models.fit_check import before_download

    return before_download(
        provider.model,
        provider=provider.name,
        settings=settings,
        paths=paths,
        force=force,
        force_command=FORCE_COMMAND,
        hardware=hardware,
    )


def serve(provider: Provider, report: Reporter, *, before_download: Callable[[], None] | None = None) -> bool:
    """Make a local provider serve its model; True when a server was started. Remote: nothing to do.
    `before_download` runs right before the step that may download the model."""
    if not isinstance(provider, LocalRuntime):
        return False
    check = before_download or (lambda: None)
    if provider.is_running():
        check()
        provider.ensure_model(provider.model, report)
        return False
    if provider.model_with_runtime:
        check()
    provider.ensure_runtime(report)
    stop_other(provider)
    provider.start(report)
    if not provider.model_with_runtime:
        try:
            check()
        except BaseException:
            provider.stop()  # started for a model that is refused: leave nothing running
            raise
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

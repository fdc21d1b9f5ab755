"""`stigmer server llm upgrade-runtime [VERSION]`: a newer Local LLM runtime, kept only if it works.

  1. The new version is installed the way the first one was (stigmer.install: the checksum file first,
     a resumable verified download, unpacked beside the old version, `current` switched atomically).
  2. Health check: the runtime Stigmer runs is restarted on the new version and must pass its readiness
     check and answer with the new version; when none runs, the new version is started alone on a
     free loopback port (pruning nothing), checked the same way, and stopped.
  3. If the check fails, `current` goes back to the old version and a runtime that was running is
     started again on it; the new version's folder stays (a later try does not download it again).
  4. Only after a passed check is the old version's folder removed.

It all happens under the control lock: the daemon's supervisor leaves the LLM alone meanwhile and adopts
the restarted process afterwards. A runtime found on PATH is not ours to upgrade (it is used first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import INSTALLING, STARTING, Event, Reporter
from stigmer.install.platform import Platform
from stigmer.install.release import LATEST, Release
from stigmer.llm.ollama import install
from stigmer.llm.ollama.provider import OllamaProvider
from stigmer.paths import Paths

log = logging.getLogger(__name__)

CHECK_SERVICE = "llm-upgrade-check"  # run/<name>.pid and logs/<name>.log of the stand-alone check
CHECK_TIMEOUT = 30.0

Outcome = Literal["upgraded", "current"]


@dataclass(frozen=True)
class UpgradeResult:
    previous: str | None  # the version before (None: there was none)
    version: str  # the version current now
    outcome: Outcome
    restarted: bool  # the Local LLM Stigmer runs was restarted on the new version
    removed: str | None  # the old version's folder, removed after the check passed

    @property
    def message(self) -> str:
        if self.outcome == "current":
            return f"The Local LLM runtime is already at version {self.version}."
        before = f"from {self.previous} " if self.previous else ""
        return f"Local LLM runtime upgraded {before}to {self.version}."


def current_folder(root: Path) -> str | None:
    """The folder `current` names (a symlink; a pointer file on Windows)."""
    with contextlib.suppress(OSError):
        return os.readlink(root / "current")
    try:
        folder = (root / "current.txt").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return folder if folder and Path(folder).name == folder else None


def _refuse_foreign(settings: Settings, version: str | None) -> str:
    """The version to install, or an error when the upgrade is not ours to make."""
    if settings.llm.provider != "ollama":
        raise StigmerError(
            "upgrade-runtime upgrades the downloaded Local LLM runtime (llm.provider ollama); the built-in "
            "engine ships inside Stigmer.",
            hint="Upgrade Stigmer itself to get a newer built-in engine (pip install -U stigmer).",
            code=ErrorCode.UNSUPPORTED,
        )
    on_path = shutil.which("ollama")
    if on_path:
        raise StigmerError(
            f"The Local LLM runtime in use is {on_path} (found on PATH, not installed by Stigmer), so "
            "Stigmer does not upgrade it.",
            hint="Upgrade it the way it was installed (https://ollama.com/download), or remove it from "
            "PATH to let Stigmer install and upgrade its own: stigmer server llm upgrade-runtime",
            code=ErrorCode.UNSUPPORTED,
        )
    pinned = settings.llm.runtime_version
    wanted = (version or LATEST).removeprefix("v")
    if pinned != LATEST and wanted != pinned:
        raise StigmerError(
            f"llm.runtime_version pins the Local LLM runtime to {pinned}, so {wanted} would be replaced by "
            "it at the next start.",
            hint=f"Pin the new version (or unpin it), then upgrade:\n  stigmer config set llm.runtime_version "
            f"{wanted if wanted != LATEST else LATEST}\n  stigmer server llm upgrade-runtime"
            + (f" {wanted}" if wanted != LATEST else ""),
            code=ErrorCode.CONFIG_INVALID,
        )
    return wanted


def upgrade_runtime(
    settings: Settings,
    paths: Paths,
    report: Reporter,
    *,
    version: str | None = None,
    on_wait: Callable[[], None] | None = None,
) -> UpgradeResult:
    """Install `version` (the newest release by default), check it, keep it or roll back (see above)."""
    from stigmer.install import installer
    from stigmer.llm.ollama.assets import Platform as RuntimePlatform
    from stigmer.services.lock import control_lock

    wanted = _refuse_foreign(settings, version)
    plat = RuntimePlatform.current()
    release = install.release(settings.llm.download_url, wanted)
    root = install.runtime_root(paths)
    with control_lock(paths, on_wait=on_wait):
        runtime = OllamaProvider(settings, paths, model=settings.llm.model)
        running = runtime.managed_record() is not None and runtime.healthy()
        old_folder = current_folder(root)
        previous = install.installed_version(paths)
        installer.install(release, paths, report, plat=plat)
        new_folder = current_folder(root)
        now = install.installed_version(paths) or wanted
        if new_folder == old_folder:
            return UpgradeResult(previous, now, "current", restarted=False, removed=None)
        try:
            if running:
                _restart(runtime, now, report)
            else:
                _check_alone(settings, paths, now, report)
        except StigmerError as e:
            raise _rolled_back(
                e, release, paths, plat, old_folder, previous, now, runtime, running, report
            ) from None
        removed = None
        if old_folder and old_folder != new_folder and (root / old_folder).is_dir():
            shutil.rmtree(root / old_folder, ignore_errors=True)
            removed = str(root / old_folder)
        log.info("runtime upgraded from %s to %s", previous, now)
        return UpgradeResult(previous, now, "upgraded", restarted=running, removed=removed)


def _restart(runtime: OllamaProvider, version: str, report: Reporter) -> None:
    from stigmer.llm.provider import stop_llm

    report(Event(STARTING, f"Restarting the Local LLM on runtime {version}"))
    stop_llm(runtime.paths)
    runtime.start(report)
    _answers(runtime, version)


def _check_alone(settings: Settings, paths: Paths, version: str, report: Reporter) -> None:
    """Start the installed runtime on a free loopback port, check it answers, stop it."""
    from stigmer.net.addresses import free_port
    from stigmer.services.manager import Services
    from stigmer.services.spec import ServiceSpec

    report(Event(STARTING, f"Checking the Local LLM runtime {version}"))
    checker = OllamaProvider(
        settings, paths, model=settings.llm.model, base_url=f"http://127.0.0.1:{free_port()}"
    )
    binary = checker.runtime_binary()
    if binary is None:
        raise StigmerError(
            f"The Local LLM runtime {version} was installed but its program is missing.",
            hint="Run the command again.",
            code=ErrorCode.INSTALL_FAILED,
        )
    env, sandbox = checker.confined_env(binary)  # the new program runs confined from its first start
    env["OLLAMA_NOPRUNE"] = "1"  # a check must not touch the model store (it prunes old partial files)
    spec = ServiceSpec(
        name=CHECK_SERVICE,
        argv=checker.server_argv(binary),
        env=env,
        sandbox=sandbox,
        ready=checker.healthy,
        what=f"Local LLM runtime {version} (health check)",
        address=("127.0.0.1", int(checker.base_url.rsplit(":", 1)[1])),
        ready_timeout=CHECK_TIMEOUT,
    )
    services = Services(paths)
    try:
        services.start(spec)
        _answers(checker, version)
    finally:
        services.stop(CHECK_SERVICE)


def _answers(runtime: OllamaProvider, version: str) -> None:
    """The runtime answering is the version just installed (not a leftover of the old one)."""
    from stigmer.net import http

    if not version[:1].isdigit():
        return  # installed as "latest" without a version in the release's address: nothing to compare
    try:
        data = http.get_json(runtime.url("/api/version"), timeout=5)
    except (OSError, ValueError) as e:
        raise StigmerError(
            f"The Local LLM runtime {version} started but does not answer ({e}).",
            hint=f"See its log: {runtime.paths.log_file('llm')}",
            code=ErrorCode.START_FAILED,
        ) from None
    got = str((data or {}).get("version", "")).removeprefix("v")
    if got != version:
        raise StigmerError(
            f"The Local LLM runtime answers as version {got or '(none)'}, not {version}.",
            hint="Run the command again.",
            code=ErrorCode.START_FAILED,
        )


def _rolled_back(
    error: StigmerError,
    release: Release,
    paths: Paths,
    plat: Platform,
    old_folder: str | None,
    previous: str | None,
    new: str,
    runtime: OllamaProvider,
    running: bool,
    report: Reporter,
) -> StigmerError:
    """Put the old version back (and start it again if it was running); the error that says so."""
    from stigmer.install import installer

    root = install.runtime_root(paths)
    if old_folder is None:
        for name in ("current", "current.txt"):
            (root / name).unlink(missing_ok=True)  # nothing worked before either: nothing is current
        back = "nothing was installed before, so nothing is current now"
    else:
        installer.switch(release, paths, old_folder, plat)
        back = f"version {previous} is current again"
        if running:
            report(Event(INSTALLING, f"Restarting the Local LLM on runtime {previous}"))
            try:
                runtime.start(report)
            except StigmerError:
                back += ", but it could not be started again either: run  stigmer server"
            else:
                back += " and serves again"
    log.info("runtime %s failed its health check (%s); rolled back", new, error.message)
    return StigmerError(
        f"The Local LLM runtime {new} failed its health check: {error.message.rstrip('.')}. It was rolled "
        f"back: {back}.",
        hint=error.hint,
        code=ErrorCode.START_FAILED,
    )

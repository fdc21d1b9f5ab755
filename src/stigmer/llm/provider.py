"""The provider interface behind "Local LLM", and the registry that picks one by name.

Providers report progress as Events to one callback that the CLI supplies; they never print.
Process handling (pid record, log, readiness, stop) is shared by every provider that runs a local
server, in ManagedServer.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from stigmer.config.store import Settings
from stigmer.errors import StigmerError
from stigmer.paths import Paths
from stigmer.proc import record as records
from stigmer.proc.record import ProcessRecord

if TYPE_CHECKING:
    import subprocess

INITIALIZING, INSTALLING, STARTING = "Initializing", "Installing", "Starting"


@dataclass(frozen=True)
class Event:
    phase: str
    message: str
    key: str | None = None  # identifies one progress bar (a download, a layer)
    done: int | None = None
    total: int | None = None


Reporter = Callable[[Event], None]


def silent(_event: Event) -> None:
    pass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size: int
    modified: str  # RFC 3339
    digest: str = ""
    source: str = ""


@dataclass
class LlmStatus:
    provider: str
    label: str  # what users see: "Local", "Local (built-in engine)"
    running: bool
    pid: int | None
    managed: bool  # started by Stigmer (so `server stop` will stop it)
    model: str
    model_available: bool
    available: list[str]
    base_url: str
    fallback: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def host_port(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return host, port


def not_running_error(label: str = "Local LLM") -> StigmerError:
    return StigmerError(
        f"The {label} is not running.", hint="Start it with: stigmer server", code="llm_not_running"
    )


class Provider(ABC):
    name: ClassVar[str]
    label: ClassVar[str]  # in the status block: "Provider: Local ✓ Running"
    noun: ClassVar[str]  # in sentences: "the Local LLM"

    def __init__(self, settings: Settings, paths: Paths, report: Reporter = silent) -> None:
        self.settings = settings
        self.paths = paths
        self.report = report
        self.extra_info: dict[str, Any] = {}  # recorded with the server's pid (e.g. offline fallback)

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    def url(self, path: str) -> str:
        return self.base_url + path

    def port_busy(self, answered: str) -> StigmerError:
        """Something that is not our server answers on base_url: say what, and never touch it."""
        host, port = host_port(self.base_url)
        return StigmerError(
            f"Port {port} on {host} is in use by another program, which is not the {self.noun} "
            f"(it answered: {answered}).",
            hint="Nothing was stopped. Stop that program, or use another port:\n"
            f"  stigmer config set llm.base_url http://127.0.0.1:{port + 1}",
            code="port_in_use",
        )

    @abstractmethod
    def is_running(self) -> bool:
        """True if our kind of server answers on base_url; an error if something else does."""

    @abstractmethod
    def ensure_runtime(self) -> None:
        """Make the runtime present (download and install it if needed)."""

    @abstractmethod
    def start(self) -> ProcessRecord:
        """Start the server detached and wait until it answers."""

    @abstractmethod
    def stop(self) -> bool:
        """Stop the server this product started; False when there was none."""

    @abstractmethod
    def ensure_model(self, model: str) -> None:
        """Make the model available, pulling it with progress when missing."""

    @abstractmethod
    def list_models(self) -> list[ModelInfo]: ...

    @abstractmethod
    def pull(self, model: str) -> None: ...

    @abstractmethod
    def remove(self, model: str) -> None: ...

    @abstractmethod
    def status(self) -> LlmStatus: ...


class ManagedServer(Provider, ABC):
    """A provider whose server is a local process this product starts, records and stops."""

    service = "llm"

    def managed_record(self) -> ProcessRecord | None:
        rec = records.live_record(self.paths.llm_pid)
        if rec is not None and rec.info.get("provider") not in (None, self.name):
            return None  # a server of the other provider: not this one's to report or stop
        return rec

    def launch(
        self, argv: list[str], env: dict[str, str], probe: Callable[[], bool], *, timeout: float = 30.0
    ) -> ProcessRecord:
        from stigmer.proc import ready, spawn  # not needed by status and list: keep them light

        self.paths.ensure(self.paths.home, self.paths.logs_dir)
        proc, rec = spawn.start_detached(
            argv,
            env=env,
            log_path=self.paths.llm_log,
            pid_path=self.paths.llm_pid,
            service=self.service,
            info={
                "provider": self.name,
                "base_url": self.base_url,
                "model": self.settings.model,
                **self.extra_info,
            },
        )
        try:
            ready.wait_ready(
                probe,
                proc=proc,
                what=f"{self.label} LLM server",
                log_path=self.paths.llm_log,
                timeout=timeout,
            )
        except BaseException:
            # Never leave a half-started server behind (also on Ctrl-C).
            spawn.stop(rec, timeout=5)
            _reap(proc)
            records.remove(self.paths.llm_pid)
            raise
        return rec

    def stop(self) -> bool:
        return stop_managed(self.paths) is not None

    def child_env(self) -> dict[str, str]:
        """The server's environment: ours (proxy variables included, which the runtime needs itself)."""
        return dict(os.environ)


def stop_managed(paths: Paths) -> ProcessRecord | None:
    """Stop the LLM server this product started, whichever provider it is; None when there is none."""
    from stigmer.proc import spawn

    rec = records.live_record(paths.llm_pid)
    if rec is None:
        return None
    spawn.stop(rec)
    records.remove(paths.llm_pid)
    return rec


def _reap(proc: subprocess.Popen[bytes]) -> None:
    import subprocess

    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


# The registry: provider name -> "module:Class". Imported on use so `stigmer` starts fast; the built-in
# providers are registered exactly as an added one would be.
_REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def provider_class(name: str) -> type[Provider]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise StigmerError(
            f"Unknown LLM provider {name!r}.",
            hint=f"Valid providers: {', '.join(sorted(_REGISTRY))}",
            code="config_invalid",
        ) from None
    module, _, cls = target.partition(":")
    klass: type[Provider] = getattr(importlib.import_module(module), cls)
    return klass


def get_provider(settings: Settings, paths: Paths, report: Reporter = silent) -> Provider:
    return provider_class(settings.provider)(settings, paths, report)


register("ollama", "stigmer.llm.ollama.provider:OllamaProvider")
register("llamacpp", "stigmer.llm.llamacpp.provider:LlamaCppProvider")

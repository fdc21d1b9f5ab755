"""The provider interface behind "Local LLM", split by what a provider can do, and the registry.

Every provider has a chat endpoint (base URL, key, model: list models, chat, streamed chat) and a
status. A provider whose server runs on this machine is also a LocalRuntime (install, start, stop,
serve a model), and one with models to manage is also a ModelCatalog (list, pull, remove). A remote
provider implements only what applies; `capabilities` says which parts a provider has, so callers
(the CLI, the API) ask instead of calling stubs.

What is served (model, base URL) is the provider's own state, set when it is made: the settings say
what the user configured, and the offline fallback serves something else without changing them.
Progress goes to the Reporter passed with each call.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import Reporter
from stigmer.llm.status import LlmStatus
from stigmer.net.addresses import host_port
from stigmer.paths import Paths

if TYPE_CHECKING:
    from stigmer.llm.endpoint import ChatEndpoint
    from stigmer.sandbox.policy import Policy
    from stigmer.services.record import ProcessRecord
    from stigmer.services.spec import ServiceSpec

RUNTIME = "runtime"  # a server on this machine that the product installs, starts and stops
CATALOG = "catalog"  # models that can be listed, pulled and removed

SERVICE = "llm"  # the service name of every local LLM server (run/llm.pid, logs/llm.log)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    size: int
    modified: str  # RFC 3339
    digest: str = ""
    source: str = ""


def not_running_error(label: str = "Local LLM") -> StigmerError:
    return StigmerError(
        f"The {label} is not running.", hint="Start it with: stigmer server", code=ErrorCode.NOT_RUNNING
    )


class Provider(ABC):
    name: ClassVar[str]
    label: ClassVar[str]  # in the status block: "Provider: Local ✓ Running"
    noun: ClassVar[str]  # in sentences: "the Local LLM"

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        *,
        model: str | None = None,
        base_url: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.model = model or settings.llm.model
        self.base_url = base_url or settings.llm.base_url
        self.extra = dict(extra or {})  # kept in a started server's pid record (e.g. the offline fallback)

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(
            cap for cap, part in ((RUNTIME, LocalRuntime), (CATALOG, ModelCatalog)) if isinstance(self, part)
        )

    def url(self, path: str) -> str:
        return self.base_url + path

    def endpoint(self, model: str | None = None) -> ChatEndpoint:
        """The OpenAI-compatible chat API of this provider (local servers serve it under /v1)."""
        from stigmer.llm.endpoint import OpenAICompatible

        return OpenAICompatible(self.base_url + "/v1", model or self.model, self.settings.llm.api_key)

    @abstractmethod
    def status(self) -> LlmStatus: ...


class LocalRuntime(ABC):
    """A provider whose server is a local process this product installs, starts, records and stops."""

    paths: Paths
    base_url: str
    model: str
    extra: dict[str, Any]
    noun: ClassVar[str]
    name: ClassVar[str]
    # ensure_runtime fetches the model too (the built-in engine ships with Stigmer: what it needs is the
    # model); otherwise the model is pulled by the running server (ensure_model).
    model_with_runtime: ClassVar[bool] = False

    @abstractmethod
    def is_running(self) -> bool:
        """True if our kind of server answers on base_url; an error if something else does."""

    @abstractmethod
    def healthy(self) -> bool:
        """The server answers requests (its readiness probe; the supervisor's health check)."""

    @abstractmethod
    def ensure_runtime(self, report: Reporter) -> None:
        """Make the runtime present (download and install it if needed)."""

    @abstractmethod
    def service_spec(self, report: Reporter, model: str | None = None) -> ServiceSpec:
        """How to run the server (serving `model`, else self.model); may fetch what it needs first."""

    @abstractmethod
    def ensure_model(self, model: str, report: Reporter) -> None:
        """Make the running server serve `model`, pulling it with progress when missing."""

    def is_downloaded(self, model: str) -> bool:
        """`model` is on this machine, so serving it downloads nothing (no fit check needed before).
        A runtime that cannot tell says True: the check is for downloads it knows it will make."""
        return True

    def llm_spec(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        what: str,
        model: str,
        ready_timeout: float = 30.0,
        sandbox: Policy | None = None,
    ) -> ServiceSpec:
        """The service spec every local LLM server shares: its record says what it serves and where.
        `sandbox`: the policy it starts under (Linux)."""
        from stigmer.services.spec import ServiceSpec

        return ServiceSpec(
            name=SERVICE,
            argv=argv,
            env=env,
            ready=self.healthy,
            what=what,
            address=host_port(self.base_url),
            ready_timeout=ready_timeout,
            info={"provider": self.name, "base_url": self.base_url, "model": model, **self.extra},
            sandbox=sandbox,
        )

    def start(self, report: Reporter, model: str | None = None) -> ProcessRecord:
        """Start the server detached and wait until it answers."""
        from stigmer.services.manager import Services

        return Services(self.paths).start(self.service_spec(report, model))

    def stop(self) -> bool:
        """Stop the server this product started; False when there was none."""
        return stop_llm(self.paths) is not None

    def managed_record(self) -> ProcessRecord | None:
        """Our live server's record when it is of this provider and serves this base URL."""
        from stigmer.services.manager import Services

        rec = Services(self.paths).record(SERVICE)
        if rec is None or rec.info.get("provider") not in (None, self.name):
            return None  # a server of the other provider: not this one's to report or stop
        if rec.info.get("base_url") not in (None, self.base_url):
            return None
        return rec

    def port_busy(self, answered: str) -> StigmerError:
        """Something that is not our server answers on base_url: say what, and never touch it."""
        host, port = host_port(self.base_url)
        return StigmerError(
            f"Port {port} on {host} is in use by another program, which is not the {self.noun} "
            f"(it answered: {answered}).",
            hint="Nothing was stopped. Stop that program, or use another port:\n"
            f"  stigmer config set llm.base_url http://127.0.0.1:{port + 1}",
            code=ErrorCode.PORT_IN_USE,
        )


class ModelCatalog(ABC):
    @abstractmethod
    def list_models(self) -> list[ModelInfo]: ...

    @abstractmethod
    def pull(self, model: str, report: Reporter) -> None: ...

    @abstractmethod
    def remove(self, model: str) -> None: ...


def stop_llm(paths: Paths, *, timeout: float = 10.0) -> ProcessRecord | None:
    """Stop the LLM server this product started, whichever provider it is; None when there is none."""
    from stigmer.services.manager import Services

    return Services(paths).stop(SERVICE, timeout=timeout)


# The registry: provider name -> "module:Class". Imported on use so `stigmer` starts fast; the built-in
# providers are registered exactly as an added one would be.
_REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def registered() -> list[str]:
    return sorted(_REGISTRY)


def provider_class(name: str) -> type[Provider]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise StigmerError(
            f"Unknown LLM provider {name!r}.",
            hint=f"Valid providers: {', '.join(sorted(_REGISTRY))}",
            code=ErrorCode.CONFIG_INVALID,
        ) from None
    module, _, cls = target.partition(":")
    klass: type[Provider] = getattr(importlib.import_module(module), cls)
    return klass


def get_provider(
    settings: Settings,
    paths: Paths,
    *,
    name: str | None = None,
    model: str | None = None,
    base_url: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Provider:
    """The configured provider (or `name`), serving `model` on `base_url` when given."""
    klass = provider_class(name or settings.llm.provider)
    return klass(settings, paths, model=model, base_url=base_url, extra=extra)


register("ollama", "stigmer.llm.ollama.provider:OllamaProvider")
register("llamacpp", "stigmer.llm.llamacpp.provider:LlamaCppProvider")
register("openai", "stigmer.llm.remote:OpenAIProvider")
register("anthropic", "stigmer.llm.remote:AnthropicProvider")
register("openai-compatible", "stigmer.llm.remote:OpenAICompatibleProvider")

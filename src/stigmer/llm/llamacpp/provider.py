"""The built-in engine (llama.cpp via xllamacpp), shown to users as "Local (built-in engine)".

It needs no runtime download: the engine ships in the xllamacpp wheel and runs as its own detached
process (same service layer as the downloaded runtime). It serves one model at a time, so a change of
model restarts it: the new model is checked before the running engine is stopped, and if the new one
still fails to start, the previous model is served again.

Its context window is llm.context_size, or when that is 0, chosen at each start from the model's header
and the RAM available then (llm.models.fit_check.auto_context): the largest context up to the model's
trained maximum that fits, with a floor and a logged note when memory keeps it small.
"""

from __future__ import annotations

import json
import logging
import sys
import urllib.error
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import STARTING, Event, Reporter
from stigmer.llm.models import sources
from stigmer.llm.models.starter import STARTER_MODEL, starter_model_path
from stigmer.llm.models.store import StoredModel
from stigmer.llm.names import parse_model_name, same_model
from stigmer.llm.provider import (
    LocalRuntime,
    ModelCatalog,
    ModelInfo,
    Provider,
    stop_llm,
)
from stigmer.llm.status import LlmStatus
from stigmer.net import http
from stigmer.net.addresses import host_port
from stigmer.services.spec import ServiceSpec

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0
ENGINE_OWNER = "llamacpp"
CPU_NOTE = "Runs on the CPU (the built-in engine uses no GPU in this build)"


class LlamaCppProvider(Provider, LocalRuntime, ModelCatalog):
    name = "llamacpp"
    label = "Local (built-in engine)"
    noun = "Local LLM (built-in engine)"
    model_with_runtime = True

    # -- running? ----------------------------------------------------------------------------------
    def served_model(self) -> str | None:
        """The model our engine serves on base_url; None when nothing listens; an error for a stranger,
        including a built-in engine that this STIGMER_HOME did not start (another home's)."""
        try:
            with http.request(self.url("/v1/models"), timeout=PROBE_TIMEOUT) as resp:
                body = resp.read(64 * 1024)
                server = resp.headers.get("Server", "")
        except urllib.error.HTTPError as e:
            if e.code == 503 and self.managed_record() is not None:  # ours, still loading its model
                return self._record_model()
            raise self.port_busy(f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError):
            return None
        try:
            entry = json.loads(body)["data"][0]
            ours = entry.get("owned_by") == ENGINE_OWNER
            served = str(entry["id"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            ours, served = False, ""
        if not ours:
            raise self.port_busy(f"HTTP 200 from {server or 'an unknown server'}, not the built-in engine")
        if self.managed_record() is None:
            host, port = host_port(self.base_url)
            raise StigmerError(
                f"Port {port} on {host} is used by a built-in engine that this Stigmer home "
                f"({self.paths.home}) did not start; it is not reused.",
                hint="Another STIGMER_HOME (or another user) runs it. Stop it from there "
                "(STIGMER_HOME=... stigmer server stop), or choose another port:\n"
                f"  stigmer config set {self._url_key} http://127.0.0.1:{port + 1}",
                code=ErrorCode.PORT_IN_USE,
            )
        return served

    @property
    def _url_key(self) -> str:
        return "llm.base_url" if self.base_url == self.settings.llm.base_url else "llm.fallback_base_url"

    def _record_model(self) -> str | None:
        rec = self.managed_record()
        return str(rec.info.get("model")) if rec else None

    def is_running(self) -> bool:
        return self.served_model() is not None

    # -- runtime: the engine ships with the product; what must be present is the model ---------------
    def ensure_runtime(self, report: Reporter) -> None:
        self._model_file(self.model, report)

    def _model_file(self, model: str, report: Reporter) -> StoredModel:
        return sources.ensure(self.paths, self.settings, model, report)

    def context_size(self, model: StoredModel) -> tuple[int, str]:
        """The context window to start `model` with, and a note when memory limited it."""
        if self.settings.llm.context_size:
            return self.settings.llm.context_size, ""
        from stigmer.llm.models.fit_check import auto_context_for_file

        return auto_context_for_file(Path(model.path))

    def engine_argv(
        self, model: StoredModel, *, ctx_size: int | None = None, internal_port: int = 0
    ) -> list[str]:
        from stigmer.llm.llamacpp.engine import default_threads, engine_argv

        host, port = host_port(self.base_url)
        if ctx_size is None:
            ctx_size = self.context_size(model)[0]
        return engine_argv(
            sys.executable,
            model_path=Path(model.path),
            alias=model.name,
            host=host,
            port=port,
            ctx_size=ctx_size,
            threads=self.settings.llm.threads or default_threads(),
            origins=self.settings.llm.origins,
            internal_port=internal_port,
        )

    def engine_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        from stigmer.services.env import GPU, PYTHON, child_env

        return child_env(PYTHON, GPU, environ=environ)

    def service_spec(self, report: Reporter, model: str | None = None) -> ServiceSpec:
        stored = self._model_file(model or self.model, report)
        report(Event(STARTING, "Starting local LLM server (built-in engine)"))
        ctx_size, note = self.context_size(stored)
        log.info("%s: context window of %d tokens%s", stored.name, ctx_size, f" ({note})" if note else "")
        if note:  # a context smaller than the model's: worth a line on the way
            report(Event(STARTING, f"Context window of {stored.name}: {note}"))
        sandbox, internal_port = None, 0
        if sys.platform.startswith("linux"):
            # llama.cpp's internal port is chosen here, not by llama.cpp, so that the policy can name it
            # (bind and connect); a new one at every start.
            from stigmer.net.addresses import free_port
            from stigmer.sandbox.engines import builtin_engine

            internal_port = free_port()
            sandbox = builtin_engine(
                self.paths,
                self.settings,
                model_path=Path(stored.path),
                port=host_port(self.base_url)[1],
                internal_port=internal_port,
            )
        return self.llm_spec(
            self.engine_argv(stored, ctx_size=ctx_size, internal_port=internal_port),
            self.engine_env(),
            what="Local LLM server (built-in engine)",
            model=stored.name,
            ready_timeout=60,
            sandbox=sandbox,
        )

    def is_downloaded(self, model: str) -> bool:
        return sources.local_model(self.paths, model) is not None

    def healthy(self) -> bool:
        try:
            with http.request(self.url("/health"), timeout=PROBE_TIMEOUT) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def ensure_model(self, model: str, report: Reporter) -> None:
        """Serve `model`: fetch and check it while the running engine keeps serving, then switch; if the
        new model will not start, serve the previous one again and say why."""
        served = self.served_model()
        if served is not None and same_model(served, model):
            return
        check_model(self._model_file(model, report))
        if served is None:
            self.start(report, model)
            return
        stop_llm(self.paths)
        try:
            self.start(report, model)
        except StigmerError as e:
            try:
                self.start(report, served)
            except StigmerError:
                back = f"and {served} could not be started again either: run  stigmer server"
            else:
                back = f"{served} is served again"
            raise StigmerError(
                f"The built-in engine could not serve {model} ({e.message.rstrip('.')}); {back}.",
                hint=e.hint,
                code=e.code,
            ) from None

    # -- models ------------------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        store = sources.store_for(self.paths)
        sources.starter(store)
        return [ModelInfo(m.name, m.size, m.modified, m.sha256, m.source) for m in store.list()]

    def pull(self, model: str, report: Reporter) -> None:
        self._model_file(model, report)

    def remove(self, model: str) -> None:
        parse_model_name(model)
        if same_model(model, STARTER_MODEL):
            raise StigmerError(
                f"{STARTER_MODEL} is the built-in starter model and cannot be removed.",
                code=ErrorCode.UNSUPPORTED,
                hint="It ships with Stigmer so that a local LLM always works.",
            )
        rec = self.managed_record()
        if rec is not None and same_model(str(rec.info.get("model", "")), model):
            raise StigmerError(
                f"Model {model} is being served by the Local LLM (PID {rec.pid}) and cannot be removed.",
                hint="Stop the server first (stigmer server stop), or switch to another model:\n"
                "  stigmer config set llm.model OTHER && stigmer server",
                code=ErrorCode.MODEL_IN_USE,
            )
        removed = sources.store_for(self.paths).remove(model)
        if removed is None:
            raise StigmerError(
                f"Model {model} is not installed.",
                code=ErrorCode.MODEL_NOT_FOUND,
                hint="See installed models: stigmer server llm list",
            )

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> LlmStatus:
        rec = self.managed_record()
        notes: list[str] = []
        try:
            served = self.served_model()
        except StigmerError as e:
            served = None
            notes.append(e.message)
        store = sources.store_for(self.paths)
        available = [m.name for m in store.list()]
        if STARTER_MODEL not in available and starter_model_path() is not None:
            available.insert(0, STARTER_MODEL)
        model = served or self.model
        if served and not same_model(served, self.model):
            notes.append(f"configured model {self.model} is not served yet; run: stigmer server")
        if served:
            notes.append(CPU_NOTE)
        return LlmStatus(
            provider=self.name,
            label=self.label,
            running=served is not None,
            pid=rec.pid if rec and served else None,
            managed=rec is not None,
            model=model,
            model_available=any(same_model(a, model) for a in available),
            available=available,
            base_url=self.base_url,
            notes=notes,
            runs_on="cpu" if served else "",
            context=_ctx_size(rec.command) if rec and served else 0,
        )


def _ctx_size(argv: list[str]) -> int:
    """The --ctx-size the engine was started with (its pid record keeps the command line)."""
    try:
        return int(argv[argv.index("--ctx-size") + 1])
    except (ValueError, IndexError):
        return 0


def check_model(model: StoredModel) -> None:
    """A model file the engine can load: its GGUF header and tensor data are whole."""
    from stigmer.llm.gguf import GgufError, validate_file

    try:
        validate_file(Path(model.path))
    except GgufError as e:
        raise StigmerError(
            f"Model {model.name} cannot be served: {model.path} is not a usable GGUF file ({e}).",
            hint=f"Remove it (stigmer server llm rm {model.name}) and pull or import it again.",
            code=ErrorCode.INVALID_MODEL_FILE,
        ) from None
    except OSError as e:
        raise StigmerError(
            f"Model {model.name} cannot be read: {e.strerror or e} ({model.path}).",
            hint="Check the file, or pull the model again.",
            code=ErrorCode.INVALID_MODEL_FILE,
        ) from None

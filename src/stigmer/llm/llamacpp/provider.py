"""The built-in engine (llama.cpp via xllamacpp), shown to users as "Local (built-in engine)".

It needs no runtime download: the engine ships in the xllamacpp wheel and runs as its own detached
process (same pid record, log and stop as the downloaded runtime). It serves one model at a time, so a
change of llm.model restarts it.
"""

from __future__ import annotations

import json
import sys
import urllib.error
from pathlib import Path

from stigmer.errors import StigmerError
from stigmer.llm.llamacpp import sources
from stigmer.llm.llamacpp.starter import STARTER_MODEL, starter_model_path
from stigmer.llm.llamacpp.store import StoredModel
from stigmer.llm.names import parse_model_name, same_model
from stigmer.llm.provider import (
    STARTING,
    Event,
    LlmStatus,
    ManagedServer,
    ModelInfo,
    host_port,
    stop_managed,
)
from stigmer.net import http
from stigmer.proc.record import ProcessRecord

PROBE_TIMEOUT = 2.0
ENGINE_OWNER = "llamacpp"


class LlamaCppProvider(ManagedServer):
    name = "llamacpp"
    label = "Local (built-in engine)"
    noun = "Local LLM (built-in engine)"

    # -- running? ----------------------------------------------------------------------------------
    def served_model(self) -> str | None:
        """The alias our engine serves on base_url; None when nothing listens; an error for a stranger."""
        try:
            with http.request(self.url("/v1/models"), timeout=PROBE_TIMEOUT) as resp:
                body = resp.read(64 * 1024)
                server = resp.headers.get("Server", "")
        except urllib.error.HTTPError as e:
            if e.code == 503:  # our engine, still loading its model
                return self._record_model()
            raise self.port_busy(f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError):
            return None
        try:
            data = json.loads(body)
            entry = data["data"][0]
            if entry.get("owned_by") == ENGINE_OWNER:
                return str(entry["id"])
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            pass
        raise self.port_busy(f"HTTP 200 from {server or 'an unknown server'}, not the built-in engine")

    def _record_model(self) -> str | None:
        rec = self.managed_record()
        return str(rec.info.get("model")) if rec else None

    def is_running(self) -> bool:
        return self.served_model() is not None

    # -- runtime: the engine ships with the product; what must be present is the model ---------------
    def ensure_runtime(self) -> None:
        self._model_file(self.settings.model)

    def _model_file(self, model: str) -> StoredModel:
        return sources.ensure(self.paths, self.settings, model, self.report)

    def engine_argv(self, model: StoredModel) -> list[str]:
        from stigmer.llm.llamacpp.engine import default_context_size, default_threads, engine_argv

        host, port = host_port(self.base_url)
        ctx = int(self.settings.get("llm.context_size")) or default_context_size()
        threads = int(self.settings.get("llm.threads")) or default_threads()
        return engine_argv(
            sys.executable,
            model_path=Path(model.path),
            alias=model.name,
            host=host,
            port=port,
            ctx_size=ctx,
            threads=threads,
        )

    def start(self) -> ProcessRecord:
        model = self._model_file(self.settings.model)
        host, _port = host_port(self.base_url)
        from stigmer.llm.llamacpp.engine import is_loopback_host

        if not is_loopback_host(host):
            raise StigmerError(
                f"The built-in engine only listens on this machine, not on {host}.",
                hint="Use a loopback address: stigmer config set llm.base_url http://127.0.0.1:11435",
                code="config_invalid",
            )
        self.report(Event(STARTING, "Starting local LLM server (built-in engine)"))
        return self.launch(self.engine_argv(model), self.child_env(), self._healthy, timeout=60)

    def _healthy(self) -> bool:
        try:
            with http.request(self.url("/health"), timeout=PROBE_TIMEOUT) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def ensure_model(self, model: str) -> None:
        served = self.served_model()
        if served is not None and same_model(served, model):
            return
        self._model_file(model)  # fetch first: the running engine keeps serving meanwhile
        if served is not None:
            if self.managed_record() is None:
                raise StigmerError(
                    f"The built-in engine on {self.base_url} serves {served}, not {model}, "
                    "and was not started by Stigmer.",
                    code="port_in_use",
                    hint="Stop it, then run: stigmer server",
                )
            stop_managed(self.paths)
        self.start()

    # -- models ------------------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        store = sources.store_for(self.paths)
        sources.starter(store)
        return [ModelInfo(m.name, m.size, m.modified, m.sha256, m.source) for m in store.list()]

    def pull(self, model: str) -> None:
        self._model_file(model)

    def remove(self, model: str) -> None:
        if same_model(model, STARTER_MODEL):
            raise StigmerError(
                f"{STARTER_MODEL} is the built-in starter model and cannot be removed.",
                code="remove_failed",
                hint="It ships with Stigmer so that a local LLM always works.",
            )
        parse_model_name(model)
        removed = sources.store_for(self.paths).remove(model)
        if removed is None:
            raise StigmerError(
                f"Model {model} is not installed.",
                code="model_not_found",
                hint="See installed models: stigmer server llm list",
            )

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> LlmStatus:
        rec = self.managed_record()
        try:
            served = self.served_model()
        except StigmerError:
            served = None
        store = sources.store_for(self.paths)
        available = [m.name for m in store.list()]
        if STARTER_MODEL not in available and starter_model_path() is not None:
            available.insert(0, STARTER_MODEL)
        model = served or self.settings.model
        notes: list[str] = []
        if served and not same_model(served, self.settings.model):
            notes.append(f"configured model {self.settings.model} is not served yet; run: stigmer server")
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
        )

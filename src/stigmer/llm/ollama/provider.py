"""The Local LLM runtime (Ollama), shown to users only as "Local LLM".

Its default model follows the machine: while llm.model is not set, the model is chosen by `stigmer
server` (hw.fit.default_model: the largest that RAM and GPU memory allow and that generates at a usable
speed here), which remembers the choice, its reason and its expected tokens/s in
data/default-model.json, so that every later status (and the daemon) shows the same model without
probing the GPUs again. The status says whether the runtime runs the loaded model on the GPU (its
/api/ps: size_vram against size), and says plainly when it runs on the CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import urllib.error
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stigmer.config.schema import PROVIDER_DEFAULTS
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, NetworkUnreachable, StigmerError
from stigmer.events import INSTALLING, STARTING, Event, Reporter
from stigmer.llm.names import parse_model_name, same_model
from stigmer.llm.ollama import assets
from stigmer.llm.provider import (
    LocalRuntime,
    ModelCatalog,
    ModelInfo,
    Provider,
    not_running_error,
)
from stigmer.llm.quick_status import DEFAULT_CHOICE, read_default_choice
from stigmer.llm.status import LlmStatus, chosen_note
from stigmer.net import http
from stigmer.net.addresses import host_port
from stigmer.paths import Paths
from stigmer.services.spec import ServiceSpec

if TYPE_CHECKING:
    from stigmer.hw.report import HardwareReport
    from stigmer.sandbox.policy import Policy

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0


def uses_default_model(settings: Settings) -> bool:
    """llm.model is not set anywhere (so the machine decides)."""
    return (
        settings.sources.get("llm.model") == "default"
        and settings.llm.model == PROVIDER_DEFAULTS["ollama"]["model"]
    )


def default_choice(
    paths: Paths, *, hardware: HardwareReport | None = None, refresh: bool = False
) -> tuple[str, str, float]:
    """(model, why, expected tokens/s) for this machine: the remembered choice, else (or with
    `refresh`, or a given `hardware`) chosen now (hw.fit.default_model: memory and speed) and
    remembered. A choice remembered by an older version has no speed: 0."""
    from stigmer.fsutil import atomic_write

    path = paths.data_dir / DEFAULT_CHOICE
    if hardware is None and not refresh:
        remembered = read_default_choice(path)  # the light reader the quick status shares
        if remembered is not None:
            return remembered
    if hardware is None:
        from stigmer.hw.report import detect

        hardware = detect(paths.models_dir)
    from stigmer.hw.fit import default_model

    choice = default_model(hardware)
    record = {
        "model": choice.model,
        "reason": choice.reason,
        "tokens_per_second": choice.tokens_per_second,
        "runs_on": choice.runs_on,
        "ram_total": hardware.ram_total,
        "vram_total": hardware.vram_total,
        "cpu_cores": hardware.cpu.physical_cores,
    }
    if paths.home.is_dir():  # a status before the first start writes nothing
        try:
            paths.ensure(paths.data_dir)
            atomic_write(path, json.dumps(record, indent=2).encode())
        except OSError as e:
            log.info("could not remember the default model in %s: %s", path, e)
    return choice.model, choice.reason, choice.tokens_per_second


def placement(entry: Mapping[str, Any]) -> tuple[str, str]:
    """Where a loaded model runs, from its /api/ps entry: (gpu | partial | cpu, a sentence)."""
    size = int(entry.get("size") or 0)
    vram = int(entry.get("size_vram") or 0)
    if size <= 0:
        return "", ""
    if vram >= size:
        return "gpu", "Runs on the GPU (all of the model is in GPU memory)"
    if vram > 0:
        share = vram * 100 // size
        return "partial", (
            f"Runs partly on the CPU: {share}% of the model is in GPU memory, the rest in RAM "
            "(slower; a smaller model fits the GPU whole)"
        )
    return (
        "cpu",
        "Runs on the CPU: no part of the model is in GPU memory (if this machine has a GPU: stigmer doctor)",
    )


def download_failure_hint(paths_bin: str, download_url: str) -> str:
    """What works when the runtime cannot be downloaded: each way out is a command that does something."""
    host = http.redact(download_url)
    return (
        f"Unable to reach {host}. This could be due to:\n"
        "  • No internet connection\n"
        "  • The release server being unavailable\n"
        "  • A firewall blocking downloads\n"
        "\n"
        "You can:\n"
        "  1. Check your internet connection and run again (the download resumes where it stopped):\n"
        "       stigmer server\n"
        "  2. Use the built-in engine, which needs no download:\n"
        "       stigmer config set llm.provider llamacpp && stigmer server\n"
        "  3. Download from a mirror with the same layout:\n"
        "       stigmer config set llm.download_url https://mirror.example.com/ollama/releases\n"
        "  4. Install the runtime by hand from https://ollama.com/download and place the program at\n"
        f"       {paths_bin}\n"
        "  5. Use a remote LLM instead (with OPENAI_API_KEY or ANTHROPIC_API_KEY set):\n"
        "       stigmer config set llm.provider openai"
    )


class OllamaProvider(Provider, LocalRuntime, ModelCatalog):
    name = "ollama"
    label = "Local"
    noun = "Local LLM"

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        *,
        model: str | None = None,
        base_url: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(settings, paths, model=model, base_url=base_url, extra=extra)
        self.default_reason = ""  # why this machine got its default model (when llm.model is not set)
        self.expected_speed = 0.0  # the default model's estimated tokens/s here (0: not estimated)
        if model is None and uses_default_model(settings):
            self.model, self.default_reason, self.expected_speed = default_choice(paths)

    # -- running? ----------------------------------------------------------------------------------
    def is_running(self) -> bool:
        try:
            with http.request(self.url("/api/version"), timeout=PROBE_TIMEOUT) as resp:
                body = resp.read(4096)
                server = resp.headers.get("Server", "")
        except urllib.error.HTTPError as e:
            raise self.port_busy(f"HTTP {e.code} {e.reason}" + _server(e.headers.get("Server"))) from None
        except (urllib.error.URLError, OSError):
            return False
        import json

        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("version"), str):
            return True
        raise self.port_busy(f"HTTP 200 with a non-LLM answer{_server(server)}: {body[:60]!r}")

    # -- runtime -----------------------------------------------------------------------------------
    def runtime_binary(self) -> str | None:
        """`ollama` on PATH, then our own install (when it is the pinned version, if one is pinned)."""
        on_path = shutil.which("ollama")
        if on_path:
            return on_path
        from stigmer.llm.ollama import install  # archive/download code: only when installing

        plat = assets.Platform.current()
        ours = install.installed_binary(self.paths, plat)
        pinned = self.settings.llm.runtime_version
        if ours is not None and pinned != "latest" and install.installed_version(self.paths) != pinned:
            return None
        return str(ours) if ours else None

    def ensure_runtime(self, report: Reporter) -> None:
        if self.runtime_binary():
            return
        from stigmer.llm.ollama import install

        try:
            install.install(self.settings, self.paths, report)
        except NetworkUnreachable as e:
            e.hint = download_failure_hint(str(self.paths.bin_dir / "ollama"), self.settings.llm.download_url)
            raise

    # -- process -----------------------------------------------------------------------------------
    def server_argv(self, binary: str) -> list[str]:
        return [binary, "serve"]

    def server_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """Proxies (it pulls models itself), GPU selection and the user's OLLAMA_* settings; no secrets."""
        from stigmer.services.env import GPU, PROXY, child_env

        host, port = host_port(self.base_url)
        return child_env(
            PROXY, GPU, prefixes=("OLLAMA_",), extra={"OLLAMA_HOST": f"{host}:{port}"}, environ=environ
        )

    def service_spec(self, report: Reporter, model: str | None = None) -> ServiceSpec:
        binary = self.runtime_binary()
        if binary is None:
            self.ensure_runtime(report)
            binary = self.runtime_binary()
        assert binary is not None
        report(Event(STARTING, "Starting local LLM server"))
        env, sandbox = self.confined_env(binary)
        return self.llm_spec(
            self.server_argv(binary), env, what="Local LLM server", model=model or self.model, sandbox=sandbox
        )

    def confined_env(self, binary: str) -> tuple[dict[str, str], Policy | None]:
        """The runtime's environment and, on Linux, the sandbox policy it starts under (its temporary
        files go where that policy lets it write)."""
        env = self.server_env()
        if not sys.platform.startswith("linux"):
            return env, None
        from stigmer.sandbox.engines import ollama

        tmp = self.paths.data_dir / "ollama-tmp"
        env["TMPDIR"] = str(tmp)
        return env, ollama(self.paths, self.settings, binary=binary, tmp=tmp, environ=env)

    def healthy(self) -> bool:
        try:
            with http.request(self.url("/"), method="HEAD", timeout=PROBE_TIMEOUT) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    # -- models ------------------------------------------------------------------------------------
    def _tags(self) -> list[dict[str, Any]]:
        try:
            data = http.get_json(self.url("/api/tags"), timeout=10)
        except (urllib.error.URLError, OSError) as e:
            if http.is_unreachable(e):
                raise not_running_error() from None
            raise
        return list(data.get("models") or [])

    def list_models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                m["name"],
                int(m.get("size") or 0),
                str(m.get("modified_at") or ""),
                str(m.get("digest") or ""),
                "registry",
            )
            for m in self._tags()
        ]

    def has_model(self, model: str) -> bool:
        return any(same_model(m.name, model) for m in self.list_models())

    def is_downloaded(self, model: str) -> bool:
        """Asked of the running server (its store may be anywhere), else of the store on disk."""
        try:
            running = self.is_running()
        except StigmerError:
            running = False
        if running:
            try:
                return self.has_model(model)
            except StigmerError:
                pass
        from stigmer.llm.models.sources import find_in_ollama_store

        return find_in_ollama_store(parse_model_name(model)) is not None

    def loaded(self) -> list[dict[str, Any]]:
        """The models the runtime holds in memory now (/api/ps); empty when it does not answer."""
        try:
            data = http.get_json(self.url("/api/ps"), timeout=PROBE_TIMEOUT)
        except (urllib.error.URLError, OSError, ValueError):
            return []
        models = data.get("models") if isinstance(data, dict) else None
        return [m for m in models or [] if isinstance(m, dict)]

    def ensure_model(self, model: str, report: Reporter) -> None:
        if not self.has_model(model):
            self.pull(model, report)

    def pull(self, model: str, report: Reporter) -> None:
        name = parse_model_name(model)  # refuse a bad name before any request
        what = f"model {name}"
        report(Event(INSTALLING, f"Downloading {what}"))
        try:
            for line in http.stream_lines(
                self.url("/api/pull"), {"model": model, "stream": True}, timeout=60
            ):
                if "error" in line:
                    raise _pull_error(model, str(line["error"]))
                status = str(line.get("status", ""))
                digest = line.get("digest")
                if digest and "total" in line:
                    short = str(digest).removeprefix("sha256:")[:12]
                    report(
                        Event(
                            INSTALLING,
                            f"Downloading {what}: layer {short}",
                            key=str(digest),
                            done=int(line.get("completed") or 0),
                            total=int(line["total"]),
                        )
                    )
                elif status and status != "success":
                    report(Event(INSTALLING, f"{what}: {status}"))
        except urllib.error.HTTPError as e:
            raise _pull_error(model, http.error_body(e) or f"HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            if http.is_unreachable(e) and not self.healthy():
                raise not_running_error() from None
            raise StigmerError(
                f"Pulling {model} failed: {http.describe(e)}.",
                code=ErrorCode.PULL_FAILED,
                hint="Run the command again; finished layers are kept.",
            ) from None
        if not self.has_model(model):
            raise StigmerError(
                f"Pulling {model} ended but the model is not available.",
                code=ErrorCode.PULL_FAILED,
                hint="Run the command again.",
            )

    def remove(self, model: str) -> None:
        parse_model_name(model)
        try:
            with http.request(self.url("/api/delete"), method="DELETE", body={"model": model}, timeout=30):
                pass
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise StigmerError(
                    f"Model {model} is not installed.",
                    code=ErrorCode.MODEL_NOT_FOUND,
                    hint="See installed models: stigmer server llm list",
                ) from None
            raise StigmerError(
                f"Removing {model} failed: {http.error_body(e)}", code=ErrorCode.LLM_REQUEST_FAILED
            ) from None
        except (urllib.error.URLError, OSError):
            raise not_running_error() from None

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> LlmStatus:
        rec = self.managed_record()
        model = self.model
        try:
            running = self.is_running()
        except StigmerError:
            running = False
        available: list[str] = []
        notes: list[str] = []
        runs_on = ""
        if self.default_reason:
            notes.append(chosen_note(self.default_reason))
        if running:
            try:
                available = [m.name for m in self.list_models()]
            except StigmerError:
                pass
            entry = next((m for m in self.loaded() if same_model(str(m.get("name", "")), model)), None)
            if entry is not None:
                runs_on, sentence = placement(entry)
                if sentence:
                    notes.append(sentence)
        return LlmStatus(
            provider=self.name,
            label=self.label,
            running=running,
            pid=rec.pid if rec and running else None,
            managed=rec is not None,
            model=model,
            model_available=any(same_model(a, model) for a in available),
            available=available,
            base_url=self.base_url,
            notes=notes,
            runs_on=runs_on,
            expected_tokens_per_second=self.expected_speed,
        )


def _server(header: str | None) -> str:
    return f", server {header!r}" if header else ""


def _pull_error(model: str, error: str) -> StigmerError:
    if "file does not exist" in error or "not found" in error:
        return StigmerError(
            f"Model {model} was not found in the model registry.",
            code=ErrorCode.MODEL_NOT_FOUND,
            hint="Check the name and tag (for example qwen2.5-coder:7b).",
        )
    if "invalid model name" in error:
        return StigmerError(
            f"Invalid model name {model!r}.",
            code=ErrorCode.INVALID_MODEL_NAME,
            hint="Model names look like qwen2.5-coder:7b.",
        )
    if "digest mismatch" in error:
        return StigmerError(
            f"Pulling {model} failed: the download did not match its checksum ({error}).",
            code=ErrorCode.CHECKSUM_MISMATCH,
            hint="The corrupt data was discarded; run the command again.",
        )
    return StigmerError(
        f"Pulling {model} failed: {error}.",
        code=ErrorCode.PULL_FAILED,
        hint="Run the command again; finished layers are kept.",
    )

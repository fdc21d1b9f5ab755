"""Will a model fit this machine? Decided before any download, from the model's GGUF header (the local
file, else its first MB read from the registry or Hugging Face) and the hardware report.

Memory: hw.fit's estimate (weights + KV cache at the context that will be used + overhead) against RAM
(and, for the Local LLM runtime, the best GPU's memory; the built-in engine runs on the CPU in this
build). Disk: the download against the free space where it goes. A model that does not fit is refused
with both numbers and the way out (a smaller model, or --force); --force downloads it anyway, with a
warning.

The context that counts:
  built-in engine   llm.context_size, or when it is 0 the largest context (up to the model's trained
                    maximum) whose whole estimate fits in AUTO_CONTEXT_SHARE of the available RAM,
                    never below CONTEXT_FLOOR (auto_context)
  Local LLM runtime its default context: OLLAMA_CONTEXT_LENGTH, else 4096 tokens (at most the trained one)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, NetworkUnreachable, StigmerError
from stigmer.hw.fit import FitResult, MemoryEstimate, ModelFacts, best_gpu, choose_context, estimate, fit
from stigmer.hw.report import HardwareReport
from stigmer.llm.gguf import GgufError, GgufHeader, read_header
from stigmer.llm.names import parse_model_name
from stigmer.paths import Paths
from stigmer.units import human_bytes

log = logging.getLogger(__name__)

OLLAMA_CONTEXT = 4096  # the runtime's default num_ctx
CONTEXT_FLOOR = 2048  # below this an agent's system prompt and tool list hardly fit
# The built-in engine may plan on this share of the available RAM: the rest is for the agents, Temporal
# and the desktop. It stays under the engine's own start-up check (90 %), which would refuse more.
AUTO_CONTEXT_SHARE = 0.8
ENGINE = "llamacpp"


@dataclass(frozen=True)
class Assessment:
    """What `stigmer server llm show` prints, and what the fit check decides on."""

    model: str
    provider: str
    downloaded: bool
    origin: str  # the file, or where its header was read
    file_size: int
    download_size: int  # 0 when it is already here
    architecture: str
    quantization: str
    parameters: int
    layers: int
    trained_context: int
    context: int
    context_auto: bool  # chosen for this machine (llm.context_size 0 with the built-in engine)
    context_note: str  # why the chosen context is not the model's maximum
    estimate: MemoryEstimate
    fit: FitResult
    ram_available: int
    gpu_budget: int  # bytes usable on the GPU that takes the model (0: none, or the built-in engine)
    gpu_name: str  # that GPU
    models_dir: str  # where a download goes (its free space is what the disk check counts)
    disk_free: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": self.provider,
            "downloaded": self.downloaded,
            "origin": self.origin,
            "file_size": self.file_size,
            "download_size": self.download_size,
            "architecture": self.architecture,
            "quantization": self.quantization,
            "parameters": self.parameters,
            "layers": self.layers,
            "trained_context": self.trained_context,
            "context": {"size": self.context, "auto": self.context_auto, "note": self.context_note},
            "estimate": {
                "n_ctx": self.estimate.n_ctx,
                "weights": self.estimate.weights,
                "kv_cache": self.estimate.kv_cache,
                "overhead": self.estimate.overhead,
                "total": self.estimate.total,
            },
            "fit": {
                "kind": self.fit.kind,
                "reason": self.fit.reason,
                "gpu": self.fit.gpu.name if self.fit.gpu else None,
                "disk_ok": self.fit.disk_ok,
                "disk_reason": self.fit.disk_reason,
            },
            "machine": {
                "ram_available": self.ram_available,
                "gpu_budget": self.gpu_budget,
                "gpu": self.gpu_name,
                "models_dir": self.models_dir,
                "disk_free": self.disk_free,
            },
        }


# -- the machine -----------------------------------------------------------------------------------------
def machine(folder: Path) -> HardwareReport:
    """This machine's report, with the free space of `folder`'s disk."""
    from stigmer.hw import report

    return report.detect(folder)


def download_folder(provider: str, model: str, paths: Paths) -> Path:
    """Where a pull of `model` writes: the built-in engine's store (Hugging Face files: the HF cache),
    or the runtime's model store (OLLAMA_MODELS, else ~/.ollama/models)."""
    from stigmer.llm.models import sources

    if provider != ENGINE:
        return sources.ollama_store_dirs()[0]
    if parse_model_name(model).is_huggingface:
        from stigmer.llm.models.hf_cache import cache_dir

        return cache_dir()
    return paths.models_dir


def for_engine(provider: str, hardware: HardwareReport) -> HardwareReport:
    """The machine as the provider can use it: the built-in engine is built for the CPU only."""
    return replace(hardware, gpus=[]) if provider == ENGINE else hardware


# -- the context ---------------------------------------------------------------------------------------
def auto_context(model: GgufHeader | ModelFacts, ram_available: int) -> tuple[int, str]:
    """The built-in engine's context when llm.context_size is 0, and a note when it is not the model's
    maximum (memory-limited, or below the floor)."""
    return choose_context(model, int(ram_available * AUTO_CONTEXT_SHARE), floor=CONTEXT_FLOOR)


def auto_context_for_file(path: Path, ram_available: int | None = None) -> tuple[int, str]:
    """auto_context for a model file with the RAM available now; the trained-context fallback of hw.fit
    (4096) when the header cannot be read (the engine then reports what is wrong with the file)."""
    from stigmer.hw.fit import UNKNOWN_CONTEXT

    try:
        header = read_header(path)
    except (GgufError, OSError) as e:
        return UNKNOWN_CONTEXT, f"the model's header could not be read ({e}); using {UNKNOWN_CONTEXT} tokens"
    if ram_available is None:
        import platform

        from stigmer.hw.memory import detect_memory

        ram_available = detect_memory(system=platform.system())[1]
    return auto_context(header, ram_available)


def runtime_context(trained: int, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get("OLLAMA_CONTEXT_LENGTH", "").strip()
    n = int(raw) if raw.isdigit() and int(raw) > 0 else OLLAMA_CONTEXT
    return min(n, trained) if trained else n


# -- the assessment ------------------------------------------------------------------------------------
def assess(
    model: str,
    header: GgufHeader,
    *,
    provider: str,
    settings: Settings,
    hardware: HardwareReport,
    file_size: int,
    download_size: int,
    origin: str,
    downloaded: bool,
) -> Assessment:
    facts = ModelFacts.from_header(header, file_size=file_size)
    usable = for_engine(provider, hardware)
    auto, note = False, ""
    if provider == ENGINE:
        n_ctx = settings.llm.context_size
        if not n_ctx:
            n_ctx, note = auto_context(facts, hardware.ram_available)
            auto = True
    else:
        n_ctx = runtime_context(facts.context_length)
    need = estimate(facts, n_ctx)
    verdict = fit(need, usable, free_disk_needed=download_size)
    gpu, budget = best_gpu(usable)
    return Assessment(
        model=model,
        provider=provider,
        downloaded=downloaded,
        origin=origin,
        file_size=file_size,
        download_size=download_size,
        architecture=header.architecture or "unknown",
        quantization=header.quantization,
        parameters=header.parameter_count,
        layers=facts.n_layers,
        trained_context=facts.context_length,
        context=n_ctx,
        context_auto=auto,
        context_note=note,
        estimate=need,
        fit=verdict,
        ram_available=hardware.ram_available,
        gpu_budget=budget,
        gpu_name=gpu.name if gpu else "",
        models_dir=str(hardware.models_dir),
        disk_free=hardware.disk_free,
    )


def local_file(provider: str, model: str, paths: Paths) -> Path | None:
    """The GGUF file of `model` when it is already on this machine (for the runtime: in its store)."""
    from stigmer.llm.models import sources

    if provider == ENGINE:
        found = sources.local_model(paths, model)
        return Path(found.path) if found is not None else None
    held = sources.find_in_ollama_store(parse_model_name(model))
    return held.blob if held is not None else None


def describe(
    model: str,
    *,
    provider: str,
    settings: Settings,
    paths: Paths,
    hardware: HardwareReport | None = None,
    look_locally: bool = True,
) -> Assessment:
    """The assessment of `model` for `provider`: read from its file when it is here (unless not
    `look_locally`), else from the first bytes of the file on the registry or Hugging Face (network
    errors are raised)."""
    path = local_file(provider, model, paths) if look_locally else None
    if path is not None:
        try:
            header = read_header(path)
        except GgufError as e:
            raise StigmerError(
                f"Model {model} ({path}) is not a GGUF file the engines can read: {e}.",
                hint=f"Remove it (stigmer server llm rm {model}) and pull it again.",
                code=ErrorCode.INVALID_MODEL_FILE,
            ) from None
        hw = hardware or machine(path.parent)
        return assess(
            model,
            header,
            provider=provider,
            settings=settings,
            hardware=hw,
            file_size=path.stat().st_size,
            download_size=0,
            origin=str(path),
            downloaded=True,
        )
    from stigmer.llm.models.remote_header import remote_model

    remote = remote_model(parse_model_name(model), settings.llm.registry_url)
    hw = hardware or machine(download_folder(provider, model, paths))
    return assess(
        model,
        remote.header,
        provider=provider,
        settings=settings,
        hardware=hw,
        file_size=remote.file_size,
        download_size=remote.download_size,
        origin=remote.origin,
        downloaded=False,
    )


# -- the decision --------------------------------------------------------------------------------------
def memory_sentence(a: Assessment) -> str:
    e = a.estimate
    where = f"{human_bytes(a.ram_available)} of RAM is available"
    if a.gpu_budget:
        where += f" and {human_bytes(a.gpu_budget)} is usable on {a.gpu_name}"
    elif a.provider == ENGINE:
        where += " (the built-in engine runs on the CPU)"
    return (
        f"it needs about {human_bytes(e.total)} of memory ({human_bytes(e.weights)} weights, "
        f"{human_bytes(e.kv_cache)} KV cache for {e.n_ctx} tokens, {human_bytes(e.overhead)} runtime), "
        f"and {where}"
    )


def refusal(
    a: Assessment, *, force_command: str, hardware: HardwareReport | None = None
) -> StigmerError | None:
    """The error for a model that does not fit (memory, disk or both), else None."""
    too_big = a.fit.kind == "does_not_fit"
    if not too_big and a.fit.disk_ok:
        return None
    reasons = []
    if too_big:
        reasons.append(memory_sentence(a))
    if not a.fit.disk_ok:
        reasons.append(
            f"its download takes {human_bytes(a.download_size)} of disk and "
            f"{human_bytes(a.disk_free)} is free in {a.models_dir}"
        )
    ways = []
    if too_big:
        smaller = _smaller_model(a, hardware)
        ways.append(
            "Choose a smaller model"
            + (f" (this machine suits {smaller})" if smaller else "")
            + ", or a lower llm.context_size; see what a model needs with: stigmer server llm show MODEL"
        )
    if not a.fit.disk_ok:
        ways.append(f"Free some space in {a.models_dir}, or move the models to a bigger disk.")
    ways.append(f"To download it anyway: {force_command}")
    return StigmerError(
        f"Model {a.model} does not fit this machine: " + "; ".join(reasons) + ".",
        hint="\n".join(ways),
        code=ErrorCode.MODEL_TOO_LARGE if too_big else ErrorCode.DISK_FULL,
    )


def _smaller_model(a: Assessment, hardware: HardwareReport | None) -> str:
    if hardware is None or a.provider == ENGINE:
        return ""
    from stigmer.hw.fit import default_model
    from stigmer.llm.names import same_model

    name = default_model(hardware).model
    return "" if same_model(name, a.model) else name


def before_download(
    model: str,
    *,
    provider: str,
    settings: Settings,
    paths: Paths,
    force: bool,
    force_command: str,
    hardware: HardwareReport | None = None,
    look_locally: bool = True,
) -> list[str]:
    """Check that `model` fits before it is downloaded: raise when it does not (unless `force`), and
    return the notices to show (a forced misfit; a check that could not be made, which never blocks:
    the download says itself what is wrong with the network or the name)."""
    hw = hardware or machine(download_folder(provider, model, paths))
    try:
        found = describe(
            model, provider=provider, settings=settings, paths=paths, hardware=hw, look_locally=look_locally
        )
    except StigmerError as e:
        network = isinstance(e, NetworkUnreachable)
        if (
            not network
            and provider == ENGINE
            and e.code in (ErrorCode.MODEL_NOT_FOUND, ErrorCode.ACCESS_DENIED)
        ):
            raise  # the pull would stop at the same answer: say it now
        log.info("fit check of %s skipped: %s", model, e.message)
        return [f"The fit check of {model} was skipped: {e.message[:1].lower()}{e.message[1:]}"]
    error = refusal(found, force_command=force_command, hardware=hw)
    if error is None:
        log.info("fit check of %s: %s", model, found.fit.reason)
        return []
    if not force:
        raise error
    return [f"{error.message} Downloading it anyway (--force)."]

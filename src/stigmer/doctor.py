"""`stigmer doctor`: one honest report of this machine and of what Stigmer runs on it, and each problem
found with the command that fixes it.

Everything is read, nothing is changed: the hardware report (hw.report.detect), the settings, the
daemon's status (control.fetch_status, when it runs), the LLM's status, the runtime (which program, which
version, where it came from), whether the loaded model runs on the GPU (the runtime's /api/ps: size_vram
against size; the built-in engine runs on the CPU in this build), the models folder and its free space.

A problem is something to fix (exit code DOCTOR_PROBLEMS); a note is worth knowing but needs nothing
(a server not started yet, a model not downloaded yet, a machine below the recommended RAM).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stigmer.hw.report import GpuInfo, HardwareReport
from stigmer.paths import Paths
from stigmer.units import human_bytes

log = logging.getLogger(__name__)

MIN_FREE_DISK = 2 * 1000**3  # below this a model download is likely to fail


@dataclass(frozen=True)
class Problem:
    message: str
    fix: str  # the command (or the step) that fixes it

    def to_dict(self) -> dict[str, str]:
        return {"message": self.message, "fix": self.fix}


@dataclass
class Report:
    hardware: HardwareReport
    provider: str
    provider_label: str
    config: dict[str, Any]
    runtime: dict[str, Any]
    llm: dict[str, Any]
    server: dict[str, Any]
    services: dict[str, str]
    addresses: dict[str, str]
    models: dict[str, Any]
    isolation: dict[str, Any] = field(default_factory=dict)  # probe.Isolation.to_dict() (+ require_sandbox)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "hardware": self.hardware.to_dict(),
            "provider": {"name": self.provider, "label": self.provider_label},
            "config": self.config,
            "runtime": self.runtime,
            "llm": self.llm,
            "server": self.server,
            "services": self.services,
            "addresses": self.addresses,
            "models": self.models,
            "isolation": self.isolation,
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
        }


def diagnose(paths: Paths) -> Report:
    from stigmer.config import store
    from stigmer.errors import StigmerError
    from stigmer.llm import active
    from stigmer.llm.models.fit_check import download_folder, machine
    from stigmer.llm.status import LlmStatus
    from stigmer.server import control

    problems: list[Problem] = []
    notes: list[str] = []
    try:
        settings = store.load(paths)
        config = {"file": str(paths.config_file), "exists": settings.file_exists, "valid": True}
    except StigmerError as e:
        problems.append(Problem(e.message, e.hint))
        settings = store.defaults(paths)
        config = {"file": str(paths.config_file), "exists": paths.config_file.exists(), "valid": False}

    folder = download_folder(settings.llm.provider, settings.llm.model, paths)
    hardware = machine(folder)
    for text in hardware.problems:
        (notes.append(text) if "limited to" in text else problems.append(Problem(text, _hw_fix(text))))

    try:
        daemon = control.fetch_status(paths)
    except StigmerError as e:
        problems.append(Problem(f"The Stigmer server's API could not be asked: {e.message}", e.hint))
        daemon = None
    provider = active.provider(settings, paths)
    st = (
        LlmStatus.from_dict(daemon["llm"])
        if daemon and isinstance(daemon.get("llm"), dict)
        else provider.status()
    )

    server, services = _server(daemon, settings.server.port, problems, notes)
    runtime = _runtime(provider.name, paths, st)
    llm = _llm(provider, st, problems, notes)
    _gpu_use(provider.name, st, hardware, paths, llm, problems, notes)
    _model_fit(provider.name, st, settings, paths, hardware, problems, notes)
    models = {"dir": str(folder), "free": hardware.disk_free}
    isolation = isolation_check(settings.tools.require_sandbox, problems, notes)
    if hardware.disk_free < MIN_FREE_DISK and provider.name in ("ollama", "llamacpp"):
        problems.append(
            Problem(
                f"Only {human_bytes(hardware.disk_free)} is free on the disk of the models folder {folder}.",
                "Free some space there, or keep the models on a bigger disk (OLLAMA_MODELS for the Local "
                "LLM runtime, STIGMER_HOME for the built-in engine).",
            )
        )
    if settings.llm.is_local:
        from stigmer.hw.fit import requirements_warning

        warning = requirements_warning(hardware.ram_total)
        if warning:
            notes.append(warning)
        from stigmer.llm.models import updates

        if updates.offered(paths, provider.name, st.model):
            notes.append(updates.notice(st.model))
    return Report(
        hardware=hardware,
        provider=provider.name,
        provider_label=provider.label,
        config=config,
        runtime=runtime,
        llm=llm,
        server=server,
        services=services,
        addresses=_addresses(settings, provider.name, st.base_url),
        models=models,
        isolation=isolation,
        problems=problems,
        notes=notes,
    )


def isolation_check(
    require: bool, problems: list[Problem], notes: list[str], iso: Any = None
) -> dict[str, Any]:
    """The OS isolation tools get here (sandbox.probe). Weaker than full: a note with the fix; no
    Landlock (tools' files not confined) is a problem only with tools.require_sandbox, as tools do not
    run then. `iso` stands in for this machine's probe in tests."""
    from stigmer.sandbox import probe

    if iso is None:
        iso = probe.probe()
    fix = "; ".join(iso.fixes)
    if not iso.files_confined and require:
        problems.append(
            Problem(
                f"Tools will not run: the operating system cannot confine them here ({iso.summary()}) "
                "and tools.require_sandbox is true.",
                fix or "stigmer config set tools.require_sandbox false",
            )
        )
    elif iso.level != probe.FULL:
        notes.append(
            f"Tools' OS sandbox is {iso.level} here ({iso.summary()})" + (f"; fix: {fix}" if fix else "")
        )
    return {**iso.to_dict(), "require_sandbox": require}


def _hw_fix(text: str) -> str:
    """The advice detection put after the fact ("...: install the NVIDIA driver"), as the fix."""
    for sep in ("; ", ": "):
        if sep in text:
            return text.rsplit(sep, 1)[1]
    return "See the hardware section above."


def _server(
    daemon: dict[str, Any] | None, port: int, problems: list[Problem], notes: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    if daemon is None or not daemon.get("running"):
        notes.append("The Stigmer server is not running; start it with: stigmer server")
        return {"running": False, "phase": "stopped", "pid": None, "api": f"127.0.0.1:{port}"}, {}
    phase = str(daemon.get("phase", ""))
    if phase == "failed":
        problems.append(
            Problem(
                "The Stigmer server failed to start.",
                "stigmer server logs -c daemon; then: stigmer server restart",
            )
        )
    services: dict[str, str] = {}
    for name, svc in (daemon.get("services") or {}).items():
        state = str(svc.get("state", ""))
        services[name] = state
        if state == "failed":
            why = svc.get("last_failure") or "it keeps failing"
            problems.append(
                Problem(
                    f"The {name} service failed: {why}",
                    f"stigmer server logs -c {name}; then: stigmer server restart",
                )
            )
    server = {
        "running": True,
        "phase": phase,
        "pid": daemon.get("pid"),
        "api": f"127.0.0.1:{daemon.get('port', port)}",
    }
    return server, services


def _runtime(provider: str, paths: Paths, st: Any) -> dict[str, Any]:
    """Which program serves the LLM, its version and where it came from."""
    if provider == "llamacpp":
        from importlib.metadata import PackageNotFoundError, version

        try:
            engine = version("xllamacpp")
        except PackageNotFoundError:
            engine = ""
        return {"name": "xllamacpp", "version": engine, "source": "built-in", "path": ""}
    if provider != "ollama":
        return {"name": provider, "version": "", "source": "remote", "path": st.base_url}
    from stigmer.errors import StigmerError
    from stigmer.llm.ollama import install

    info: dict[str, Any] = {"name": "ollama", "version": "", "source": "none", "path": "", "serving": ""}
    on_path = shutil.which("ollama")
    if on_path:
        info.update(source="path", path=on_path, version=_probe_version(on_path))
    else:
        try:
            from stigmer.llm.ollama.assets import Platform

            ours = install.installed_binary(paths, Platform.current())
        except StigmerError:
            ours = None
        if ours is not None:
            real = Path(os.path.realpath(ours))  # runtime/ollama/vX.Y.Z/bin/ollama: the version's folder
            info.update(source="stigmer", path=str(real), version=install.installed_version(paths) or "")
    if st.running:
        info["serving"] = _serving_version(st.base_url)
        if info["source"] == "none":
            info.update(source="external", version=info["serving"])  # neither ours nor on PATH
    return info


def _probe_version(binary: str) -> str:
    import re

    from stigmer.hw.run import run_probe

    try:
        _code, out, err = run_probe([binary, "--version"], 5.0)
    except (OSError, TimeoutError):
        return ""
    found = re.findall(r"\d+\.\d+\.\d+[\w.+-]*", out + "\n" + err)
    return found[-1] if found else ""


def _serving_version(base_url: str) -> str:
    from stigmer.net import http

    try:
        data = http.get_json(base_url + "/api/version", timeout=2.0)
    except (OSError, ValueError):
        return ""
    return str((data or {}).get("version", "")) if isinstance(data, dict) else ""


def _llm(provider: Any, st: Any, problems: list[Problem], notes: list[str]) -> dict[str, Any]:
    from stigmer.errors import StigmerError
    from stigmer.llm.provider import LocalRuntime

    if isinstance(provider, LocalRuntime) and not st.running:
        try:
            provider.is_running()  # raises when a stranger holds the port
        except StigmerError as e:
            problems.append(Problem(e.message, e.hint))
    if st.remote and not st.running:
        problems.append(
            Problem(
                f"The {st.label} endpoint {st.base_url} does not answer, or refuses the key"
                + (f" ({'; '.join(st.notes)})" if st.notes else "")
                + ".",
                "Check llm.api_key (or OPENAI_API_KEY / ANTHROPIC_API_KEY) and llm.base_url: stigmer config list",
            )
        )
    chosen = provider.model == st.model  # the provider's own model: its reason and speed apply
    return {
        "model": st.model,
        "model_reason": getattr(provider, "default_reason", "") if chosen else "",
        "expected_tokens_per_second": st.expected_tokens_per_second
        or (getattr(provider, "expected_speed", 0.0) if chosen else 0.0),
        "model_available": st.model_available,
        "running": st.running,
        "managed": st.managed,
        "pid": st.pid,
        "base_url": st.base_url,
        "runs_on": st.runs_on,
        "context": st.context,
        "fallback": st.fallback,
        "notes": list(st.notes),
    }


def _gpus(hardware: HardwareReport, provider: str) -> list[GpuInfo]:
    """The GPUs a runtime could use: dedicated ones, and Apple's (Metal) for the Local LLM runtime."""
    return [
        g
        for g in hardware.gpus
        if g.vendor in ("nvidia", "amd") or (g.unified_memory and provider == "ollama")
    ]


def _gpu_use(
    provider: str,
    st: Any,
    hardware: HardwareReport,
    paths: Paths,
    llm: dict[str, Any],
    problems: list[Problem],
    notes: list[str],
) -> None:
    gpus = _gpus(hardware, provider)
    llm["gpu"] = gpus[0].name if gpus else ""
    if provider == "llamacpp":
        if st.running:
            llm["runs_on"] = "cpu"
        if gpus:
            notes.append(
                f"GPU found ({gpus[0].name}) but not used because the built-in engine runs on the CPU in "
                "this build; for the GPU, use the Local LLM runtime: stigmer config set llm.provider ollama "
                "&& stigmer server restart"
            )
        return
    if provider != "ollama" or not st.running:
        return
    if not st.runs_on:
        notes.append(
            f"{st.model} is not loaded now (it loads at the first request): where it runs is not known yet."
        )
        return
    if st.runs_on == "partial":
        notes.append(
            next((n for n in st.notes if n.startswith("Runs partly")), "The model runs partly on the CPU.")
        )
    if st.runs_on != "cpu" or not gpus:
        return
    cause, fix = _why_cpu(gpus[0], st, paths)
    problems.append(Problem(f"GPU found ({gpus[0].name}) but not used because {cause}: run {fix}", fix))


def _why_cpu(gpu: GpuInfo, st: Any, paths: Paths) -> tuple[str, str]:
    """Why the runtime put the model on the CPU although a GPU is there, and the fix."""
    from stigmer.llm.ollama import install
    from stigmer.net.addresses import host_port

    restart = "stigmer server restart" if st.managed else f"restart the Local LLM runtime at {st.base_url}"
    env = _process_env(st.pid if st.managed else _listener(host_port(st.base_url)[1]))
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        if var in env and env[var].strip() in ("", "-1"):
            fix = (
                f"unset {var} && {restart}"
                if st.managed
                else f"unset {var} where it is started, then {restart}"
            )
            return f"{var}={env[var]!r} hides it from the Local LLM", fix
    lib = install.runtime_root(paths) / "current" / "lib" / "ollama"
    if st.managed and lib.is_dir():
        if gpu.vendor == "nvidia" and not any(lib.glob("cuda_*")):
            return "the installed runtime has no CUDA libraries", "stigmer server llm upgrade-runtime"
        if gpu.vendor == "amd" and not any(lib.glob("rocm*")):
            return (
                "the runtime's ROCm add-on (for AMD GPUs) is not installed",
                "install the Local LLM runtime from https://ollama.com/download (a runtime on PATH is used "
                "first), then: stigmer server restart",
            )
    if not st.managed:
        return (
            f"the Local LLM (not started by Stigmer) runs {st.model} on the CPU; its own log says why",
            restart,
        )
    return (
        f"the Local LLM runs {st.model} on the CPU (its GPU discovery is in: stigmer server logs -c llm)",
        restart,
    )


def _listener(port: int) -> int | None:
    """The process listening on a local TCP port, when this user may see it (else None)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    except (psutil.Error, OSError):
        pass
    return None


def _process_env(pid: int | None) -> dict[str, str]:
    """The environment a process runs with (what decides which GPUs it may see)."""
    import psutil

    if pid is None:
        return {}
    try:
        return dict(psutil.Process(pid).environ())
    except (psutil.Error, OSError):
        return {}


def _model_fit(
    provider: str,
    st: Any,
    settings: Any,
    paths: Paths,
    hardware: HardwareReport,
    problems: list[Problem],
    notes: list[str],
) -> None:
    """A downloaded model that does not fit is a problem; one not downloaded yet, a note."""
    model = st.model
    if provider not in ("ollama", "llamacpp") or not model:
        return
    from stigmer.errors import StigmerError
    from stigmer.llm.gguf import GgufError, read_header
    from stigmer.llm.models import fit_check

    try:
        path = fit_check.local_file(provider, model, paths)
    except StigmerError as e:
        problems.append(Problem(e.message, e.hint))
        return
    if path is None and st.running and st.model_available:
        return  # the running server has it, in a store of its own this process cannot read
    if path is None:
        notes.append(
            f"{model} is not downloaded yet (it is at the next start); what it needs: stigmer server llm show {model}"
        )
        return
    try:
        header = read_header(path)
    except (GgufError, OSError) as e:
        problems.append(
            Problem(
                f"Model {model} ({path}) cannot be read: {e}.",
                f"stigmer server llm rm {model} && stigmer server llm pull {model}",
            )
        )
        return
    found = fit_check.assess(
        model, header, provider=provider, settings=settings, hardware=hardware,
        file_size=path.stat().st_size, download_size=0, origin=str(path), downloaded=True,
    )  # fmt: skip
    if found.fit.kind == "cpu":
        _slow_on_cpu(provider, model, path.stat().st_size, hardware, notes)
    if found.fit.kind == "does_not_fit":
        from stigmer.hw.fit import default_model

        smaller = default_model(hardware).model if provider == "ollama" else "SMALLER"
        problems.append(
            Problem(
                f"Model {model} does not fit this machine: {fit_check.memory_sentence(found)}.",
                f"stigmer config set llm.model {smaller} && stigmer server restart",
            )
        )


def _slow_on_cpu(provider: str, model: str, size: int, hardware: HardwareReport, notes: list[str]) -> None:
    """A note when a model on the CPU is expected to generate below a usable speed (hw.speed)."""
    from stigmer.hw import speed
    from stigmer.hw.fit import USABLE_TOKENS_PER_SECOND, default_model
    from stigmer.llm.names import same_model

    tps = speed.tokens_per_second(size, speed.cpu_bandwidth(hardware.cpu))
    if tps >= USABLE_TOKENS_PER_SECOND:
        return
    cores = hardware.cpu.physical_cores
    note = (
        f"{model} ({human_bytes(size)}) should generate only {speed.shown(tps)} tokens/s here, on "
        f"{cores} CPU core{'s' if cores != 1 else ''}: below the {USABLE_TOKENS_PER_SECOND:.0f} that keep up "
        "with a reader."
    )
    if provider == "ollama":
        faster = default_model(hardware)
        if not same_model(faster.model, model):
            note += (
                f" {faster.model} runs at {speed.shown(faster.tokens_per_second)} tokens/s here: "
                f"stigmer config set llm.model {faster.model}"
            )
    notes.append(note)


def _addresses(settings: Any, provider: str, base_url: str) -> dict[str, str]:
    from stigmer.net.addresses import host_port

    out: dict[str, str] = {}
    if provider in ("ollama", "llamacpp"):
        host, port = host_port(base_url)
        out["llm"] = f"{host}:{port}"
    else:
        out["llm"] = base_url
    out["api"] = f"127.0.0.1:{settings.server.port}"
    managed = "managed" if settings.temporal.managed else "external"
    out["temporal"] = f"{settings.temporal.address} ({managed})"
    if settings.temporal.managed and settings.temporal.ui_port:
        out["temporal_ui"] = f"127.0.0.1:{settings.temporal.ui_port}"
    return out

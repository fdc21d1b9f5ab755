"""`stigmer server llm list|pull|rm|status|import|show|update|upgrade-runtime`.

Imports are made where they are used: `status` has a 100 ms budget, and with nothing running it answers
from a few files (llm.quick_status) without the settings schema, the providers or an HTTP client.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from stigmer.cli.render import Out

if TYPE_CHECKING:
    from stigmer.config.store import Settings
    from stigmer.llm.models.fit_check import Assessment
    from stigmer.llm.provider import ModelCatalog, Provider
    from stigmer.paths import Paths


def _catalog(provider: Provider, what: str) -> ModelCatalog:
    from stigmer.llm.catalog_ops import catalog

    return catalog(provider, what)


def status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from stigmer.llm.status import LlmStatus
    from stigmer.paths import Paths

    paths = Paths.from_env()
    daemon = None
    if _server_may_run(paths):
        from stigmer.server import control

        daemon = control.fetch_status(paths)  # the running server knows: no config to read
    if daemon is not None and isinstance(daemon.get("llm"), dict):
        st = LlmStatus.from_dict(daemon["llm"])
    else:
        from stigmer.llm.quick_status import quick_status

        quick = quick_status(paths)  # nothing runs: a few files say it all
        if quick is None:
            from stigmer.cli.common import context
            from stigmer.llm import active

            paths, settings = context()
            quick = active.status(settings, paths)
        st = quick
    out = Out()
    if args.json:
        out.json(asdict(st))
    else:
        out.llm_block(st)
    return 0


def _server_may_run(paths: Paths) -> bool:
    """A pid record of the daemon or of any service is there (run/*.pid, or the LLM's from before the
    service layer). Records are removed when what they name stops, so without one control.fetch_status
    has nothing to find (no daemon to ask, no record of it or of a service left running) and its
    imports (the HTTP client, psutil) are not worth paying; a stale record only means asking it."""
    try:
        return any(paths.run_dir.glob("*.pid")) or paths.legacy_llm_pid.exists()
    except OSError:
        return True


def list_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from stigmer.cli.common import context
    from stigmer.llm import active
    from stigmer.llm.names import same_model

    paths, settings = context()
    provider = active.provider(settings, paths)
    models = _catalog(provider, "list").list_models()
    out = Out()
    if args.json:
        out.json([{**asdict(m), "current": same_model(m.name, provider.model)} for m in models])
    else:
        out.model_list(models, provider.model, same_model)
    return 0


def pull(args: argparse.Namespace) -> int:
    from stigmer.cli.common import context
    from stigmer.cli.render import Progress
    from stigmer.llm import active
    from stigmer.llm.names import parse_model_name, same_model

    name = parse_model_name(args.model)  # refuse a bad name before anything else
    paths, settings = context()
    out = Out()
    provider = active.provider(settings, paths)
    catalog = _catalog(provider, "pull")
    _fit_before_download(
        out, provider, args.model, force=args.force, command=f"stigmer server llm pull {args.model} --force"
    )
    out.note(f"Pulling model {name}...")
    out.note("This may take several minutes depending on model size")
    out.note()
    with Progress(out) as progress:
        catalog.pull(args.model, progress)
    out.success(f"Model {args.model} is ready")
    if not same_model(args.model, provider.model):
        out.line()
        out.line("To use this model, update your configuration:")
        out.line(f"  stigmer config set llm.model {args.model}")
    return 0


def remove(args: argparse.Namespace) -> int:
    from stigmer.cli.common import context
    from stigmer.llm import active
    from stigmer.llm.names import parse_model_name

    parse_model_name(args.model)
    paths, settings = context()
    _catalog(active.provider(settings, paths), "remove").remove(args.model)
    Out().success(f"Model {args.model} removed")
    return 0


def import_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stigmer.cli.common import context
    from stigmer.cli.render import Progress
    from stigmer.llm.models.sources import import_file
    from stigmer.llm.names import parse_model_name, same_model

    parse_model_name(args.name)
    paths, settings = context()
    out = Out()
    src = Path(args.path).expanduser()
    with Progress(out) as progress:
        model = import_file(paths, src, args.name, progress)
    out.success(f"Imported {src} as {model.name}")
    if settings.llm.provider != "llamacpp":
        out.info(
            "Imported models are served by the built-in engine: stigmer config set llm.provider llamacpp"
        )
    if not same_model(model.name, settings.llm.model):
        out.line("To use this model, update your configuration:")
        out.line(f"  stigmer config set llm.model {model.name}")
    return 0


def _fit_before_download(out: Out, provider: Provider, model: str, *, force: bool, command: str) -> None:
    """The fit check of a model about to be downloaded (refused when it does not fit, unless --force)."""
    from stigmer.llm.catalog_ops import fit_before_download

    for notice in fit_before_download(provider, model, force=force, command=command):
        out.warn(notice)


def _local_provider(settings: Settings, paths: Paths, what: str) -> Provider:
    from stigmer.errors import ErrorCode, StigmerError
    from stigmer.llm import active
    from stigmer.llm.provider import LocalRuntime

    provider = active.provider(settings, paths)
    if not isinstance(provider, LocalRuntime):
        raise StigmerError(
            f"The {provider.label} provider runs elsewhere: there is no local model to {what}.",
            hint="Local providers (ollama, llamacpp) run models here: stigmer config set llm.provider ollama",
            code=ErrorCode.UNSUPPORTED,
        )
    return provider


def show(args: argparse.Namespace) -> int:
    from stigmer.cli.common import context
    from stigmer.llm.models.fit_check import describe
    from stigmer.llm.names import parse_model_name

    paths, settings = context()
    provider = _local_provider(settings, paths, "show")
    model = args.model or provider.model
    parse_model_name(model)
    out = Out()
    if not args.json:
        out.note(f"Reading the header of {model}...")
    found = describe(model, provider=provider.name, settings=settings, paths=paths)
    if args.json:
        out.json(found.to_dict())
    else:
        render_assessment(out, found)
    return 0


FITS = {
    "gpu": "yes, on the GPU",
    "partial": "yes, split between the GPU and the CPU (slower)",
    "cpu": "yes, on the CPU",
    "does_not_fit": "no: it does not fit",
}


def render_assessment(out: Out, a: Assessment) -> None:
    from stigmer.units import human_bytes

    e = a.estimate
    out.line(f"Model:           {a.model}")
    if a.downloaded:
        out.line(f"File:            {a.origin} ({human_bytes(a.file_size)})")
    else:
        out.line(f"From:            {a.origin}")
        out.line(f"Download:        {human_bytes(a.download_size)} (not downloaded yet)")
    out.line(f"Architecture:    {a.architecture}")
    out.line(f"Quantization:    {a.quantization}")
    out.line(f"Parameters:      {_count(a.parameters)}")
    out.line(f"Layers:          {a.layers}")
    out.line(f"Trained context: {a.trained_context or 'unknown'} tokens")
    if a.context_auto:
        why = "chosen for this machine, as llm.context_size is 0"
    elif a.provider == "llamacpp":
        why = "llm.context_size"
    else:
        why = "the Local LLM's default"
    out.line(f"Context:         {a.context} tokens ({why})")
    if a.context_note:
        out.line(f"                 {a.context_note}")
    out.line(f"Memory at {a.context} tokens:")
    out.line(f"  Weights:       {human_bytes(e.weights)}")
    out.line(f"  KV cache:      {human_bytes(e.kv_cache)}")
    out.line(f"  Overhead:      {human_bytes(e.overhead)}")
    out.line(f"  Total:         {human_bytes(e.total)}")
    out.line(f"Fits:            {FITS.get(a.fit.kind, a.fit.kind)}")
    out.line(f"                 {a.fit.reason}")
    if not a.downloaded:
        disk = a.fit.disk_reason or (
            f"{human_bytes(a.download_size)} to download, {human_bytes(a.disk_free)} free in {a.models_dir}"
        )
        out.line(f"Disk:            {'ok' if a.fit.disk_ok else 'not enough'}: {disk}")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit} ({n:,})"
    return str(n)


def update(args: argparse.Namespace) -> int:
    from stigmer.cli.common import context
    from stigmer.cli.render import Progress
    from stigmer.llm.models.updates import update_model
    from stigmer.llm.names import parse_model_name, same_model
    from stigmer.llm.provider import LocalRuntime

    paths, settings = context()
    provider = _local_provider(settings, paths, "update")
    model = args.model or provider.model
    parse_model_name(model)
    out = Out()
    out.note(f"Looking for a newer version of {model}...")
    with Progress(out) as progress:
        result = update_model(
            settings,
            paths,
            provider=provider.name,
            model=model,
            base_url=provider.base_url,
            report=progress,
            force=args.force,
        )
    if not result.updated:
        out.info(result.message, err=False)
        return 0
    out.success(result.message)
    if same_model(model, provider.model) and isinstance(provider, LocalRuntime) and provider.is_running():
        out.line("The Local LLM serves the new version after a restart: stigmer server restart")
    return 0


def upgrade_runtime(args: argparse.Namespace) -> int:
    from stigmer.cli.common import context
    from stigmer.cli.render import Progress
    from stigmer.llm.ollama.upgrade import upgrade_runtime as upgrade

    paths, settings = context()
    out = Out()
    with Progress(out) as progress:
        result = upgrade(
            settings,
            paths,
            progress,
            version=args.version,
            on_wait=lambda: out.info(
                "Another stigmer command is starting or stopping the server; waiting..."
            ),
        )
    if result.outcome == "current":
        out.info(result.message, err=False)
        return 0
    out.success(result.message)
    if result.restarted:
        out.line(f"  The Local LLM was restarted on {result.version} and passed its health check.")
    else:
        out.line(f"  {result.version} passed its health check; the Local LLM uses it from its next start.")
    if result.removed:
        out.line(f"  Removed the previous version ({result.removed}).")
    return 0

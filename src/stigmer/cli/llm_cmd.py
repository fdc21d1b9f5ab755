"""`stigmer server llm list|pull|rm|status|import` (and `server status`)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from stigmer.cli.common import context
from stigmer.cli.render import Out, Progress
from stigmer.errors import ErrorCode, StigmerError
from stigmer.llm import active
from stigmer.llm.names import parse_model_name, same_model
from stigmer.llm.provider import CATALOG, ModelCatalog, Provider


def _catalog(provider: Provider, what: str) -> ModelCatalog:
    if not isinstance(provider, ModelCatalog):
        raise StigmerError(
            f"The {provider.label} provider has no models to {what}: its models are managed by its service.",
            hint="Local providers (ollama, llamacpp) manage models: stigmer config set llm.provider ollama",
            code=ErrorCode.UNSUPPORTED,
        )
    assert CATALOG in provider.capabilities
    return provider


def status(args: argparse.Namespace) -> int:
    from stigmer.llm.provider import LlmStatus
    from stigmer.paths import Paths
    from stigmer.server import control

    daemon = control.fetch_status(Paths.from_env())  # the running server knows: no config to read
    if daemon is not None and isinstance(daemon.get("llm"), dict):
        st = LlmStatus(**daemon["llm"])
    else:
        paths, settings = context()
        st = active.status(settings, paths)
    out = Out()
    if args.json:
        out.json(asdict(st))
    else:
        out.llm_block(st)
    return 0


def list_models(args: argparse.Namespace) -> int:
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
    name = parse_model_name(args.model)  # refuse a bad name before anything else
    paths, settings = context()
    out = Out()
    provider = active.provider(settings, paths)
    catalog = _catalog(provider, "pull")
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
    parse_model_name(args.model)
    paths, settings = context()
    _catalog(active.provider(settings, paths), "remove").remove(args.model)
    Out().success(f"Model {args.model} removed")
    return 0


def import_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stigmer.llm.models.sources import import_file

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

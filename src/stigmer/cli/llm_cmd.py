"""`stigmer server llm list|pull|rm|status|import` (and `server status`)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from stigmer.cli.common import context
from stigmer.cli.render import Out, Progress
from stigmer.errors import StigmerError
from stigmer.llm import active
from stigmer.llm.names import parse_model_name, same_model


def status(args: argparse.Namespace) -> int:
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
    models = provider.list_models()
    out = Out()
    if args.json:
        out.json([{**asdict(m), "current": same_model(m.name, provider.settings.model)} for m in models])
    else:
        out.model_list(models, provider.settings.model, same_model)
    return 0


def pull(args: argparse.Namespace) -> int:
    name = parse_model_name(args.model)  # refuse a bad name before anything else
    paths, settings = context()
    out = Out()
    out.line(f"Pulling model {name}...")
    out.line("This may take several minutes depending on model size")
    out.line()
    with Progress(out) as progress:
        provider = active.provider(settings, paths, progress)
        provider.pull(args.model)
    out.success(f"Model {args.model} is ready")
    out.line()
    if not same_model(args.model, provider.settings.model):
        out.line("To use this model, update your configuration:")
        out.line(f"  stigmer config set llm.model {args.model}")
    return 0


def remove(args: argparse.Namespace) -> int:
    parse_model_name(args.model)
    paths, settings = context()
    provider = active.provider(settings, paths)
    provider.remove(args.model)
    Out().success(f"Model {args.model} removed")
    return 0


def import_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stigmer.llm.llamacpp.sources import import_file

    parse_model_name(args.name)
    paths, settings = context()
    out = Out()
    src = Path(args.path).expanduser()
    with Progress(out) as progress:
        model = import_file(paths, src, args.name, progress)
    out.success(f"Imported {src} as {model.name}")
    if settings.provider != "llamacpp":
        out.info(
            "Imported models are served by the built-in engine: stigmer config set llm.provider llamacpp"
        )
    if not same_model(model.name, settings.model):
        out.line("To use this model, update your configuration:")
        out.line(f"  stigmer config set llm.model {model.name}")
    return 0


__all__ = ["StigmerError", "import_model", "list_models", "pull", "remove", "status"]

"""`stigmer config get|set|list|path`."""

from __future__ import annotations

import argparse

from stigmer.cli.common import context
from stigmer.cli.render import Out
from stigmer.config import store
from stigmer.config.schema import KEYS
from stigmer.paths import Paths


def get(args: argparse.Namespace) -> int:
    key = store.require_key(args.key)
    _paths, settings = context()
    Out().line(store.display(key, settings.value(key.name)))
    return 0


def set_(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    key = store.require_key(args.key)
    value = store.set_value(paths, key.name, args.value)
    out = Out()
    out.success(f"Configuration updated: {key.name} = {store.display(key, value)}")
    out.info(f"Saved to: {paths.config_file}", err=False)
    import os

    if os.environ.get(key.env):
        out.warn(f"{key.env} is set in the environment and overrides this value.")
    return 0


def list_(args: argparse.Namespace) -> int:
    _paths, settings = context()
    out = Out()
    if args.json:
        out.json(
            [
                {
                    "key": k.name,
                    "value": store.plain(k, settings.value(k.name)),
                    "source": settings.source(k.name),
                    "env": k.env,
                }
                for k in KEYS
            ]
        )
        return 0
    width = max(len(k.name) for k in KEYS)
    for k in KEYS:
        shown = store.display(k, settings.value(k.name))
        out.line(f"{k.name:<{width}}  {shown}  ({settings.source(k.name)})")
    return 0


def path(_args: argparse.Namespace) -> int:
    Out().line(str(Paths.from_env().config_file))
    return 0

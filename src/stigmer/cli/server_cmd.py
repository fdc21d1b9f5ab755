"""`stigmer server`, `server stop`, `server logs`."""

from __future__ import annotations

import argparse
import time

from stigmer.cli.render import Out, Progress
from stigmer.config import store
from stigmer.errors import StigmerError
from stigmer.fsutil import tail
from stigmer.paths import Paths


def start(_args: argparse.Namespace) -> int:
    from stigmer.llm.setup import setup

    paths = Paths.from_env()
    out = Out()
    created = store.ensure_file(paths)
    settings = store.load(paths)
    if settings.get("backend.type") == "cloud":
        raise StigmerError(
            "backend.type is cloud: there is no local server to start.",
            hint="For local mode: stigmer config set backend.type local",
            code="cloud_mode",
        )
    if created:
        out.success("First-time setup: Initializing Stigmer...")
        out.info(f"Configuration written to {paths.config_file}")
    else:
        out.success("Using local LLM (no API key required)")
    out.line("  Starting Stigmer server...")
    with Progress(out) as progress:
        result = setup(settings, paths, progress)
    out.success(f"Ready! Local LLM is running ({result.seconds:.1f}s)")
    out.line()
    out.llm_block(result.status)
    return 0


def stop(_args: argparse.Namespace) -> int:
    from stigmer.llm.provider import stop_managed

    paths = Paths.from_env()
    out = Out()
    rec = stop_managed(paths)
    if rec is None:
        out.info("The Local LLM is not running (nothing that Stigmer started is running).")
    else:
        out.success(f"Local LLM stopped (PID {rec.pid})")
    return 0


def logs(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    out = Out()
    log = paths.llm_log
    if not log.exists():
        out.info(f"No log yet ({log}). Start the server with: stigmer server")
        return 0
    for line in tail(log, max(args.lines, 0)):
        out.line(line)
    if args.follow:
        with log.open("rb") as f:
            f.seek(0, 2)
            try:
                while True:
                    chunk = f.readline()
                    if chunk:
                        out.stdout.write(chunk.decode("utf-8", "replace"))
                        out.stdout.flush()
                    else:
                        time.sleep(0.2)
            except KeyboardInterrupt:
                return 0
    return 0

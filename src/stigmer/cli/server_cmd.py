"""`stigmer server`, `server stop`, `server logs`."""

from __future__ import annotations

import argparse
import time

from stigmer.cli.common import warn_notices
from stigmer.cli.render import Out, Progress
from stigmer.config import store
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths


def _waiting(out: Out) -> None:
    out.info("Another stigmer command is starting or stopping the server; waiting for it to finish...")


def start(_args: argparse.Namespace) -> int:
    from stigmer.llm.setup import setup
    from stigmer.services.lock import control_lock

    paths = Paths.from_env()
    out = Out()
    with control_lock(paths, on_wait=lambda: _waiting(out)):
        created = store.ensure_file(paths)
        settings = store.load(paths)
        warn_notices(settings)
        if settings.backend.type == "cloud":
            raise StigmerError(
                "backend.type is cloud: there is no local server to start.",
                hint="For local mode: stigmer config set backend.type local",
                code=ErrorCode.CLOUD_MODE,
            )
        if created:
            out.note(f"{out.ok()} First-time setup: Initializing Stigmer...")
            out.info(f"Configuration written to {paths.config_file}")
        else:
            out.note(f"{out.ok()} Using local LLM (no API key required)")
        out.note("  Starting Stigmer server...")
        with Progress(out) as progress:
            result = setup(settings, paths, progress)
    state = "is running" if result.started else "was already running"
    out.success(f"Ready! Local LLM {state} ({result.seconds:.1f}s)")
    out.line()
    out.llm_block(result.status)
    return 0


def stop(_args: argparse.Namespace) -> int:
    from stigmer.llm.provider import stop_llm
    from stigmer.services.lock import control_lock

    paths = Paths.from_env()
    out = Out()
    with control_lock(paths, on_wait=lambda: _waiting(out)):
        rec = stop_llm(paths)
    if rec is None:
        out.info("The Local LLM is not running (nothing that Stigmer started is running).", err=False)
    else:
        out.success(f"Local LLM stopped (PID {rec.pid})")
    return 0


def logs(args: argparse.Namespace) -> int:
    from stigmer.fsutil import tail

    paths = Paths.from_env()
    out = Out()
    log = paths.log_file("llm")
    if not log.exists():
        out.info(f"No log yet ({log}). Start the server with: stigmer server")
        return 0
    for line in tail(log, args.lines):
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

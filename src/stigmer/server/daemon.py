"""The Stigmer server daemon (`stigmer server run`): sets up the local LLM, starts Temporal, the agent
runner and the HTTP API, then watches them until SIGTERM, when it stops them all.

`stigmer server` spawns it detached (and holds the control lock for it while it starts); `stigmer server
run` runs it in the foreground, as tests, containers and service managers (systemd, launchd) want.
One daemon per STIGMER_HOME: run/daemon.lock is held for its whole life.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from stigmer.config import store
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import Event
from stigmer.llm.provider import SERVICE as LLM
from stigmer.llm.provider import LocalRuntime, Provider
from stigmer.paths import Paths
from stigmer.server import specs
from stigmer.server import state as st
from stigmer.server.state import DAEMON, daemon_record
from stigmer.server.supervisor import Managed, StartFailed, Supervisor, open_lock
from stigmer.services import record as records
from stigmer.services.spec import ServiceSpec

log = logging.getLogger("stigmer.daemon")

CHECK_INTERVAL_ENV = "STIGMER_DAEMON_CHECK_INTERVAL"  # seconds between health checks (tests lower it)


@contextmanager
def daemon_lock(paths: Paths) -> Iterator[None]:
    from stigmer.services.lock import held

    paths.ensure(paths.run_dir)
    with held(paths.run_dir / "daemon.lock") as got:
        if not got:
            rec = daemon_record(paths)
            raise StigmerError(
                "The Stigmer server is already running" + (f" (PID {rec.pid})." if rec else "."),
                hint="See it with: stigmer server status    Stop it with: stigmer server stop",
                code=ErrorCode.BUSY,
            )
        yield


# -- the services -------------------------------------------------------------------------------------------
class LlmService:
    """The local LLM as the supervisor sees it: what to (re)start comes from its pid record, which the
    `stigmer server` command rewrites when it switches model or falls back offline."""

    def __init__(self, settings: Settings, paths: Paths, provider: LocalRuntime) -> None:
        self.settings, self.paths = settings, paths
        self.info: dict[str, Any] = {
            "provider": provider.name,
            "model": provider.model,
            "base_url": provider.base_url,
            **provider.extra,
        }

    def provider(self) -> LocalRuntime:
        from stigmer.llm.provider import get_provider
        from stigmer.services.manager import Services

        rec = Services(self.paths).record(LLM)
        if rec is not None:
            self.info = dict(rec.info)
        extra = {"fallback": self.info["fallback"]} if self.info.get("fallback") else None
        p = get_provider(
            self.settings,
            self.paths,
            name=str(self.info["provider"]),
            model=str(self.info["model"]),
            base_url=str(self.info["base_url"]),
            extra=extra,
        )
        assert isinstance(p, LocalRuntime)
        return p

    def build(self) -> ServiceSpec:
        from stigmer.events import silent

        return self.provider().service_spec(silent)

    def probe(self) -> bool:
        return self.provider().healthy()


class TemporalService:
    """The managed Temporal dev server. Its database is locked (data/temporal.db.lock) by an open file the
    server process inherits: while any Temporal on that database runs, no second one can start on it,
    even after this daemon is gone (Temporal itself does not prevent it)."""

    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.settings, self.paths = settings, paths
        self.lock: IO[bytes] | None = None
        self.http_port = 0

    def build(self) -> ServiceSpec:
        from stigmer.net.addresses import free_port

        self.paths.ensure(self.paths.data_dir)
        if self.lock is not None:
            self.lock.close()  # the previous server's copy: it is gone, or we would not be starting
        self.lock = open_lock(str(self.paths.data_dir / "temporal.db.lock"))
        if self.lock is None:
            raise StigmerError(
                f"The Temporal database {self.paths.data_dir / 'temporal.db'} is in use by another process.",
                hint="Another Temporal server runs on it (started by hand, or left by an old Stigmer). "
                "Stop it, then run: stigmer server",
                code=ErrorCode.BUSY,
            )
        from stigmer.server.api.temporal_ui import free_blocked_port

        self.http_port = free_port()
        # The UI and the metrics on ports no browser connects to: neither can refuse a foreign Host.
        ui_internal = free_blocked_port() if self.settings.temporal.ui_port else 0
        spec = specs.temporal_spec(
            self.settings,
            self.paths,
            http_port=self.http_port,
            metrics_port=free_blocked_port({ui_internal}),
            ui_internal_port=ui_internal,
        )
        from dataclasses import replace

        return replace(spec, pass_fds=(self.lock.fileno(),))

    def probe(self) -> bool:
        from stigmer.services.manager import Services

        rec = Services(self.paths).record(specs.TEMPORAL)
        port = rec.info.get("http_port") if rec else None
        if not port:
            return False
        url = f"http://127.0.0.1:{port}/api/v1/namespaces/{self.settings.temporal.namespace}"
        return specs.answers_200(url)


def plan_llm(settings: Settings, paths: Paths, llm: Provider) -> Managed | st.ServiceStatus:
    """The local LLM as a service this daemon runs, or (a remote LLM, an Ollama the user runs) one it
    only reports."""
    if isinstance(llm, LocalRuntime) and llm.managed_record() is not None:
        svc = LlmService(settings, paths, llm)
        return Managed(LLM, build=svc.build, probe=svc.probe, stop_timeout=10)
    return st.ServiceStatus(LLM, state=st.EXTERNAL, address=llm.base_url)


def plan(settings: Settings, paths: Paths) -> tuple[list[Managed], dict[str, st.ServiceStatus]]:
    """The services besides the LLM that this daemon runs, and the ones it only reports (an external
    Temporal). None of them needs the LLM to start, so they start while it is set up."""
    members: list[Managed] = []
    external: dict[str, st.ServiceStatus] = {}
    if settings.temporal.managed:
        temporal = TemporalService(settings, paths)
        members.append(Managed(specs.TEMPORAL, build=temporal.build, probe=temporal.probe, stop_timeout=10))
    else:
        external[specs.TEMPORAL] = st.ServiceStatus(
            specs.TEMPORAL, state=st.EXTERNAL, address=settings.temporal.address
        )
    api = specs.api_spec(settings, paths)
    members.append(Managed(specs.API, build=lambda: specs.api_spec(settings, paths), probe=api.ready))
    stamp = specs.health_file(paths, specs.RUNNER)
    members.append(
        Managed(
            specs.RUNNER,
            build=lambda: specs.runner_spec(settings, paths),
            probe=lambda: specs.fresh(stamp),
            stop_timeout=15,  # started with Temporal, not after it: it retries its connection meanwhile
        )
    )
    return members, external


# -- the process ------------------------------------------------------------------------------------------
def run(*, under_lock: bool = False) -> int:
    """The daemon's life. `under_lock`: spawned by `stigmer server`, which holds the control lock for
    us and sets the LLM up itself (with its progress on the user's terminal) while we start the other
    services; it says `go` on our stdin when the LLM is ready, or closes it when that failed."""
    paths = Paths.from_env()
    settings = store.load(paths)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal must not end the server

    with daemon_lock(paths):
        me = records.ProcessRecord(
            os.getpid(), records.create_time(os.getpid()) or time.time(), _argv(), DAEMON,
            {"port": settings.server.port},
        )  # fmt: skip
        records.write(paths.pid_file(DAEMON), me)
        try:
            return _serve(settings, paths, stop, under_lock)
        finally:
            records.remove_if(paths.pid_file(DAEMON), me)


def _argv() -> list[str]:
    import psutil

    return psutil.Process().cmdline()


def _serve(settings: Settings, paths: Paths, stop: threading.Event, under_lock: bool) -> int:
    from stigmer.llm import active
    from stigmer.llm.provider import stop_llm
    from stigmer.llm.setup import SetupResult, setup
    from stigmer.server.keys import ensure_keys
    from stigmer.server.token import ensure_token
    from stigmer.services.lock import control_lock

    ensure_token(paths)
    ensure_keys(paths)  # before the API and the worker start: both read them
    state = st.DaemonState(
        pid=os.getpid(),
        started=time.time(),
        api_url=f"http://127.0.0.1:{settings.server.port}",
        temporal_address=settings.temporal.address,
        data_dir=str(paths.data_dir),
    )
    interval = float(os.environ.get(CHECK_INTERVAL_ENV) or 2.0)
    lock = contextlib.nullcontext() if under_lock else control_lock(paths)
    supervisor: Supervisor | None = None
    llm: SetupResult | None = None
    try:
        with lock:
            state.services[LLM] = st.ServiceStatus(LLM, state=st.STARTING)  # first in the status
            members, external = plan(settings, paths)
            state.services.update(external)
            if settings.temporal.managed and settings.temporal.ui_port:
                state.web_ui = f"http://127.0.0.1:{settings.temporal.ui_port}"
            supervisor = Supervisor(settings, paths, services=members, daemon_state=state, interval=interval)
            supervisor.save()
            # Temporal, the API and the worker start while the LLM is set up: none of them needs it.
            others = _Background(supervisor.start_all)
            try:
                if under_lock:
                    _wait_for_caller()
                llm = setup(settings, paths, _log_event)
            except BaseException:
                others.join()  # then stop what it started: the start as a whole failed
                supervisor.stop_started()
                raise
            others.join()
            others.raise_error()
            llm_service = plan_llm(settings, paths, active.provider(settings, paths))
            if isinstance(llm_service, Managed):
                llm_service.started_here = llm.started  # stopped again if the start fails
                supervisor.add(llm_service)
            else:
                state.services[LLM] = llm_service
        state.phase = st.PHASE_READY
        supervisor.save()
        log.info("ready: %s", ", ".join(f"{n} pid {s.pid}" for n, s in state.services.items() if s.pid))
        supervisor.run(stop)
    except CallerGaveUp:
        state.phase, state.message = st.PHASE_FAILED, "the start was abandoned: the Local LLM was not set up"
        state.services.pop(LLM, None)
        st.write(paths, state)
        log.info("%s", state.message)
        return 1
    except StartFailed as e:
        if llm is not None and llm.started:
            stop_llm(paths)  # set up by this start for a server that did not come up
        state.phase, state.failed_service = st.PHASE_FAILED, e.service
        state.message = e.message
        st.write(paths, state)
        log.error("%s could not start: %s", e.service, e.message)
        return 1
    except StigmerError as e:
        state.phase, state.message = st.PHASE_FAILED, e.message
        state.failed_service = LLM if llm is None else None
        st.write(paths, state)
        log.error("start failed: %s\n%s", e.message, e.hint)
        return 1
    finally:
        if state.phase == st.PHASE_READY and supervisor is not None:
            state.phase = st.PHASE_STOPPING
            supervisor.save()
            supervisor.stop_all()
            log.info("stopped")
    return 0


class CallerGaveUp(Exception):
    """The `stigmer server` that spawned us could not set the LLM up (it says why to the user)."""


def _wait_for_caller() -> None:
    """Block until the spawning command says `go` on stdin; EOF (it failed, or died) ends the start."""
    line = sys.stdin.buffer.readline()
    if line.strip() != b"go":
        raise CallerGaveUp


class _Background:
    """A function run in a thread, its exception kept for the caller to raise."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.error: BaseException | None = None

        def target() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the thread that joins
                self.error = e

        self.thread = threading.Thread(target=target, name="start", daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _log_event(event: Event) -> None:
    if event.total is None or event.done in (0, event.total):
        log.info("%s: %s", event.phase, event.message)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.DEBUG if "--debug" in args else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = run(under_lock="--under-lock" in args)
    except StigmerError as e:
        log.error("%s\n%s", e.message, e.hint)
        code = e.exit_code
    logging.shutdown()
    return code


if __name__ == "__main__":
    from stigmer.services.secret_pipe import start_child

    start_child()  # the secrets `stigmer server` sent: kept in memory for every (re)start of a service
    sys.exit(main())

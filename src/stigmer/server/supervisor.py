"""The daemon's supervisor: bring every service up (adopting what is already running and ours), watch
them, restart one that dies or stops answering (with back-off, and not forever), and stop them all.

Restarts take the control lock without waiting: while a `stigmer server` or `stop` holds it (switching
the model, stopping everything) the supervisor leaves the services alone and looks again next round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from stigmer.config.store import Settings
from stigmer.errors import StigmerError
from stigmer.fsutil import PRIVATE_FILE, tail
from stigmer.paths import Paths
from stigmer.server import state as st
from stigmer.services import spawn
from stigmer.services.manager import Services
from stigmer.services.record import ProcessRecord
from stigmer.services.spec import RestartPolicy, ServiceSpec

log = logging.getLogger(__name__)

UNHEALTHY_LIMIT = 3  # failed probes in a row of a live process before it is restarted
PORT_RACE_TRIES = 3  # starts of a service whose free port was taken before it bound it


class StartFailed(StigmerError):
    """A service could not be started: which one is in `service`."""

    def __init__(self, service: str, error: StigmerError) -> None:
        super().__init__(error.message, code=error.code, hint=error.hint)
        self.service = service


@dataclass
class Managed:
    """One service under supervision."""

    name: str
    build: Callable[[], ServiceSpec]  # a fresh spec for each (re)start: ports, the model to serve
    probe: Callable[[], bool]
    needs: tuple[str, ...] = ()  # started once these are ready
    stop_timeout: float = 10.0
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    status: st.ServiceStatus = field(default_factory=lambda: st.ServiceStatus(""))
    record: ProcessRecord | None = None
    restarts: list[float] = field(default_factory=list)  # when, within the policy's window
    unhealthy: int = 0
    next_try: float = 0.0
    started_here: bool = False  # started by this daemon, not adopted


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        *,
        services: list[Managed],
        daemon_state: st.DaemonState,
        interval: float = 2.0,
        lock_timeout: float = 0.0,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.services = {m.name: m for m in services}
        self.state = daemon_state
        self.interval = interval
        self.lock_timeout = lock_timeout
        self.runner = Services(paths)
        self._write_lock = threading.Lock()
        for m in services:
            if not m.status.name:
                m.status = st.ServiceStatus(m.name, log=str(paths.log_file(m.name)))
            self.state.services[m.name] = m.status

    # -- state ------------------------------------------------------------------------------------------
    def save(self) -> None:
        with self._write_lock:
            st.write(self.paths, self.state)

    def _running(self, m: Managed, rec: ProcessRecord) -> None:
        m.record = rec
        m.unhealthy = 0
        m.status.state = st.RUNNING
        m.status.pid = rec.pid
        m.status.started = rec.create_time
        if not m.status.address:
            m.status.address = st.record_address(rec.info)  # the LLM's too, from its base URL

    # -- start ------------------------------------------------------------------------------------------
    def start_all(self) -> None:
        """Bring every service up, in waves by dependency; on a failure stop what this start started."""
        done: set[str] = set()
        pending = list(self.services.values())
        while pending:
            wave = [m for m in pending if set(m.needs) <= done]
            if not wave:
                raise RuntimeError(f"unsatisfiable service dependencies: {[m.name for m in pending]}")
            self._start_wave(wave)
            done.update(m.name for m in wave)
            pending = [m for m in pending if m.name not in done]

    def add(self, m: Managed) -> None:
        """Bring one more service up and supervise it with the others (the LLM, once it is set up): it
        comes first, so it is stopped last. On a failure, stop what this start started."""
        if not m.status.name:
            m.status = st.ServiceStatus(m.name, log=str(self.paths.log_file(m.name)))
        self.services = {m.name: m, **self.services}
        self.state.services[m.name] = m.status
        self._start_wave([m])

    def _start_wave(self, wave: list[Managed]) -> None:
        errors: dict[str, BaseException] = {}
        threads = [threading.Thread(target=self._bring_up, args=(m, errors), name=m.name) for m in wave]
        for t in threads:
            t.start()
        stopped = False
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.05)
            if errors and not stopped:
                # The start as a whole has failed: stop the others now rather than wait for their readiness
                # (a worker would wait up to a minute for an API that will not come).
                stopped = True
                for m in wave:
                    if m.name not in errors and m.status.state == st.STARTING:
                        self.runner.stop(m.name, timeout=m.stop_timeout)
        self.save()
        if errors:
            name, error = next(iter(errors.items()))
            self.stop_started()
            if isinstance(error, StigmerError):
                raise StartFailed(name, error) from error
            raise error

    def _bring_up(self, m: Managed, errors: dict[str, BaseException]) -> None:
        try:
            rec = self.runner.record(m.name)
            if rec is not None and m.probe():
                log.info("%s: adopting the running process (pid %d)", m.name, rec.pid)
            else:
                if rec is not None:  # ours, but not answering: replace it
                    log.warning("%s: pid %d does not answer; replacing it", m.name, rec.pid)
                    self.runner.stop(m.name, timeout=m.stop_timeout)
                m.status.state = st.STARTING
                self.save()
                rec = self._start_fresh(m)
                m.started_here = True
            self._running(m, rec)
        except BaseException as e:  # noqa: B036 - reported to start_all, which stops the others
            m.status.state = st.FAILED
            m.status.last_failure = e.message if isinstance(e, StigmerError) else f"{type(e).__name__}: {e}"
            m.status.last_failure_at = time.time()
            errors[m.name] = e

    def _start_fresh(self, m: Managed) -> ProcessRecord:
        """Start from a fresh spec. A port that we found free and another program took before the service
        bound it (the spec's ports are chosen at build time) is a race, not a fault: build and try again."""
        for attempt in range(1, PORT_RACE_TRIES + 1):
            try:
                return self.runner.start(m.build())
            except StigmerError as e:
                if attempt == PORT_RACE_TRIES or "address already in use" not in f"{e.message} {e.hint}":
                    raise
                log.warning("%s: a port it was given was taken meanwhile; starting it on others", m.name)
        raise AssertionError("unreachable")

    # -- watch ------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.check_once()
            except Exception:  # a supervisor that dies supervises nothing: log and go on
                log.exception("supervision round failed")

    def check_once(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        changed = False
        for m in self.services.values():
            changed |= self._check(m, now)
            with contextlib.suppress(OSError):
                if spawn.rotate_running(self.paths.log_file(m.name)):
                    log.info("%s: log rotated", m.name)
        if changed:
            self.save()

    def _check(self, m: Managed, now: float) -> bool:
        if m.status.state in (st.FAILED, st.EXTERNAL):
            return False
        rec = self.runner.record(m.name)
        if rec is not None and (m.record is None or rec.pid != m.record.pid):
            log.info("%s: now pid %d (restarted by a stigmer command)", m.name, rec.pid)
            self._running(m, rec)  # someone holding the control lock replaced it: adopt, not a failure
            return True
        if rec is not None:
            if m.probe():
                if m.unhealthy or m.status.state != st.RUNNING:
                    self._running(m, rec)  # answering again (it was only slow)
                    return True
                return False
            m.unhealthy += 1
            log.warning("%s: health check failed (%d of %d)", m.name, m.unhealthy, UNHEALTHY_LIMIT)
            if m.unhealthy < UNHEALTHY_LIMIT:
                return False
            why = f"stopped answering its health check (pid {rec.pid})"
        else:
            why = f"exited (pid {m.status.pid})" if m.status.pid else "is not running"
        return self._restart(m, why, now)

    def _restart(self, m: Managed, why: str, now: float) -> bool:
        if m.status.state != st.RESTARTING:
            last = tail(self.paths.log_file(m.name), 1)
            m.status.last_failure = why + (f": {last[0]}" if last else "")
            m.status.last_failure_at = now
            m.status.state = st.RESTARTING
            m.status.pid = None
            m.next_try = now + m.policy.delay(len(m.restarts) + 1)
            log.warning("%s %s; restarting in %.1fs", m.name, why, m.next_try - now)
            return True
        if now < m.next_try:
            return False
        m.restarts = [t for t in m.restarts if now - t < m.policy.window]
        if len(m.restarts) >= m.policy.max_restarts:
            m.status.state = st.FAILED
            m.status.last_failure = (
                f"{m.status.last_failure} (restarted {len(m.restarts)} times in "
                f"{m.policy.window:.0f} s; no more restarts: run  stigmer server restart)"
            )
            log.error("%s keeps failing; giving up", m.name)
            self.runner.stop(m.name, timeout=m.stop_timeout)  # one that is alive but not answering
            return True
        from stigmer.services.lock import try_control_lock

        with try_control_lock(self.paths) as held:
            if not held:
                return False  # a stigmer command is starting or stopping things: next round
            current = self.runner.record(m.name)
            if current is not None and m.record is not None and current.pid != m.record.pid:
                self._running(m, current)  # that command replaced it meanwhile
                return True
            if current is not None:
                # Alive but not answering: stop it first, so that there is never a second one.
                self.runner.stop(m.name, timeout=m.stop_timeout)
            m.restarts.append(now)
            m.status.restarts += 1
            try:
                rec = self.runner.start(m.build())
            except StigmerError as e:
                m.status.last_failure = e.message
                m.status.last_failure_at = time.time()
                m.next_try = time.time() + m.policy.delay(len(m.restarts) + 1)
                log.error("%s: restart failed: %s", m.name, e.message)
                return True
        m.started_here = True
        self._running(m, rec)
        log.info("%s restarted (pid %d, restart %d)", m.name, rec.pid, m.status.restarts)
        return True

    # -- stop -------------------------------------------------------------------------------------------
    def stop_all(self) -> None:
        """Stop every service we run, dependants first (the worker before Temporal)."""
        self._stop([m for m in reversed(list(self.services.values())) if m.status.state != st.EXTERNAL])

    def stop_started(self) -> None:
        """After a failed start: stop what this start brought up, keep what it adopted."""
        self._stop([m for m in reversed(list(self.services.values())) if m.started_here])

    def _stop(self, members: list[Managed]) -> None:
        for m in members:
            with contextlib.suppress(Exception):
                stopped = self.runner.stop(m.name, timeout=m.stop_timeout)
                if stopped is not None:
                    log.info("%s stopped (pid %d)", m.name, stopped.pid)
            if m.status.state != st.FAILED:
                m.status.state = st.STOPPED
            m.status.pid = None
        self.save()


def last_lines(paths: Paths, service: str, n: int = 15) -> list[str]:
    return tail(paths.log_file(service), n)


def open_lock(path: str) -> IO[bytes] | None:
    """An exclusive lock on `path` that a child can inherit (POSIX flock); None when it is held."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
    f = os.fdopen(fd, "ab")  # handed to the child process, closed by the caller
    with contextlib.suppress(OSError):
        os.chmod(path, PRIVATE_FILE)  # one made by an earlier version may be 0644
    try:
        import fcntl
    except ImportError:  # Windows: no inheritable advisory lock; the daemon's own lock still guards
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f

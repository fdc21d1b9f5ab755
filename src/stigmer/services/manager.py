"""The service layer: start, stop and inspect the product's processes, each with a pid record in
run/<name>.pid and a log in logs/<name>.log.

Starting spawns the process detached (its own session, surviving the terminal), records its identity,
and waits for its readiness probe; a start that fails stops what it spawned and removes only the record
it wrote itself. Stopping sends SIGTERM to the process group, waits up to the spec's deadline, then
SIGKILL. A record that does not name our live process is never acted on.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.services import record as records
from stigmer.services.record import ProcessRecord
from stigmer.services.spec import ServiceSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceState:
    name: str
    running: bool
    pid: int | None = None
    started: float | None = None  # epoch seconds
    info: dict[str, Any] = field(default_factory=dict)


class Services:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def _record_paths(self, name: str) -> list[Path]:
        found = [self.paths.pid_file(name)]
        if name == "llm":
            found.append(self.paths.legacy_llm_pid)  # written by versions before the service layer
        return found

    def record(self, name: str) -> ProcessRecord | None:
        """Our live process for this service, or None (stale records are removed on the way)."""
        for path in self._record_paths(name):
            rec = records.live_record(path)
            if rec is not None:
                return rec
        return None

    def state(self, name: str) -> ServiceState:
        rec = self.record(name)
        if rec is None:
            return ServiceState(name, False)
        return ServiceState(name, True, rec.pid, rec.create_time, dict(rec.info))

    def start(self, spec: ServiceSpec) -> ProcessRecord:
        """Spawn the service and wait until it is ready; on any failure leave nothing behind."""
        from stigmer.net.addresses import port_in_use
        from stigmer.services import ready, spawn

        for address in _addresses(spec):
            if port_in_use(*address):
                raise port_held(spec, address)
        self.paths.ensure(self.paths.run_dir, self.paths.logs_dir)
        log_path = self.paths.log_file(spec.name)
        pid_path = self.paths.pid_file(spec.name)
        argv, info = list(spec.argv), dict(spec.info)
        if spec.sandbox is not None and sys.platform.startswith("linux"):
            from stigmer.sandbox import launch

            # The launcher applies the policy then execs the program (same pid): the record keeps the
            # launcher's command line, and records.same_command knows the program's from it.
            argv = launch.argv_for(spec.sandbox.to_json(), argv)
            info["sandbox"] = spec.sandbox.summary()
        proc, rec = spawn.start_detached(
            argv,
            env=spec.env,
            log_path=log_path,
            pid_path=pid_path,
            service=spec.name,
            info=info,
            cwd=spec.cwd,
            pass_fds=spec.pass_fds,
            secrets_by_pipe=spec.secrets_by_pipe,
        )
        try:
            ready.wait_ready(
                spec.ready, proc=proc, what=spec.label, log_path=log_path, timeout=spec.ready_timeout
            )
        except BaseException as e:
            # Never leave a half-started service behind (also on Ctrl-C).
            spawn.stop(rec, timeout=5)
            _reap(proc)
            records.remove_if(pid_path, rec)
            for address in _addresses(spec) if isinstance(e, StigmerError) else ():
                if port_in_use(*address):  # it died because someone else took the port meanwhile
                    raise port_held(spec, address) from None
            raise
        log.info("%s started (pid %d)", spec.name, rec.pid)
        return rec

    def stop(self, name: str, *, timeout: float = 10.0) -> ProcessRecord | None:
        """Stop our process for this service; None when there was none."""
        from stigmer.services import spawn

        stopped = None
        for path in self._record_paths(name):
            rec = records.live_record(path)
            if rec is None:
                continue
            spawn.stop(rec, timeout=timeout)
            records.remove_if(path, rec)
            stopped = stopped or rec
        return stopped


def _addresses(spec: ServiceSpec) -> list[tuple[str, int]]:
    return ([spec.address] if spec.address is not None else []) + list(spec.more_addresses)


def port_held(spec: ServiceSpec, address: tuple[str, int] | None = None) -> StigmerError:
    address = address or spec.address
    assert address is not None
    host, port = address
    return StigmerError(
        f"Port {port} on {host} is held by another program, so {spec.label} cannot listen there.",
        hint=f"Nothing was stopped. Find it with  lsof -i :{port}  (or  ss -ltnp | grep {port}), stop it, "
        "or choose another port in the settings (stigmer config list).",
        code=ErrorCode.PORT_IN_USE,
    )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()

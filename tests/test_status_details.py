"""Small things `status` and `config` said wrong: the llm row had no address, services left running by
a killed daemon were shown as "Stopped", and temporal.ui_port called 0 "automatic" where it turns the
Web UI off. (End to end: test_server_e2e.py checks the llm row and the killed daemon for real.)"""

from __future__ import annotations

import io
import os
import time

import pytest

from stigmer.cli.render import Out
from stigmer.paths import Paths
from stigmer.server import state as st
from tests.conftest import run_cli


def test_ui_port_says_that_0_turns_the_web_ui_off() -> None:
    r = run_cli("config", "set", "temporal.ui_port", "70000")
    assert r.returncode != 0
    assert "must be 0 (off) or 1-65535" in r.stderr and "automatic" not in r.stderr
    assert run_cli("config", "set", "temporal.ui_port", "0").returncode == 0  # and 0 is taken


@pytest.mark.parametrize(
    ("info", "address"),
    [
        ({"port": 7234}, "127.0.0.1:7234"),
        ({"provider": "llamacpp", "base_url": "http://127.0.0.1:11435", "model": "m"}, "127.0.0.1:11435"),
        ({"provider": "ollama", "base_url": "http://localhost:11434/"}, "localhost:11434"),
        ({"task_queue": "q"}, None),  # the worker listens nowhere
    ],
)
def test_each_service_row_gets_its_address_from_its_record(
    isolated_home: Paths, info: dict[str, object], address: str | None
) -> None:
    from stigmer.server.supervisor import Managed, Supervisor
    from stigmer.services.record import ProcessRecord

    m = Managed("llm", build=lambda: None, probe=lambda: True)  # type: ignore[arg-type,return-value]
    daemon = st.DaemonState(pid=os.getpid(), started=time.time(), api_url="http://127.0.0.1:1")
    sup = Supervisor(None, isolated_home, services=[m], daemon_state=daemon)  # type: ignore[arg-type]
    sup._running(m, ProcessRecord(os.getpid(), time.time(), ["x"], "llm", info))
    assert m.status.address == address and daemon.services["llm"].address == address


def test_services_without_their_daemon_are_shown_running_with_what_happens_next() -> None:
    buf = io.StringIO()
    Out(stdout=buf, stderr=buf).server_block(
        {
            "running": False,
            "unsupervised": True,
            "phase": "unsupervised",
            "port": 7234,
            "data": "/d",
            "services": {
                "temporal": {"state": "running", "pid": 11, "address": "127.0.0.1:7233", "uptime": 5.0},
                "server": {"state": "running", "pid": 12, "address": "127.0.0.1:7234", "uptime": 5.0},
            },
        }
    )
    text = buf.getvalue()
    assert "Status: ⚠ Services running, not supervised (the daemon is not running)" in text
    assert "Stopped" not in text
    assert "PID 11   127.0.0.1:7233" in text and "PID 12   127.0.0.1:7234" in text
    assert "The next `stigmer server` adopts them" in text and "`stigmer server stop` stops them" in text


def test_nothing_left_running_is_still_stopped(isolated_home: Paths) -> None:
    from stigmer.config import store
    from stigmer.server.status import server_status

    data = server_status(store.load(isolated_home), isolated_home)
    assert data["running"] is False and data["unsupervised"] is False and data["phase"] == "stopped"
    assert data["services"] == {}

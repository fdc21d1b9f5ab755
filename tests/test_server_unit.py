"""The daemon's parts without the daemon: command lines, the supervisor's restart rules on real processes,
the state file, the start-at-login files, the daemon's environment."""

from __future__ import annotations

import os
import plistlib
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from stigmer.config import store
from stigmer.paths import Paths
from stigmer.server import autostart, control, specs
from stigmer.server import state as st
from stigmer.server.supervisor import UNHEALTHY_LIMIT, Managed, StartFailed, Supervisor
from stigmer.services.env import PYTHON, child_env
from stigmer.services.manager import Services
from stigmer.services.spec import RestartPolicy, ServiceSpec


def test_temporal_command_line(tmp_path: Path) -> None:
    argv = specs.temporal_argv(
        "/bin/temporal", port=7233, ui_port=8233, http_port=7243, metrics_port=7244,
        db_file=tmp_path / "t.db", namespace="default",
    )  # fmt: skip
    assert argv[:3] == ["/bin/temporal", "server", "start-dev"]
    assert argv[argv.index("--ip") + 1] == "127.0.0.1"  # loopback only
    assert argv[argv.index("--port") + 1] == "7233" and argv[argv.index("--ui-port") + 1] == "8233"
    assert argv[argv.index("--db-filename") + 1] == str(tmp_path / "t.db")  # executions survive restarts
    assert "--namespace" not in argv and "--headless" not in argv
    headless = specs.temporal_argv(
        "t", port=1, ui_port=0, http_port=2, metrics_port=3, db_file=tmp_path / "t.db", namespace="agents"
    )
    assert "--headless" in headless and "--ui-port" not in headless
    assert headless[headless.index("--namespace") + 1] == "agents"


def test_python_services_command_lines() -> None:
    assert specs.runner_argv("/py") == ["/py", "-m", "stigmer.runner.worker"]
    assert specs.api_argv("/py") == ["/py", "-m", "stigmer.server.api"]
    assert control.daemon_argv("/py") == ["/py", "-m", "stigmer.server.daemon", "--under-lock"]


def test_daemon_environment_keeps_settings_and_the_llm_key_only() -> None:
    env = control.daemon_env(
        {
            "PATH": "/bin",
            "STIGMER_HOME": "/h",
            "STIGMER_LLM_API_KEY": "k1",
            "OPENAI_API_KEY": "k2",
            "HF_TOKEN": "hf-secret",
            "AWS_SECRET_ACCESS_KEY": "aws",
            "GITHUB_TOKEN": "gh",
            "HTTPS_PROXY": "http://p:1",
            "RANDOM_THING": "x",
        }
    )
    assert (
        env["STIGMER_HOME"] == "/h" and env["STIGMER_LLM_API_KEY"] == "k1" and env["OPENAI_API_KEY"] == "k2"
    )
    assert env["HTTPS_PROXY"] == "http://p:1" and env["PATH"] == "/bin"
    for gone in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "RANDOM_THING"):
        assert gone not in env


def test_state_round_trip(isolated_home: Paths) -> None:
    state = st.DaemonState(pid=1, started=2.0, api_url="http://127.0.0.1:7234")
    state.services["llm"] = st.ServiceStatus("llm", st.RUNNING, pid=3, restarts=1, last_failure="x")
    isolated_home.ensure(isolated_home.run_dir)
    st.write(isolated_home, state)
    back = st.read(isolated_home)
    assert back == state
    st.state_path(isolated_home).write_text("{not json")
    assert st.read(isolated_home) is None


# -- the supervisor on real processes -----------------------------------------------------------------------
SLEEPER = "import time, sys; print('up', flush=True); time.sleep(600)"


def _member(
    paths: Paths, name: str, *, code: str = SLEEPER, policy: RestartPolicy | None = None, ready: bool = True
) -> Managed:
    def build() -> ServiceSpec:
        return ServiceSpec(
            name=name,
            argv=[sys.executable, "-c", code],
            env=child_env(PYTHON),
            ready=lambda: ready,
            ready_timeout=5,
            stop_timeout=5,
        )

    return Managed(
        name,
        build=build,
        probe=lambda: Services(paths).record(name) is not None,
        policy=policy or RestartPolicy(backoff_first=0.0, backoff_max=0.0, max_restarts=3, window=60),
    )


@pytest.fixture
def sup(isolated_home: Paths):  # type: ignore[no-untyped-def]
    made: list[Supervisor] = []

    def make(*members: Managed) -> Supervisor:
        state = st.DaemonState(pid=os.getpid(), started=time.time(), api_url="")
        s = Supervisor(
            store.defaults(isolated_home), isolated_home, services=list(members), daemon_state=state
        )
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop_all()


def _kill(paths: Paths, name: str) -> int:
    rec = Services(paths).record(name)
    assert rec is not None
    os.kill(rec.pid, signal.SIGKILL)
    psutil.Process(rec.pid).wait(5)
    return rec.pid


def test_dead_service_is_restarted_and_counted(isolated_home: Paths, sup) -> None:  # type: ignore[no-untyped-def]
    s = sup(_member(isolated_home, "a"))
    s.start_all()
    first = s.state.services["a"].pid
    old = _kill(isolated_home, "a")
    s.check_once()  # notices: restarting (after back-off)
    assert s.state.services["a"].state == st.RESTARTING and "exited" in (
        s.state.services["a"].last_failure or ""
    )
    s.check_once()
    svc = s.state.services["a"]
    assert svc.state == st.RUNNING and svc.pid not in (None, first, old) and svc.restarts == 1
    assert st.read(isolated_home).services["a"].restarts == 1  # written for the API and the CLI


def test_service_that_keeps_dying_is_failed_not_restarted_forever(isolated_home: Paths, sup) -> None:  # type: ignore[no-untyped-def]
    s = sup(_member(isolated_home, "a", policy=RestartPolicy(backoff_first=0, backoff_max=0, max_restarts=2)))
    s.start_all()
    for _ in range(2):
        _kill(isolated_home, "a")
        s.check_once()
        s.check_once()
        assert s.state.services["a"].state == st.RUNNING
    _kill(isolated_home, "a")
    for _ in range(3):
        s.check_once()
    svc = s.state.services["a"]
    assert svc.state == st.FAILED and svc.restarts == 2 and "no more restarts" in (svc.last_failure or "")
    assert Services(isolated_home).record("a") is None


def test_restart_waits_while_a_command_holds_the_control_lock(isolated_home: Paths, sup) -> None:  # type: ignore[no-untyped-def]
    import threading

    from stigmer.services.lock import control_lock

    s = sup(_member(isolated_home, "a"))
    s.start_all()
    _kill(isolated_home, "a")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with control_lock(isolated_home):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        s.check_once()
        s.check_once()
        assert s.state.services["a"].state == st.RESTARTING  # left alone while the lock is held
    finally:
        release.set()
        t.join()
    s.check_once()
    assert s.state.services["a"].state == st.RUNNING


def test_an_unresponsive_process_is_stopped_before_its_replacement(isolated_home: Paths, sup) -> None:  # type: ignore[no-untyped-def]
    answering = {"now": True}
    member = _member(isolated_home, "a")
    member.probe = lambda: answering["now"]
    s = sup(member)
    s.start_all()
    first = s.state.services["a"].pid
    answering["now"] = False  # alive, but its health check fails
    for _ in range(UNHEALTHY_LIMIT):
        s.check_once()
    assert s.state.services["a"].state == st.RESTARTING
    s.check_once()  # still not answering: replaced
    answering["now"] = True
    svc = s.state.services["a"]
    assert svc.state == st.RUNNING and svc.pid != first and svc.restarts == 1
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE  # never two


def test_a_process_replaced_by_a_command_is_adopted_not_counted(isolated_home: Paths, sup) -> None:  # type: ignore[no-untyped-def]
    member = _member(isolated_home, "a")
    s = sup(member)
    s.start_all()
    runner = Services(isolated_home)
    runner.stop("a")
    new = runner.start(member.build())  # as `stigmer server` does when it switches the model
    s.check_once()
    assert s.state.services["a"].pid == new.pid and s.state.services["a"].restarts == 0


def test_failed_start_stops_what_it_started_and_names_the_service(isolated_home: Paths, sup) -> None:  # type: ignore[no-untyped-def]
    good = _member(isolated_home, "good")
    bad = _member(
        isolated_home, "bad", code="import sys; print('no way', flush=True); sys.exit(4)", ready=False
    )
    bad.needs = ("good",)
    s = sup(good, bad)
    with pytest.raises(StartFailed) as e:
        s.start_all()
    assert e.value.service == "bad" and "exited during start-up" in e.value.message
    assert Services(isolated_home).record("good") is None  # nothing half-started
    assert s.state.services["bad"].state == st.FAILED


def test_running_logs_are_rotated(isolated_home: Paths) -> None:
    from stigmer.services.spawn import rotate_running

    isolated_home.ensure(isolated_home.logs_dir)
    log = isolated_home.log_file("a")
    with log.open("ab") as writer:  # a service's open log, in append mode
        writer.write(b"x" * 100)
        writer.flush()
        assert rotate_running(log, max_bytes=50) is True
        writer.write(b"after\n")
        writer.flush()
    assert log.with_name("a.log.1").read_bytes() == b"x" * 100
    assert log.read_bytes() == b"after\n"  # the writer carries on at the start of the emptied file


# -- start at login ---------------------------------------------------------------------------------------
def test_systemd_unit(isolated_home: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    auto, content = autostart.plan(isolated_home, platform="linux", user_home=tmp_path)
    text = content.decode()
    assert auto.path == tmp_path / ".config/systemd/user/stigmer.service"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # where systemd looks then
    assert autostart.plan(isolated_home, platform="linux", user_home=tmp_path)[0].path == (
        tmp_path / "xdg/systemd/user/stigmer.service"
    )
    assert f"ExecStart={sys.executable} -m stigmer server run" in text
    assert f'Environment="STIGMER_HOME={isolated_home.home}"' in text
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text
    assert ["systemctl", "--user", "enable", "--now", "stigmer.service"] in auto.commands


def test_launchd_agent(isolated_home: Paths, tmp_path: Path) -> None:
    auto, content = autostart.plan(isolated_home, platform="darwin", user_home=tmp_path)
    plist = plistlib.loads(content)
    assert auto.path == tmp_path / "Library/LaunchAgents/dev.stigmer.server.plist"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "stigmer", "server", "run"]
    assert plist["RunAtLoad"] is True and plist["EnvironmentVariables"]["STIGMER_HOME"] == str(
        isolated_home.home
    )
    assert ["launchctl", "load", "-w", str(auto.path)] in auto.commands


def test_enable_and_disable_write_and_remove_the_unit(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    ran: list[list[str]] = []

    def runner(argv: object) -> int:
        ran.append(list(argv))  # type: ignore[call-overload]
        return 0

    auto, registered = autostart.enable(isolated_home, runner=runner, platform="linux")
    assert registered and auto.path == tmp_path / "cfg/systemd/user/stigmer.service" and auto.path.exists()
    assert ran == auto.commands  # nothing ran for real: the runner is ours
    removed = autostart.disable(isolated_home, runner=runner, platform="linux")
    assert removed is not None and not auto.path.exists()
    assert ["systemctl", "--user", "disable", "stigmer.service"] in ran
    assert autostart.disable(isolated_home, runner=runner, platform="linux") is None
    with pytest.raises(Exception, match="not supported"):
        autostart.plan(isolated_home, platform="win32")


def test_a_port_taken_between_choice_and_bind_is_a_race_tried_again(isolated_home: Paths, sup) -> None:  # type: ignore[no-untyped-def]
    """Temporal's ports are chosen free when its spec is built; another program may take one before the
    dev server binds it. That start is tried again with new ports; any other failure is final."""
    builds: list[int] = []
    fails = "import sys; print('listen tcp 127.0.0.1:6665: bind: address already in use'); sys.exit(1)"

    def member(first_fails_with: str, name: str) -> Managed:
        def build() -> ServiceSpec:
            builds.append(1)
            code = first_fails_with if len(builds) == 1 else SLEEPER
            return ServiceSpec(
                name=name, argv=[sys.executable, "-c", code], env=child_env(PYTHON),
                ready=lambda: "up" in _log(isolated_home, name), ready_timeout=5, stop_timeout=5,
            )  # fmt: skip

        return Managed(name, build=build, probe=lambda: True)

    s = sup(member(fails, "raced"))
    s.start_all()
    assert len(builds) == 2 and s.state.services["raced"].state == st.RUNNING
    builds.clear()
    other = "import sys; print('no such database'); sys.exit(1)"
    with pytest.raises(StartFailed):
        sup(member(other, "broken")).start_all()
    assert len(builds) == 1


def _log(paths: Paths, name: str) -> str:
    try:
        return paths.log_file(name).read_text()
    except OSError:
        return ""

"""The service layer with real processes: start, readiness, stop, records, the control lock, child
environments and private files."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest

from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.services import record as records
from stigmer.services.env import GPU, PROXY, PYTHON, child_env
from stigmer.services.lock import control_lock
from stigmer.services.manager import Services
from stigmer.services.spec import RestartPolicy, ServiceSpec
from tests.doubles.archives import free_port

SERVER = (
    "import http.server, sys, os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = repr(sorted(os.environ)).encode()\n"
    "        self.send_response(200)\n"
    "        self.send_header('Content-Length', str(len(body)))\n"
    "        self.end_headers()\n"
    "        self.wfile.write(body)\n"
    "    def log_message(self, *a): pass\n"
    "print('serving', flush=True)\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _spec(name: str, port: int, env: dict[str, str] | None = None, **kw: object) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        argv=[sys.executable, "-c", SERVER, str(port)],
        env=env if env is not None else child_env(PYTHON),
        ready=lambda: _answers(port),
        address=("127.0.0.1", port),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def services(isolated_home: Paths):  # type: ignore[no-untyped-def]
    s = Services(isolated_home)
    yield s
    for name in ("web", "llm", "other"):
        s.stop(name, timeout=5)


def test_start_records_waits_and_stops(services: Services, isolated_home: Paths) -> None:
    port = free_port()
    rec = services.start(_spec("web", port))
    assert _answers(port) and records.is_ours(rec)
    assert services.state("web").running and services.state("web").pid == rec.pid
    pid_file, log_file = isolated_home.pid_file("web"), isolated_home.log_file("web")
    assert pid_file.exists() and "serving" in log_file.read_text()
    # everything in the home is private to the user
    assert stat.S_IMODE(isolated_home.home.stat().st_mode) == 0o700
    for path in (pid_file, log_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (isolated_home.run_dir, isolated_home.logs_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    stopped = services.stop("web")
    assert stopped is not None and stopped.pid == rec.pid
    assert not psutil.pid_exists(rec.pid) or psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE
    assert not pid_file.exists() and services.stop("web") is None


def test_child_gets_only_allowed_environment(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    for secret in ("STIGMER_LLM_API_KEY", "STIGMER_CLOUD_TOKEN", "HF_TOKEN", "OPENAI_API_KEY", "AWS_SECRET"):
        monkeypatch.setenv(secret, "s3cret")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    port = free_port()
    rec = services.start(_spec("web", port, env=child_env(PROXY, PYTHON)))
    environ = psutil.Process(rec.pid).environ()
    assert "HTTPS_PROXY" in environ and "PATH" in environ and environ["LC_ALL"] == "C.UTF-8"
    for secret in ("STIGMER_LLM_API_KEY", "STIGMER_CLOUD_TOKEN", "HF_TOKEN", "OPENAI_API_KEY", "AWS_SECRET"):
        assert secret not in environ, secret
    # secrets are refused by name even when a group would allow them
    assert "GITHUB_TOKEN" not in child_env(["GITHUB_TOKEN"], environ={"GITHUB_TOKEN": "x", "PATH": "/b"})
    assert child_env(GPU, extra={"K": "v"}, environ={"CUDA_VISIBLE_DEVICES": "0"}) == {
        "CUDA_VISIBLE_DEVICES": "0",
        "K": "v",
    }


def test_failed_start_leaves_nothing_and_says_why(services: Services, isolated_home: Paths) -> None:
    port = free_port()
    spec = ServiceSpec(
        name="web",
        argv=[sys.executable, "-c", "import sys; print('boom: bad flag', flush=True); sys.exit(3)"],
        env=child_env(PYTHON),
        ready=lambda: _answers(port),
        what="test web server",
    )
    with pytest.raises(StigmerError) as e:
        services.start(spec)
    assert e.value.code is ErrorCode.START_FAILED
    assert "test web server exited during start-up (exit code 3)" in e.value.message
    assert "boom: bad flag" in e.value.hint and str(isolated_home.log_file("web")) in e.value.hint
    assert not isolated_home.pid_file("web").exists()


def test_port_held_by_a_silent_program_is_named(services: Services) -> None:
    port = free_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", port))
    silent.listen()  # accepts connections, never answers
    try:
        with pytest.raises(StigmerError) as e:
            services.start(_spec("web", port, what="the test server"))
        assert e.value.code is ErrorCode.PORT_IN_USE
        assert f"Port {port} on 127.0.0.1 is held by another program" in e.value.message
    finally:
        silent.close()


def test_cleanup_never_removes_a_record_another_process_wrote(tmp_path: Path) -> None:
    mine = records.ProcessRecord(1, 1.0, ["a"], "llm")
    theirs = records.ProcessRecord(2, 2.0, ["b"], "llm")
    path = tmp_path / "llm.pid"
    records.write(path, theirs)
    assert records.remove_if(path, mine) is False and records.read(path) == theirs
    assert records.remove_if(path, theirs) is True and not path.exists()


def test_legacy_llm_pid_is_found_and_stopped(services: Services, isolated_home: Paths) -> None:
    port = free_port()
    rec = services.start(_spec("llm", port))
    isolated_home.pid_file("llm").rename(isolated_home.legacy_llm_pid)  # as an earlier version left it
    assert services.record("llm") == rec
    assert services.stop("llm") == rec
    assert not isolated_home.legacy_llm_pid.exists() and not _answers(port)


def test_control_lock_serialises_two_processes(isolated_home: Paths) -> None:
    code = (
        "import sys, time\n"
        "from stigmer.paths import Paths\n"
        "from stigmer.services.lock import control_lock\n"
        "with control_lock(Paths.from_env(), on_wait=lambda: print('waiting', flush=True)):\n"
        "    print('got', time.monotonic(), flush=True)\n"
        "    time.sleep(1.0)\n"
        "    print('done', time.monotonic(), flush=True)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outs = [p.communicate(timeout=30)[0].split("\n") for p in procs]
    spans = []
    for lines in outs:
        got = next(float(x.split()[1]) for x in lines if x.startswith("got"))
        done = next(float(x.split()[1]) for x in lines if x.startswith("done"))
        spans.append((got, done))
    spans.sort()
    for (_a, end), (start, _b) in zip(spans, spans[1:], strict=False):
        assert start >= end  # never two holders at once
    assert sum("waiting" in lines for lines in outs) >= 2


def test_control_lock_timeout_is_a_busy_error(isolated_home: Paths) -> None:
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with control_lock(isolated_home):
            held.set()
            release.wait(10)

    # filelock locks are per thread by default: a second thread contends like a second process
    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        with pytest.raises(StigmerError) as e, control_lock(isolated_home, timeout=0.2):
            pass
        assert e.value.code is ErrorCode.BUSY and e.value.exit_code == 7
    finally:
        release.set()
        t.join()


def test_restart_policy_backs_off_and_caps() -> None:
    policy = RestartPolicy(backoff_first=0.5, backoff_max=4)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_home_is_made_private_again(isolated_home: Paths) -> None:
    isolated_home.home.mkdir(mode=0o755)
    os.chmod(isolated_home.home, 0o755)
    isolated_home.ensure(isolated_home.run_dir)
    assert stat.S_IMODE(isolated_home.home.stat().st_mode) == 0o700

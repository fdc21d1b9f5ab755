"""The Local LLM in a sandbox (issue 19): the real built-in engine, started by the service layer under its
policy through the launcher, serves the real starter model; a process under the same policy cannot reach
the user's secrets, write, or connect where the policy does not allow; the Ollama runtime's policy; the
supervisor's identity check follows a process that exec'd from the launcher into its program."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from stigmer.config import store
from stigmer.events import Event
from stigmer.llm.endpoint import OpenAICompatible
from stigmer.llm.llamacpp.provider import LlamaCppProvider, _ctx_size
from stigmer.paths import Paths
from stigmer.sandbox import engines, launch, linux, system
from stigmer.sandbox.policy import ANY, NONE, PORTS, Limits, Policy
from stigmer.services import record as records
from stigmer.services.env import child_env
from stigmer.services.manager import Services
from stigmer.services.spec import ServiceSpec
from tests.doubles.archives import free_port
from tests.doubles.engine import starter

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox"),
    pytest.mark.skipif(
        linux.landlock_abi() < 4, reason="needs Landlock with TCP port rules (ABI 4, Linux 6.7)"
    ),
]


def _quiet(_event: Event) -> None:
    pass


def _wait(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_engine_serves_under_its_policy(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    starter()  # skips without the starter model
    port = free_port()
    monkeypatch.setenv("STIGMER_LLM_PROVIDER", "llamacpp")
    monkeypatch.setenv("STIGMER_LLM_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("STIGMER_LLM_CONTEXT_SIZE", "1024")
    provider = LlamaCppProvider(store.load(isolated_home), isolated_home)
    spec = provider.service_spec(_quiet)
    assert spec.sandbox is not None and spec.sandbox.name == engines.ENGINE
    internal = int(spec.argv[spec.argv.index("--internal-port") + 1])
    assert spec.sandbox.bind == (port, internal) and spec.sandbox.connect == (internal,)
    assert spec.sandbox.network == PORTS and spec.sandbox.write == () and spec.sandbox.limits == Limits()
    assert not any(system.contains(p, str(isolated_home.home)) for p in spec.sandbox.read)

    services = Services(isolated_home)
    rec = services.start(spec)
    try:
        assert launch.inner(rec.argv) == list(spec.argv) and rec.argv[:3] == [sys.executable, "-I", "-S"]
        assert rec.command == list(spec.argv)
        assert rec.info["sandbox"].startswith("engine: network: ports ") and "; no writes;" in rec.info["sandbox"]
        # The launcher exec'd the engine: same pid, the engine's own command line, confined.
        assert psutil.Process(rec.pid).cmdline() == list(spec.argv)
        assert records.is_ours(rec) and services.record("llm") == rec
        status = _proc_status(rec.pid)
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"

        client = OpenAICompatible(f"http://127.0.0.1:{port}/v1", "smollm2:135m")
        answer = client.chat(
            [{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0, seed=1
        )
        assert answer.strip()
        # What reads the record's command line still finds the context (status, the worker's max_tokens).
        assert _ctx_size(rec.command) == 1024 and provider.status().context == 1024
        from stigmer.runner.llm import context_window

        assert context_window("llamacpp", "smollm2:135m", isolated_home) == 1024
    finally:
        stopped = services.stop("llm")
    assert stopped is not None and stopped.pid == rec.pid
    assert _wait(
        lambda: not psutil.pid_exists(rec.pid) or psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE
    )


# What a compromised engine would try, run under the engine's policy: each attempt's outcome as JSON.
_PROBE = r"""
import json, os, socket, sys
args = json.loads(sys.argv[1])
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = e.__class__.__name__
def read(path):
    with open(path, "rb") as f:
        f.read()
def write(path):
    with open(path, "wb") as f:
        f.write(b"x")
def connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
def bind(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)
def udp():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
attempt("ssh_key", lambda: read(args["ssh_key"]))
attempt("api_token", lambda: read(args["api_token"]))
attempt("model", lambda: read(args["model"]))
attempt("write_home", lambda: write(args["write_home"]))
attempt("write_tmp", lambda: write(args["write_tmp"]))
attempt("write_model_folder", lambda: write(args["write_model_folder"]))
attempt("connect_internal", lambda: connect(args["internal"]))
attempt("connect_other", lambda: connect(args["other"]))
attempt("bind_public", lambda: bind(args["public"]))
attempt("bind_other", lambda: bind(args["other_free"]))
attempt("udp", udp)
print(json.dumps(out))
"""


def test_a_process_under_the_engine_policy_cannot_reach_secrets(isolated_home: Paths, tmp_path: Path) -> None:
    model = starter()
    user_home = Path(os.environ["HOME"])  # the test's own HOME (isolated_home)
    (user_home / ".ssh").mkdir(mode=0o700)
    ssh_key = user_home / ".ssh" / "id_rsa"
    ssh_key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nplanted\n")
    isolated_home.ensure_home()
    token = isolated_home.home / "api.token"
    token.write_text("planted-token")
    public, internal, other_free = free_port(), free_port(), free_port()
    policy = engines.builtin_engine(
        isolated_home, SimpleNamespace(), model_path=model, port=public, internal_port=internal
    )
    with socket.socket() as internal_srv, socket.socket() as other_srv:
        for srv, p in ((internal_srv, internal), (other_srv, 0)):
            srv.bind(("127.0.0.1", p))
            srv.listen(8)
        args = {
            "ssh_key": str(ssh_key),
            "api_token": str(token),
            "model": str(model),
            "write_home": str(user_home / "dropped"),
            "write_tmp": str(tmp_path / "dropped"),
            "write_model_folder": str(model.parent / "dropped.gguf"),
            "internal": internal,
            "other": other_srv.getsockname()[1],
            "public": public,
            "other_free": other_free,
        }
        argv = launch.argv_for(policy.to_json(), [sys.executable, "-c", _PROBE, json.dumps(args)])
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {
        "ssh_key": "PermissionError",
        "api_token": "PermissionError",
        "model": "ok",  # what it serves
        "write_home": "PermissionError",
        "write_tmp": "PermissionError",
        "write_model_folder": "PermissionError",
        "connect_internal": "ok",  # its guard relays to llama.cpp
        "connect_other": "PermissionError",  # Landlock: EACCES
        "bind_public": "ok",
        "bind_other": "PermissionError",
        "udp": "PermissionError",  # seccomp: no UDP (Landlock has no rule for it)
    }, r.stderr
    assert not (user_home / "dropped").exists() and not (model.parent / "dropped.gguf").exists()


def test_ollama_policy(tmp_path: Path) -> None:
    home = tmp_path / "home"
    version = tmp_path / "stigmer" / "runtime" / "ollama" / "0.9.0"
    (version / "bin").mkdir(parents=True)
    (version / "lib" / "ollama").mkdir(parents=True)
    binary = version / "bin" / "ollama"
    binary.write_text("#!/bin/sh\n")
    link = tmp_path / "stigmer" / "bin" / "ollama"
    link.parent.mkdir()
    link.symlink_to(binary)
    paths = Paths(tmp_path / "stigmer")
    tmp = paths.data_dir / "ollama-tmp"
    environ = {"HOME": str(home)}

    policy = engines.ollama(paths, None, binary=str(link), tmp=tmp, environ=environ)
    assert policy.name == "ollama"
    assert policy.network == ANY and policy.bind is None and policy.connect == ()  # see engines.ollama
    assert policy.seccomp and not policy.require and policy.limits == Limits()
    assert policy.write == (str(home / ".ollama"), str(home / ".ollama" / "models"), str(tmp))
    assert all(Path(p).is_dir() for p in policy.write)  # created: Landlock allows only what exists
    assert str(version / "bin") in policy.read and str(version / "lib" / "ollama") in policy.read
    assert set(system.system_read()) <= set(policy.read)
    assert not any(system.contains(p, str(paths.home)) for p in policy.read)  # not the home as a whole
    assert str(home / ".ssh") in policy.denied and str(paths.home) in policy.denied
    assert set(system.DEVICES) <= set(policy.devices)
    assert all(os.path.exists(d) for d in policy.devices if d not in system.DEVICES)  # GPUs that exist

    models = tmp_path / "models"
    required = SimpleNamespace(tools=SimpleNamespace(require_sandbox=True))
    policy = engines.ollama(
        paths, required, binary=str(link), tmp=tmp, environ={**environ, "OLLAMA_MODELS": str(models)}
    )
    assert policy.require and str(models) in policy.write and models.is_dir()
    assert Policy.from_json(policy.to_json()) == policy
    assert "network: any" in policy.summary()


def test_ollama_policy_enforced(isolated_home: Paths, tmp_path: Path) -> None:
    """Under the Ollama runtime's policy a process writes its key in ~/.ollama, not in ~/.ssh."""
    home = Path(os.environ["HOME"])
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "id_rsa").write_text("planted")
    tmp = isolated_home.data_dir / "ollama-tmp"
    policy = engines.ollama(isolated_home, None, binary="/bin/sh", tmp=tmp, environ={"HOME": str(home)})
    script = (
        'echo key > "$HOME/.ollama/id_ed25519" && echo part > "$HOME/.ollama/models/blob" && '
        'echo t > "$TMPDIR/x" && echo ok; cat "$HOME/.ssh/id_rsa" || echo denied; '
        'echo x > "$HOME/.ssh/authorized_keys" || echo denied'
    )
    env = {**child_env(), "HOME": str(home), "TMPDIR": str(tmp)}
    r = subprocess.run(launch.argv_for(policy.to_json(), ["/bin/sh", "-c", script]), capture_output=True,
                       text=True, timeout=30, env=env)  # fmt: skip
    assert r.stdout.split() == ["ok", "denied", "denied"], r.stderr
    assert (home / ".ollama" / "id_ed25519").read_text() == "key\n"
    assert not (home / ".ssh" / "authorized_keys").exists()


def test_supervisor_follows_a_process_execd_from_the_launcher(isolated_home: Paths) -> None:
    policy = Policy(name="sleeper", read=system.system_read(), devices=system.DEVICES, network=NONE)
    spec = ServiceSpec(
        name="sleeper", argv=["sleep", "300"], env=child_env(), ready=lambda: True, sandbox=policy
    )
    services = Services(isolated_home)
    rec = services.start(spec)
    try:
        assert rec.argv == launch.argv_for(policy.to_json(), ["sleep", "300"]) and rec.command == [
            "sleep",
            "300",
        ]
        assert _wait(lambda: psutil.Process(rec.pid).cmdline() == ["sleep", "300"])  # exec'd: same pid
        assert records.is_ours(rec)
        assert services.record("sleeper") == rec and services.state("sleeper").running
        # Before the exec the launcher's own command line is the process's: also ours.
        assert records.same_command(rec.argv, rec.argv)
        # Another program at that pid is not.
        assert not records.same_command(["sleep", "301"], rec.argv)
        assert not records.same_command([sys.executable, "-I", "-S", str(launch.LAUNCH)], rec.argv)
        assert _proc_status(rec.pid)["NoNewPrivs"] == "1"
    finally:
        stopped = services.stop("sleeper", timeout=5)
    assert stopped is not None and stopped.pid == rec.pid
    assert _wait(
        lambda: not psutil.pid_exists(rec.pid) or psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert services.record("sleeper") is None

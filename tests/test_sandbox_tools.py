"""Tools in an OS sandbox, as real processes on this machine's kernel: what hostile testing found a
command could do (read the API token, the worker's environment, ~/.ssh; write outside its workspace;
reach the API; leave a setsid'd child running) fails, and what it should do still works."""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from stigmer.agents.tools import ToolConfig
from stigmer.errors import StigmerError
from stigmer.paths import Paths
from stigmer.runner import tools as runner_tools
from stigmer.sandbox import call, launch, linux, rules
from stigmer.sandbox.policy import Limits, Policy
from stigmer.sandbox.system import system_read
from stigmer.tools import shell

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or linux.landlock_abi() < 4,
    reason="needs Linux with Landlock ABI 4 or later (this machine's kernel has 7)",
)
SERVER = Path(__file__).parent / "doubles" / "mcp_faulty_server.py"


@pytest.fixture
def box(isolated_home: Paths, tmp_path: Path) -> dict[str, Path]:
    """A workspace, and secrets where a hostile command would look for them."""
    home = Path(os.environ["HOME"])
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE-KEY")
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text("AWS-SECRET")
    isolated_home.ensure_home()
    (isolated_home.home / "api.token").write_text("API-TOKEN")
    (isolated_home.home / "config.yaml").write_text("llm: {api_key: CONFIG-SECRET}\n")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return {"home": home, "workspace": workspace, "stigmer": isolated_home.home, "outside": tmp_path}


def _run(argv: list[str] | str, workspace: Path, options: Any = None, **kw: Any) -> shell.ShellResult:
    with call.tool_process("shell", options, write=(workspace,), timeout=30) as b:
        return shell.run(
            argv,
            cwd=workspace,
            timeout=30,
            policy=b.policy,
            extra_env=b.env,
            allow_shell_string=isinstance(argv, str),
            **kw,
        )


def test_a_command_cannot_read_secrets(box: dict[str, Path]) -> None:
    for secret, text in [
        (box["stigmer"] / "api.token", "API-TOKEN"),
        (box["stigmer"] / "config.yaml", "CONFIG-SECRET"),
        (box["home"] / ".ssh" / "id_rsa", "PRIVATE-KEY"),
        (box["home"] / ".aws" / "credentials", "AWS-SECRET"),
    ]:
        result = _run(["cat", str(secret)], box["workspace"])
        assert result.exit_code != 0 and "Permission denied" in result.output, secret
        assert text not in result.output
    listing = _run(["ls", str(box["home"])], box["workspace"])
    assert listing.exit_code != 0 and ".ssh" not in listing.output


def test_a_command_cannot_read_the_workers_environment_or_memory(
    box: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STIGMER_LLM_API_KEY", "sk-in-the-worker")  # this process stands for the worker
    me = os.getpid()
    result = _run(f"cat /proc/{me}/environ; head -c 10 /proc/{me}/mem; cat /proc/{me}/maps", box["workspace"])
    assert "sk-in-the-worker" not in result.output
    assert result.output.count("Permission denied") == 3, result.output
    assert "sk-in-the-worker" not in _run(["env"], box["workspace"]).output


def test_writes_only_in_the_workspace_and_its_own_temporary_folder(box: dict[str, Path]) -> None:
    outside = box["outside"] / "escaped.txt"
    result = _run(
        f'echo kept > inside.txt && mkdir -p sub && echo ok > sub/f && cat inside.txt && echo t > "$TMPDIR/t" && '
        f"echo $TMPDIR; echo no > {outside}; echo no > /tmp/stigmer-sandbox-test",
        box["workspace"],
    )
    assert (box["workspace"] / "inside.txt").read_text() == "kept\n"
    assert (box["workspace"] / "sub" / "f").read_text() == "ok\n"
    assert not outside.exists() and not Path("/tmp/stigmer-sandbox-test").exists()
    assert result.output.count("Permission denied") == 2, result.output
    tmp = Path(result.output.splitlines()[1])
    assert tmp.parent == box["stigmer"] / "data" / "tmp" and not tmp.exists()  # removed after the call


@pytest.fixture
def web() -> Iterator[tuple[int, int]]:
    """Two local web servers: the one a tool is granted, and one standing for Stigmer's API."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"hello from {self.server.server_address[1]}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield servers[0].server_address[1], servers[1].server_address[1]
    for s in servers:
        s.shutdown()
        s.server_close()


FETCH = (
    "import sys, urllib.request\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
    "except Exception as e:\n"
    "    print('failed:', e)\n"
)
CONNECT = (
    "import socket, sys\n"
    "for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):\n"
    "    try:\n"
    "        s = socket.socket(socket.AF_INET, kind); s.settimeout(3); s.connect(('127.0.0.1', int(sys.argv[1])))\n"
    "        print('connected', kind)\n"
    "    except OSError as e:\n"
    "        print('refused:', e)\n"
)


def test_no_network_without_the_permission(box: dict[str, Path], web: tuple[int, int]) -> None:
    _, api = web
    result = _run([sys.executable, "-c", CONNECT, str(api)], box["workspace"])
    assert "connected" not in result.output and result.output.count("refused") == 2, result.output


def test_granted_hosts_only_and_only_through_the_proxy(box: dict[str, Path], web: tuple[int, int]) -> None:
    allowed, api = web
    options = {"network": [f"127.0.0.1:{allowed}"]}
    ok = _run([sys.executable, "-c", FETCH, f"http://127.0.0.1:{allowed}/"], box["workspace"], options)
    assert f"hello from {allowed}" in ok.output, ok.output
    other = _run([sys.executable, "-c", FETCH, f"http://127.0.0.1:{api}/"], box["workspace"], options)
    assert "403" in other.output and f"hello from {api}" not in other.output, other.output
    direct = _run([sys.executable, "-c", CONNECT, str(api)], box["workspace"], options)
    assert "connected" not in direct.output and direct.output.count("refused") == 2, direct.output


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_setsid_and_double_forks_end_with_the_call(box: dict[str, Path]) -> None:
    script = (
        "setsid sh -c 'echo $$ > s.pid; exec sleep 300' & "
        "sh -c '(sh -c \"echo \\$\\$ > d.pid; exec sleep 300\" &) ' ; "
        "while [ ! -s s.pid ] || [ ! -s d.pid ]; do sleep 0.05; done; echo started"
    )
    result = _run(script, box["workspace"])
    assert "started" in result.output, result.output
    pids = [int((box["workspace"] / name).read_text()) for name in ("s.pid", "d.pid")]
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids)


def test_system_calls_tools_never_need_are_refused(box: dict[str, Path]) -> None:
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, nr in (('ptrace', 101), ('keyctl', 250), ('bpf', 321), ('unshare', 272), ('mount', 165)):\n"
        "    r = libc.syscall(nr, 0, 0, 0, 0)\n"
        "    print(name, r, ctypes.get_errno())\n"
    )
    if os.uname().machine != "x86_64":
        pytest.skip("the syscall numbers in this test are x86_64's")
    result = _run([sys.executable, "-c", code], box["workspace"])
    for name in ("ptrace", "keyctl", "bpf", "unshare", "mount"):
        assert f"{name} -1 1\n" in result.output + "\n", result.output  # EPERM from the filter
    assert _run(["unshare", "-U", "true"], box["workspace"]).exit_code != 0


def test_rlimits_hold(box: dict[str, Path], tmp_path: Path) -> None:
    policy = Policy(
        name="limits",
        read=system_read(),
        write=(str(box["workspace"]),),
        devices=("/dev/null", "/dev/zero"),
        limits=Limits(memory=256 << 20, file_size=1 << 20),
    )
    code = (
        "import signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "try:\n"
        "    open('big', 'wb').write(b'x' * (2 << 20))\n"
        "except OSError as e:\n"
        "    print('file:', e.strerror)\n"
        "try:\n"
        "    b = bytearray(512 << 20)\n"
        "except MemoryError:\n"
        "    print('memory: refused')\n"
    )
    done = subprocess.run(
        launch.argv_for(policy.to_json(), [sys.executable, "-c", code]),
        cwd=box["workspace"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "file: File too large" in done.stdout and "memory: refused" in done.stdout, (
        done.stdout + done.stderr
    )
    assert (box["workspace"] / "big").stat().st_size <= 1 << 20


def test_require_sandbox_refuses_to_run_without_landlock(tmp_path: Path) -> None:
    """A kernel without Landlock cannot be had here: the launcher is told there is none."""
    src = Path(linux.__file__).resolve().parents[2]
    code = (
        f"import sys; sys.path.insert(0, {str(src)!r})\n"
        "from stigmer.sandbox import linux\n"
        "linux.landlock_abi = lambda: 0\n"
        "for require in (False, True):\n"
        "    try:\n"
        "        print(require, linux.apply({'require': require, 'seccomp': False}).summary())\n"
        "    except linux.SandboxError as e:\n"
        "        print(require, 'refused:', e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=30
    )
    assert "False NOT confined by Landlock" in done.stdout, done.stdout + done.stderr
    assert (
        "True refused: this kernel has no Landlock" in done.stdout and "tools.require_sandbox" in done.stdout
    )


def test_a_policy_that_cannot_be_applied_never_runs_the_command(box: dict[str, Path]) -> None:
    policy = Policy(name="bad", read=system_read(), write=(str(box["workspace"]),), bind=(70000,))
    done = subprocess.run(
        launch.argv_for(policy.to_json(), ["touch", "ran"]),
        cwd=box["workspace"],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 126 and "cannot sandbox" in done.stderr and not (box["workspace"] / "ran").exists()
    )


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"paths": {"rw": ["{stigmer}"]}}, "Stigmer's home"),
        ({"paths": {"ro": ["{stigmer}/data"]}}, "Stigmer's home"),
        ({"paths": {"ro": ["~"]}}, "keeps secrets"),
        ({"paths": {"rw": ["relative/dir"]}}, "absolute"),
        ({"paths": {"rw": ["/x"] * 65}}, "at most 64"),
        ({"paths": "~/x"}, "mapping"),
        ({"network": ["evil.com/path"]}, "not a host"),
        ({"network": "everything"}, "list of at most"),
        ({"networks": []}, "unknown option"),
        ("yes", "is a mapping"),
    ],
)
def test_bad_or_secret_grants_are_refused(
    isolated_home: Paths, options: Any, says: str, tmp_path: Path
) -> None:
    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{stigmer}", str(isolated_home.home))
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    from stigmer.agents.spec import parse_yaml

    text = f"name: a\ninstructions: x\ntools:\n  - shell: {{sandbox: {_yaml(fill(options))}}}\n"
    with pytest.raises(StigmerError) as caught:
        parse_yaml(text)
    assert says in caught.value.message
    with pytest.raises(rules.SandboxOptionError):
        rules.grants(fill(options), stigmer_home=isolated_home.home)


def _yaml(value: Any) -> str:
    import json

    return json.dumps(value)  # JSON is YAML


def test_a_secret_folder_named_on_purpose_is_granted(box: dict[str, Path]) -> None:
    """~/.aws itself may be granted (an aws tool needs it); ~ as a whole may not."""
    granted = _run(
        ["cat", str(box["home"] / ".aws" / "credentials")], box["workspace"], {"paths": {"ro": ["~/.aws"]}}
    )
    assert "AWS-SECRET" in granted.output
    assert (
        "PRIVATE-KEY"
        not in _run(
            ["cat", str(box["home"] / ".ssh" / "id_rsa")], box["workspace"], {"paths": {"ro": ["~/.aws"]}}
        ).output
    )


# -- MCP servers ------------------------------------------------------------------------------------
def test_a_hostile_mcp_server_is_confined(box: dict[str, Path], web: tuple[int, int]) -> None:
    allowed = box["outside"] / "granted"
    allowed.mkdir()
    config = ToolConfig(
        kind="mcp",
        approval="never",
        timeout=30,
        retries=0,
        options={
            "command": [sys.executable, str(SERVER), "serve"],
            "sandbox": {"paths": {"rw": [str(allowed)]}},
        },
        name="faulty",
    )
    me = os.getpid()
    attempts = [
        ("read", str(box["stigmer"] / "api.token")),
        ("read", str(box["home"] / ".ssh" / "id_rsa")),
        ("read", f"/proc/{me}/environ"),
        ("write", str(box["outside"] / "escaped.txt")),
        ("connect", f"127.0.0.1:{web[1]}"),
        ("write", str(allowed / "notes.txt")),
    ]

    async def body() -> list[str]:
        from pydantic_ai import RunContext
        from pydantic_ai.models.test import TestModel
        from pydantic_ai.usage import RunUsage

        ctx = RunContext(deps=None, model=TestModel(), usage=RunUsage())
        toolset = runner_tools.mcp_toolset(config)
        out = []
        try:
            async with toolset:
                offered = await toolset.get_tools(ctx)
                for kind, target in attempts:
                    args = {"kind": kind, "target": target}
                    out.append(
                        str(await toolset.call_tool("faulty_attempt", args, ctx, offered["faulty_attempt"]))
                    )
        finally:
            await runner_tools.close_servers()
        return out

    results = asyncio.run(body())
    assert all(r.startswith("refused") for r in results[:5]), results
    assert results[5] == "ok: written" and (allowed / "notes.txt").exists()
    assert not (box["outside"] / "escaped.txt").exists()


def test_the_policy_is_described_for_the_record(box: dict[str, Path]) -> None:
    line = call.describe("shell", {"network": ["pypi.org"]}, write=(box["workspace"],), timeout=60)
    assert line.startswith("shell: [landlock ") and str(box["workspace"]) in line
    assert "network: pypi.org" in line and "landlock" in line and "seccomp" in line
    assert "no network" in call.describe("shell", None, write=(box["workspace"],), timeout=60)
    refused = call.describe(
        "shell", {"paths": {"rw": [str(box["stigmer"])]}}, write=(box["workspace"],), timeout=60
    )
    assert "refused" in refused


def test_without_a_guardian_the_platform_confines_or_says_why(box: dict[str, Path]) -> None:
    """macOS: sandbox-exec with the policy's profile; missing there, the command runs unconfined unless
    tools.require_sandbox; Linux leaves it to the guardian."""
    with call.tool_process("shell", None, write=(box["workspace"],), timeout=30) as b:
        policy = b.policy
    assert policy is not None
    assert call.confined_argv(["ls"], policy, platform="linux") == ["ls"]
    if os.path.exists("/usr/bin/sandbox-exec"):
        pytest.skip("this machine has sandbox-exec")
    assert call.confined_argv(["ls"], policy, platform="darwin") == ["ls"]
    import dataclasses

    with pytest.raises(rules.SandboxOptionError, match="require_sandbox"):
        call.confined_argv(["ls"], dataclasses.replace(policy, require=True), platform="darwin")

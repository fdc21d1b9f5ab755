"""The built-in agent tools, run for real: a workspace on disk, commands in subprocesses, pages from a
local HTTP server on 127.0.0.1. Only DNS is faked (the one boundary not reachable from here), through
http_fetch._resolve.

Every escape a model (or a page it read) could try is normal input here: each must fail with a
ToolFailure, and nothing outside the workspace may be read, created or changed.
"""

from __future__ import annotations

import gzip
import ipaddress
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from stigmer.errors import StigmerError
from stigmer.tools import http_fetch, shell, workspace
from stigmer.tools.errors import ToolFailure
from stigmer.tools.http_fetch import fetch, is_public, parse_allow_entry
from stigmer.tools.workspace import Workspace

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX processes and symlinks")


# -- workspace ---------------------------------------------------------------------------------------


@pytest.fixture(params=["descriptors", "paths"])
def ws(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A workspace, run both ways: descriptor walks (POSIX) and the path-checking fallback (Windows)."""
    if request.param == "paths":
        monkeypatch.setattr(workspace, "_FD_SAFE", False)
    elif not workspace._FD_SAFE:
        pytest.skip("this platform has no descriptor-relative calls")
    return Workspace(tmp_path / "ws")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the workspace holding a secret: nothing may reach it through the workspace."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("TOP SECRET\n")
    return folder


def test_root_is_created_private_and_resolved(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "a" / "b")
    assert ws.root == Path(os.path.realpath(tmp_path / "a" / "b"))
    if os.name != "nt":
        assert stat.S_IMODE(ws.root.stat().st_mode) == 0o700
    with pytest.raises(ValueError, match="filesystem root"):
        Workspace(Path("/"))


def test_write_read_list_search(ws: Workspace) -> None:
    assert ws.write("notes/todo.md", "buy milk\nfix the roof\n") == "created notes/todo.md (22 bytes)"
    assert ws.write("notes/todo.md", "buy milk\nfix the ROOF\n").startswith("replaced notes/todo.md")
    ws.write("a.txt", "roof one\n")
    assert ws.read("notes/todo.md") == "buy milk\nfix the ROOF\n"
    assert ws.read("./notes//todo.md") == "buy milk\nfix the ROOF\n"
    assert ws.list() == ["a.txt", "notes/"]
    assert ws.list(recursive=True) == ["a.txt", "notes/", "notes/todo.md"]
    assert ws.list("notes") == ["notes/todo.md"]
    assert ws.search("ROOF") == ["notes/todo.md:2: fix the ROOF"]
    assert ws.search("roof") == ["a.txt:1: roof one"]
    assert ws.search("(?i)ro+f", regex=True) == ["a.txt:1: roof one", "notes/todo.md:2: fix the ROOF"]
    assert ws.search("milk", "notes/todo.md") == ["notes/todo.md:1: buy milk"]
    assert ws.search("nowhere") == []


def test_list_limit_and_search_limit_say_so(ws: Workspace) -> None:
    for i in range(12):
        ws.write(f"f{i:02}.txt", "hit\n" * 3)
    listed = ws.list(limit=5)
    assert len(listed) == 6 and listed[-1].startswith("[stopped after 5 entries")
    found = ws.search("hit", max_results=4)
    assert len(found) == 5 and found[-1] == "[stopped at 4 results]"


def test_errors_the_model_can_act_on(ws: Workspace) -> None:
    ws.write("dir/f.txt", "x")
    with pytest.raises(ToolFailure, match="no such file"):
        ws.read("missing.txt")
    with pytest.raises(ToolFailure, match="is a folder"):
        ws.read("dir")
    with pytest.raises(ToolFailure, match="is a folder"):
        ws.write("dir", "x")
    with pytest.raises(ToolFailure, match="is a file, not a folder"):
        ws.list("dir/f.txt")
    with pytest.raises(ToolFailure, match="not a folder"):
        ws.write("dir/f.txt/under", "x")
    with pytest.raises(ToolFailure, match="workspace folder itself"):
        ws.read(".")
    with pytest.raises(ToolFailure, match="give the path of a file"):
        ws.write("", "x")


ESCAPES = [
    "../x",
    "../../etc/passwd",
    "notes/../../x",
    "a/./../..",
    "..",
    "..\\x",
    "a\\..\\..\\x",
    "/etc/passwd",
    "\\etc\\passwd",
    "~/.ssh/id_rsa",
    "~",
    "~root/.bashrc",
    "C:\\Windows\\win.ini",
    "c:x",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_escapes_are_refused_by_every_operation(ws: Workspace, path: str, tmp_path: Path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    for call in (
        lambda: ws.read(path),
        lambda: ws.write(path, "pwned"),
        lambda: ws.list(path),
        lambda: ws.search("root", path),
    ):
        with pytest.raises(ToolFailure, match="path escapes the workspace"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing was created next to it


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("a\x00b", "NUL byte"),
        ("a" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("a/" * 2100, "longer than 4096 bytes"),
        ("\ud800", "not valid text"),
    ],
)
def test_hostile_names_are_refused_clearly(ws: Workspace, path: str, message: str) -> None:
    for call in (lambda: ws.read(path), lambda: ws.write(path, "x"), lambda: ws.list(path)):
        with pytest.raises(ToolFailure, match=message):
            call()


def test_a_long_name_under_the_limit_works(ws: Workspace) -> None:
    name = "n" * 200
    ws.write(f"{name}/{name}", "deep")
    assert ws.read(f"{name}/{name}") == "deep"


@posix_only
def test_symlink_to_etc_is_refused(ws: Workspace) -> None:
    os.symlink("/etc", ws.root / "etc")
    for call in (lambda: ws.read("etc/passwd"), lambda: ws.list("etc"), lambda: ws.search("root", "etc")):
        with pytest.raises(ToolFailure, match="path escapes the workspace"):
            call()
    assert ws.list() == ["etc"]  # listed by name, never followed
    assert ws.search("root") == []  # the walk does not follow it either


@posix_only
def test_symlinked_folder_pointing_out_is_refused(ws: Workspace, outside: Path) -> None:
    os.symlink(outside, ws.root / "out")
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        ws.read("out/secret.txt")
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        ws.write("out/planted.txt", "pwned")
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        ws.write("out/new/deeper.txt", "pwned")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


@posix_only
def test_symlinked_file_pointing_out_is_refused(ws: Workspace, outside: Path) -> None:
    os.symlink(outside / "secret.txt", ws.root / "link.txt")
    os.symlink(outside / "not-yet.txt", ws.root / "dangling.txt")
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        ws.read("link.txt")
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        ws.write("link.txt", "pwned")
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        ws.write("dangling.txt", "pwned")  # would create a file outside
    assert (outside / "secret.txt").read_text() == "TOP SECRET\n"
    assert not (outside / "not-yet.txt").exists()


@posix_only
def test_symlinks_that_stay_inside_are_followed(ws: Workspace) -> None:
    ws.write("real/file.txt", "inside")
    os.symlink("real", ws.root / "alias")
    os.symlink("real/file.txt", ws.root / "file-link")
    assert ws.read("alias/file.txt") == "inside"
    assert ws.read("file-link") == "inside"
    ws.write("alias/new.txt", "via the link")
    assert (ws.root / "real" / "new.txt").read_text() == "via the link"
    ws.write("file-link", "replaced through the link")
    assert (ws.root / "real" / "file.txt").read_text() == "replaced through the link"
    assert (ws.root / "file-link").is_symlink()  # the link itself is left as it was
    assert ws.list("alias") == ["alias/file.txt", "alias/new.txt"]


@posix_only
def test_a_symlink_loop_is_refused(ws: Workspace) -> None:
    os.symlink("loop", ws.root / "loop")
    with pytest.raises(ToolFailure, match="loop"):
        ws.read("loop")


@posix_only
@pytest.mark.parametrize("op", ["read", "write", "list"])
def test_a_folder_swapped_for_a_symlink_after_the_check_is_refused(
    ws: Workspace, outside: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """The race: the path is checked, then (before the open) a folder on it becomes a link outside."""
    ws.write("sub/secret.txt", "inside")
    checked = Workspace._resolve

    def check_then_swap(self: Workspace, path: str) -> tuple[str, list[str], list[str]]:
        result = checked(self, path)
        shutil.rmtree(self.root / "sub")
        os.symlink(outside, self.root / "sub")  # what the agent's shell command could do meanwhile
        return result

    monkeypatch.setattr(Workspace, "_resolve", check_then_swap)
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        if op == "read":
            ws.read("sub/secret.txt")
        elif op == "write":
            ws.write("sub/planted.txt", "pwned")
        else:
            ws.list("sub")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "TOP SECRET\n"


@posix_only
@pytest.mark.parametrize("op", ["read", "write"])
def test_the_nofollow_walk_alone_catches_a_swap(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """Without the after-open location check (as where /proc is not mounted), O_NOFOLLOW still holds."""
    if not workspace._FD_SAFE:
        pytest.skip("this platform has no descriptor walk")
    ws = Workspace(tmp_path / "ws")
    monkeypatch.setattr(workspace, "_fd_path", lambda fd: None)
    ws.write("sub/secret.txt", "inside")
    checked = Workspace._resolve

    def check_then_swap(self: Workspace, path: str) -> tuple[str, list[str], list[str]]:
        result = checked(self, path)
        shutil.rmtree(self.root / "sub")
        os.symlink(outside, self.root / "sub")
        return result

    monkeypatch.setattr(Workspace, "_resolve", check_then_swap)
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        ws.read("sub/secret.txt") if op == "read" else ws.write("sub/planted.txt", "pwned")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


@posix_only
def test_a_file_swapped_for_a_symlink_after_the_check_is_refused(
    ws: Workspace, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws.write("f.txt", "inside")
    checked = Workspace._resolve

    def check_then_swap(self: Workspace, path: str) -> tuple[str, list[str], list[str]]:
        result = checked(self, path)
        os.unlink(self.root / "f.txt")
        os.symlink(outside / "secret.txt", self.root / "f.txt")
        return result

    monkeypatch.setattr(Workspace, "_resolve", check_then_swap)
    with pytest.raises(ToolFailure, match="path escapes the workspace"):
        ws.read("f.txt")


@posix_only
def test_a_write_onto_a_swapped_in_link_replaces_the_link_not_its_target(
    ws: Workspace, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws.write("f.txt", "inside")
    checked = Workspace._resolve

    def check_then_swap(self: Workspace, path: str) -> tuple[str, list[str], list[str]]:
        result = checked(self, path)
        os.unlink(self.root / "f.txt")
        os.symlink(outside / "secret.txt", self.root / "f.txt")
        return result

    monkeypatch.setattr(Workspace, "_resolve", check_then_swap)
    ws.write("f.txt", "new")
    assert (outside / "secret.txt").read_text() == "TOP SECRET\n"
    assert not (ws.root / "f.txt").is_symlink()


def test_binary_files_are_refused_with_a_description(ws: Workspace) -> None:
    (ws.root / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(2000))
    (ws.root / "noise.bin").write_bytes(bytes(range(128, 256)) * 40)  # no NUL, not UTF-8 either
    with pytest.raises(ToolFailure, match=r"img.png is a binary file \(2016 bytes\)"):
        ws.read("img.png")
    with pytest.raises(ToolFailure, match="binary file"):
        ws.read("noise.bin")
    assert ws.search("PNG") == []  # search skips binary files


def test_text_that_is_not_quite_utf8_still_reads(ws: Workspace) -> None:
    (ws.root / "latin1.txt").write_bytes("café au lait, ".encode("latin-1") * 50)
    assert ws.read("latin1.txt").startswith("caf\ufffd au lait")
    (ws.root / "utf16.txt").write_bytes("hello".encode("utf-16"))
    assert ws.read("utf16.txt") == "hello"


def test_a_huge_file_is_read_truncated(ws: Workspace) -> None:
    line = "0123456789" * 9 + "é\n"  # a two-byte character to cut through
    (ws.root / "big.txt").write_text(line * 40_000, encoding="utf-8")  # 3.7 MB
    size = (ws.root / "big.txt").stat().st_size
    text = ws.read("big.txt")
    body, note = text.rsplit("\n[truncated: ", 1)
    assert len(body.encode()) <= 1_000_000 and body == (line * 40_000)[: len(body)]
    assert f"first 1000000 of {size} bytes" in note
    small = ws.read("big.txt", max_bytes=91)  # ends in the middle of "é": that character is dropped
    assert small.split("\n[truncated")[0] == "0123456789" * 9


@posix_only
def test_a_fifo_is_refused_and_never_blocks(ws: Workspace) -> None:
    os.mkfifo(ws.root / "pipe")
    started = time.monotonic()
    with pytest.raises(ToolFailure, match="not a regular file"):
        ws.read("pipe")
    assert ws.search("x") == []
    assert time.monotonic() - started < 5


def test_write_is_atomic_when_it_fails(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    ws.write("keep.txt", "old content")

    def disk_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])  # half of it made it to disk...
        raise OSError(28, "No space left on device")  # ...then the disk filled up

    monkeypatch.setattr(workspace, "_write_all", disk_full)
    with pytest.raises(ToolFailure, match="keep.txt: no space left on the disk"):
        ws.write("keep.txt", "new content " * 1000)
    with pytest.raises(ToolFailure, match="no space left"):
        ws.write("fresh.txt", "new content")
    assert (ws.root / "keep.txt").read_text() == "old content"
    assert sorted(os.listdir(ws.root)) == ["keep.txt"]  # no partial file, no temporary file left


def test_write_limits_and_mode(ws: Workspace) -> None:
    with pytest.raises(ToolFailure, match="content is 11 bytes; the limit is 10 bytes"):
        ws.write("big.txt", "x" * 11, max_bytes=10)
    assert not (ws.root / "big.txt").exists()
    with pytest.raises(ToolFailure, match="unpaired surrogate"):
        ws.write("bad.txt", "\ud800")
    if os.name != "nt":
        ws.write("run.sh", "echo hi\n")
        os.chmod(ws.root / "run.sh", 0o751)
        ws.write("run.sh", "echo hello\n")
        assert stat.S_IMODE((ws.root / "run.sh").stat().st_mode) == 0o751  # replacing keeps the mode


def test_search_rules(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    ws.write("a.txt", "x" * 40 + "\n")
    with pytest.raises(ToolFailure, match="limit is 500"):
        ws.search("a" * 501)
    with pytest.raises(ToolFailure, match="invalid regular expression"):
        ws.search("(unclosed", regex=True)
    assert ws.search("(unclosed") == []  # as plain text it is fine
    with pytest.raises(ToolFailure, match="give the text"):
        ws.search("")
    monkeypatch.setattr(workspace, "SEARCH_MAX_FILE_BYTES", 10)
    ws.write("b.txt", "x\n")
    assert ws.search("x") == ["b.txt:1: x", "[skipped 1 files larger than 10 bytes]"]


def test_a_catastrophic_regex_is_stopped(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """(a+)+$ backtracks for ages on a line of a's ending in "!": it runs in a child that is killed."""
    monkeypatch.setattr(workspace, "REGEX_TIMEOUT", 1.0)
    ws.write("evil.txt", "a" * 40 + "!\n")
    started = time.monotonic()
    with pytest.raises(ToolFailure, match="took longer than 1s"):
        ws.search("(a+)+$", regex=True)
    assert time.monotonic() - started < 10


def test_for_agent_default_and_named_folders(tmp_path: Path) -> None:
    data = tmp_path / "stigmer-home" / "data"
    default = Workspace.for_agent(data, "poet", None)
    assert default.root == Path(os.path.realpath(data / "workspace" / "poet"))
    assert Workspace.for_agent(data, "poet", "shared").root == Path(os.path.realpath(data / "shared"))
    home = Path.home()  # the test's temp home (conftest)
    assert Workspace.for_agent(data, "poet", "~/work/poet").root == Path(
        os.path.realpath(home / "work" / "poet")
    )
    absolute = tmp_path / "elsewhere"
    assert Workspace.for_agent(data, "poet", str(absolute)).root == Path(os.path.realpath(absolute))


@pytest.mark.parametrize(
    ("folder", "what"),
    [
        ("/", "the whole file system"),
        ("~", "your home folder"),
        ("~/", "your home folder"),
        ("..", "Stigmer's data folder"),  # relative to the data folder: its parent holds it
        (".", "Stigmer's data folder"),
        ("../..", "your home folder"),
    ],
)
def test_for_agent_refuses_folders_that_expose_too_much(tmp_path: Path, folder: str, what: str) -> None:
    data = Path.home() / ".stigmer" / "data"  # as by default: inside the home
    with pytest.raises(StigmerError, match=what):
        Workspace.for_agent(data, "poet", folder)


def test_for_agent_refuses_a_home_ancestor_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(StigmerError, match="your home folder"):
        Workspace.for_agent(tmp_path / "d", "poet", str(Path.home().parent))
    for name in ("../evil", "a/b", "", ".hidden", "x" * 64):
        with pytest.raises(StigmerError, match="cannot name a workspace folder"):
            Workspace.for_agent(tmp_path / "d", name, None)


# -- shell -------------------------------------------------------------------------------------------


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    return Workspace(tmp_path / "shell-ws").root


def _gone(pid: int) -> bool:
    """No such process, or a zombie (an init that does not reap, as in some containers, keeps those)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_echo(cwd: Path) -> None:
    result = shell.run(["echo", "hello", "world"], cwd=cwd, timeout=10)
    assert result == shell.ShellResult(exit_code=0, output="hello world\n", timed_out=False, truncated=False)
    failing = shell.run(
        [sys.executable, "-c", "import sys; print('oops', file=sys.stderr); sys.exit(3)"], cwd=cwd, timeout=10
    )
    assert (failing.exit_code, failing.output) == (3, "oops\n")  # stderr is in the output


def test_stdout_and_stderr_are_interleaved(cwd: Path) -> None:
    code = "import sys\nfor i in range(3):\n    print('out', i, flush=True); print('err', i, file=sys.stderr, flush=True)"
    result = shell.run([sys.executable, "-c", code], cwd=cwd, timeout=10)
    assert result.output.splitlines() == ["out 0", "err 0", "out 1", "err 1", "out 2", "err 2"]


@posix_only
def test_an_error_while_reading_leaves_nothing_running(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []

    def broken(proc: subprocess.Popen[bytes], out: object, deadline: float) -> bool:
        started.append(proc.pid)
        raise RuntimeError("a bug in the reader")

    monkeypatch.setattr(shell, "_run_posix", broken)
    with pytest.raises(RuntimeError, match="a bug in the reader"):
        shell.run(["sleep", "100"], cwd=cwd, timeout=30)
    assert _gone(started[0])


def test_a_shell_string_is_refused_unless_allowed(cwd: Path) -> None:
    with pytest.raises(ToolFailure, match="list of arguments"):
        shell.run("echo hi | tr h H", cwd=cwd, timeout=10)
    assert shell.run("echo hi | tr h H", cwd=cwd, timeout=10, allow_shell_string=True).output == "Hi\n"
    assert shell.command_argv("echo $HOME", allow_shell_string=True) == ["sh", "-c", "echo $HOME"]
    with pytest.raises(ToolFailure, match="NUL byte"):
        shell.command_argv("echo a\x00b", allow_shell_string=True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "non-empty list"),
        (["echo", "a\x00b"], "NUL byte"),
        (["echo", "\ud800"], "not valid text"),
        ([1, 2], "every argument must be text"),
        ([""], "program name"),
        ({"cmd": "ls"}, "list of arguments"),
        (["no-such-program-xyz"], "command not found: 'no-such-program-xyz'"),
    ],
)
def test_bad_commands_fail_clearly(cwd: Path, argv: object, message: str) -> None:
    with pytest.raises(ToolFailure, match=message):
        shell.run(argv, cwd=cwd, timeout=10)  # type: ignore[arg-type]  # hostile input on purpose


def test_cwd_is_the_workspace_and_stdin_is_empty(cwd: Path) -> None:
    assert (
        shell.run([sys.executable, "-c", "import os; print(os.getcwd())"], cwd=cwd, timeout=10).output
        == f"{cwd}\n"
    )
    started = time.monotonic()
    result = shell.run(["cat"], cwd=cwd, timeout=20)  # would wait forever on a terminal
    assert (result.output, result.exit_code, result.timed_out) == ("", 0, False)
    assert time.monotonic() - started < 5


def test_secrets_never_reach_the_command(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "STIGMER_LLM_API_KEY": "sk-llm-1111",
        "STIGMER_API_TOKEN": "tok-2222",
        "OPENAI_API_KEY": "sk-open-3333",
        "HF_TOKEN": "hf_4444",
        "AWS_SECRET_ACCESS_KEY": "aws-5555",
        "GITHUB_TOKEN": "ghp_6666",
        "DB_PASSWORD": "pw-7777",
        "HTTPS_PROXY": "http://user:pw-8888@proxy.example:3128",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    output = shell.run(["env"], cwd=cwd, timeout=10).output
    for name, value in secrets.items():
        assert value not in output and f"{name}=" not in output
    assert f"PATH={os.environ['PATH']}" in output.splitlines()
    assert "HTTP_PROXY=http://proxy.example:3128" in output.splitlines()  # no password: passed on
    assert "LC_ALL=C.UTF-8" in output.splitlines()
    assert "GIT_TERMINAL_PROMPT=0" in output.splitlines()


def test_an_explicit_environ_is_filtered_too(cwd: Path) -> None:
    environ = {"PATH": os.environ["PATH"], "MY_API_KEY": "k-9999", "HOME": str(cwd), "RANDOM_THING": "x"}
    output = shell.run(["env"], cwd=cwd, timeout=10, environ=environ).output
    assert "k-9999" not in output and "RANDOM_THING" not in output and f"HOME={cwd}" in output


@posix_only
def test_timeout_kills_the_whole_group(cwd: Path) -> None:
    started = time.monotonic()
    result = shell.run(["sh", "-c", 'echo "$$"; sleep 100 & echo "$!"; sleep 100'], cwd=cwd, timeout=1)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code < 0
    assert "[timed out after 1s" in result.output
    leader, background = (int(line) for line in result.output.splitlines()[:2])
    assert _gone(leader) and _gone(background)
    assert elapsed < 1 + shell.TERM_GRACE + shell.DRAIN_AFTER_EXIT + 2


@posix_only
def test_a_command_that_ignores_sigterm_is_killed(cwd: Path) -> None:
    started = time.monotonic()
    result = shell.run(["sh", "-c", "trap '' TERM; echo $$; sleep 100 & wait"], cwd=cwd, timeout=1)
    assert result.timed_out
    assert _gone(int(result.output.splitlines()[0]))
    assert time.monotonic() - started < 1 + shell.TERM_GRACE + shell.DRAIN_AFTER_EXIT + 2


@posix_only
@pytest.mark.parametrize("holds_output", [True, False])
def test_background_processes_are_stopped_when_the_command_exits(cwd: Path, holds_output: bool) -> None:
    redirect = "" if holds_output else " >/dev/null 2>&1"
    started = time.monotonic()
    result = shell.run(["sh", "-c", f'sleep 100{redirect} & echo "$!"'], cwd=cwd, timeout=30)
    assert not result.timed_out and result.exit_code == 0
    assert _gone(int(result.output.split()[0]))
    assert time.monotonic() - started < shell.TERM_GRACE + shell.DRAIN_AFTER_EXIT + 3


def test_fifty_megabytes_of_output_are_cut(cwd: Path) -> None:
    code = "import sys\nw = sys.stdout.write\nw('START')\nfor _ in range(50): w('x' * 1_000_000)\nw('END')"
    started = time.monotonic()
    result = shell.run([sys.executable, "-c", code], cwd=cwd, timeout=60, max_output=10_000)
    assert time.monotonic() - started < 20
    assert result.truncated and not result.timed_out and result.exit_code == 0
    assert result.output.startswith("START" + "x" * 4995) and result.output.endswith("x" * 4997 + "END")
    assert f"[... {50_000_008 - 10_000} bytes of output omitted ...]" in result.output
    assert len(result.output) < 10_100


def test_output_just_under_the_limit_is_whole(cwd: Path) -> None:
    result = shell.run([sys.executable, "-c", "print('y' * 99, end='')"], cwd=cwd, timeout=10, max_output=99)
    assert (result.output, result.truncated) == ("y" * 99, False)


def test_platform_choice() -> None:
    assert shell.popen_options("win32") == {"creationflags": 0x00000200}  # CREATE_NEW_PROCESS_GROUP
    assert shell.popen_options("linux") == {"start_new_session": True}
    assert shell.popen_options("darwin") == {"start_new_session": True}


# -- http fetch ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    seen: list[str]  # set per server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append(self.path)
        path = self.path.split("://", 1)[-1].split("/", 1)[-1]  # as a proxy, the path is a full URL
        if path == "text":
            self._send(200, "text/plain; charset=utf-8", b"hello from the test server")
        elif path == "latin1":
            self._send(200, "text/html; charset=iso-8859-1", "café".encode("latin-1"))
        elif path == "big":
            self._send(200, "text/plain", b"a" * 5_000_000)
        elif path == "png":
            self._send(200, "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 5000)
        elif path == "nul":
            self._send(200, "", b"\x00\x01\x02" * 100)
        elif path == "bomb":
            self._send(200, "text/plain", gzip.compress(b"\0" * 50_000_000, 9), encoding="gzip")
        elif path == "gz":
            self._send(200, "text/plain", gzip.compress(b"zipped text"), encoding="gzip")
        elif path == "out":
            self._redirect("http://evil.example/steal")
        elif path == "to-text":
            self._redirect("/text")
        elif path == "loop":
            self._redirect("/loop")
        elif path == "to-file":
            self._redirect("file:///etc/passwd")
        elif path == "slow":
            time.sleep(3)
            self._send(200, "text/plain", b"late")
        elif path == "host":
            self._send(200, "text/plain", str(self.headers.get("Host")).encode())
        else:
            self._send(404, "text/plain", b"not found")

    def _send(self, status: int, content_type: str, body: bytes, encoding: str = "") -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading at its limit, as it should

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server:
    def __init__(self) -> None:
        self.seen: list[str] = []
        handler = type("Handler", (_Handler,), {"seen": self.seen})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path}"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """DNS that must not be asked (for refusals that need no lookup); records what was asked."""
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        asked.append(host)
        raise AssertionError(f"DNS was asked for {host}")

    monkeypatch.setattr(http_fetch, "_resolve", resolve)
    return asked


def _dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    real = http_fetch._resolve

    def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        if host in answers:
            return [ipaddress.ip_address(a) for a in answers[host]]
        return real(host, port)

    monkeypatch.setattr(http_fetch, "_resolve", resolve)


def test_an_allowed_address_with_its_port_works(server: _Server) -> None:
    result = fetch(server.url("text"), allow=[f"127.0.0.1:{server.port}"])
    assert result.status == 200
    assert result.content_type == "text/plain; charset=utf-8"
    assert result.text == "hello from the test server" and not result.truncated
    assert result.url == server.url("text")
    assert (
        fetch(server.url("missing"), allow=[f"127.0.0.1:{server.port}"]).status == 404
    )  # an answer, not an error
    assert fetch(server.url("latin1"), allow=[f"127.0.0.1:{server.port}"]).text == "café"
    assert fetch(server.url("gz"), allow=[f"127.0.0.1:{server.port}"]).text == "zipped text"


def _pinned_only(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    """Our check resolves names from `answers`; any other lookup of a name (httpx resolving it again,
    after the check) fails the test: the connection must go to the address that was checked."""
    import socket

    real = socket.getaddrinfo

    def numeric_only(host: object, *args: object, **kwargs: object) -> object:
        try:
            ipaddress.ip_address(str(host))
        except ValueError:
            raise AssertionError(f"{host} was resolved again after the check") from None
        return real(host, *args, **kwargs)  # type: ignore[arg-type]  # passing through as given

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)
    _dns(monkeypatch, answers)


def test_localhost_allowed_with_its_port_works_and_sends_the_name(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pinned_only(
        monkeypatch, {"localhost": ["::1", "127.0.0.1"]}
    )  # ::1 is tried first; nothing listens there
    result = fetch(server.url("host", host="localhost"), allow=[f"localhost:{server.port}"])
    assert result.text == f"localhost:{server.port}"  # the name in Host, though the address was pinned


def test_hosts_not_allowed_are_refused_before_any_request(server: _Server, no_dns: list[str]) -> None:
    cases = [
        (server.url("text"), ["docs.python.org"]),
        (server.url("text"), ["127.0.0.1"]),  # the port is not the default one: must be listed
        (server.url("text"), [f"127.0.0.1:{server.port + 1}"]),
        (server.url("text"), [f"localhost:{server.port}"]),  # the name does not allow the address
        (server.url("text", host="localhost"), [f"127.0.0.1:{server.port}"]),
        (server.url("text", host="127.1"), [f"127.0.0.1:{server.port}"]),  # odd spellings are other hosts
        (server.url("text", host="2130706433"), [f"127.0.0.1:{server.port}"]),
        ("http://evil.example/", ["example"]),
        ("http://example.com/", ["*.example.com"]),
        ("http://evilexample.com/", ["*.example.com"]),
        ("http://example.com.evil.net/", ["example.com"]),
    ]
    for url, allow in cases:
        with pytest.raises(ToolFailure, match="is not in this agent's allow list"):
            fetch(url, allow=allow)
    assert server.seen == [] and no_dns == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://127.0.0.1/x", "only http and https"),
        ("javascript:alert(1)", "only http and https"),
        ("127.0.0.1/x", "only http and https"),
        ("http://user:pass@127.0.0.1:8080/", "user name or password"),
        ("http://allowed.example\\@evil.example/", "user name or password"),
        ("http://evil.example\\.allowed.example/", "not a valid host"),
        ("http://127.0.0.1:99999/", "port must be a number"),
        ("http://exa mple.com/", "spaces or control characters"),
        ("http://example.com/\r\nX-Injected: 1", "spaces or control characters"),
        ("http://[fe80::1%25eth0]:8080/", "not a valid host"),
        ("http:///nohost", "not a valid host"),
        ("http://example.com/" + "a" * 9000, "longer than 8192"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str, no_dns: list[str]) -> None:
    with pytest.raises(ToolFailure, match=message):
        fetch(url, allow=["example.com", "allowed.example", "127.0.0.1:8080", "[fe80::1]:8080"])


def test_a_redirect_to_a_host_not_allowed_is_refused(server: _Server, no_dns: list[str]) -> None:
    with pytest.raises(ToolFailure, match="evil.example is not in this agent's allow list"):
        fetch(server.url("out"), allow=[f"127.0.0.1:{server.port}"])
    assert server.seen == ["/out"]  # the redirect was not followed
    with pytest.raises(ToolFailure, match="only http and https"):
        fetch(server.url("to-file"), allow=[f"127.0.0.1:{server.port}"])


def test_redirects_within_the_allow_list_are_followed_up_to_five(server: _Server) -> None:
    result = fetch(server.url("to-text"), allow=[f"127.0.0.1:{server.port}"])
    assert (result.text, result.url) == ("hello from the test server", server.url("text"))
    server.seen.clear()
    with pytest.raises(ToolFailure, match="more than 5 redirects"):
        fetch(server.url("loop"), allow=[f"127.0.0.1:{server.port}"])
    assert len(server.seen) == 6


def test_the_body_is_cut_at_max_bytes(server: _Server) -> None:
    result = fetch(server.url("big"), allow=[f"127.0.0.1:{server.port}"], max_bytes=1000)
    assert result.truncated
    assert result.text == "a" * 1000 + "\n[truncated: only the first 1000 bytes were read]"


def test_a_compression_bomb_is_cut_too(server: _Server) -> None:
    started = time.monotonic()
    result = fetch(server.url("bomb"), allow=[f"127.0.0.1:{server.port}"], max_bytes=10_000)
    assert result.truncated and result.text.startswith("\0" * 10_000)
    assert time.monotonic() - started < 10


def test_binary_content_is_described_not_returned(server: _Server) -> None:
    result = fetch(server.url("png"), allow=[f"127.0.0.1:{server.port}"])
    assert result.text == "[binary content (image/png, 5008 bytes); not shown: this tool returns text only]"
    assert "PNG" not in result.text and not result.truncated
    sniffed = fetch(server.url("nul"), allow=[f"127.0.0.1:{server.port}"])
    assert sniffed.text.startswith("[binary content") and "\x00" not in sniffed.text


def test_a_slow_server_times_out(server: _Server) -> None:
    started = time.monotonic()
    with pytest.raises(ToolFailure, match="timed out after 0.5s"):
        fetch(server.url("slow"), allow=[f"127.0.0.1:{server.port}"], timeout=0.5)
    assert time.monotonic() - started < 2.5


def test_a_name_resolving_to_a_private_address_is_refused(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the allowed name answers 127.0.0.1 (or the cloud metadata address)."""
    _dns(
        monkeypatch,
        {
            "docs.example.com": ["127.0.0.1"],
            "meta.example.com": ["93.184.216.34", "169.254.169.254"],  # one bad answer is enough
            "mapped.example.com": ["::ffff:127.0.0.1"],
        },
    )
    for host in ("docs.example.com", "meta.example.com", "mapped.example.com"):
        with pytest.raises(ToolFailure, match="resolves to a private or local address"):
            fetch(server.url("text", host=host), allow=[f"{host}:{server.port}"])
    assert server.seen == []


def test_a_name_that_does_not_resolve_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def unresolvable(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        raise OSError("name not known")

    monkeypatch.setattr(http_fetch, "_resolve", unresolvable)
    with pytest.raises(ToolFailure, match="could not resolve the host name nowhere.example"):
        fetch("http://nowhere.example/", allow=["nowhere.example"])


def test_proxies_are_used_for_public_hosts_only(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")  # the test server plays the proxy
    _dns(monkeypatch, {"docs.example.com": ["93.184.216.34"]})
    result = fetch("http://docs.example.com/text", allow=["docs.example.com"])
    assert result.text == "hello from the test server"
    assert server.seen == ["http://docs.example.com/text"]  # the absolute form a proxy receives
    server.seen.clear()
    # A local address allowed by its literal entry never goes through the proxy.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert fetch(server.url("text"), allow=[f"127.0.0.1:{server.port}"]).status == 200
    assert server.seen == ["/text"]


def test_a_socks_proxy_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    _dns(monkeypatch, {"docs.example.com": ["93.184.216.34"]})
    with pytest.raises(ToolFailure, match="socks5 proxy"):
        fetch("https://docs.example.com/", allow=["docs.example.com"])


def _certificate(folder: Path, names: list[str]) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for `names`, written as PEM files."""
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[_Server, Path, list[str]]]:
    """The test server over TLS, with a certificate for the names the test asks for (param)."""
    import ssl

    cert, key = _certificate(tmp_path, request.param)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sni: list[str] = []

    def record(sock: object, name: str | None, ctx: object) -> None:
        sni.append(str(name))

    context.sni_callback = record
    srv = _Server()
    srv.httpd.socket = context.wrap_socket(srv.httpd.socket, server_side=True)
    srv.thread.start()
    yield srv, cert, sni
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.mark.parametrize("tls_server", [["localhost"]], indirect=True)
def test_https_goes_to_the_checked_address_and_verifies_the_name(
    tls_server: tuple[_Server, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, cert, sni = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    _pinned_only(monkeypatch, {"localhost": ["127.0.0.1"]})
    result = fetch(f"https://localhost:{srv.port}/host", allow=[f"localhost:{srv.port}"])
    assert result.text == f"localhost:{srv.port}"
    assert sni == ["localhost"]  # connected to the pinned address, named the host in TLS


@pytest.mark.parametrize("tls_server", [["other.example"]], indirect=True)
def test_https_with_a_certificate_for_another_name_fails(
    tls_server: tuple[_Server, Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, cert, _sni = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with pytest.raises(ToolFailure, match=f"could not connect to localhost:{srv.port}: .*certificate"):
        fetch(f"https://localhost:{srv.port}/text", allow=[f"localhost:{srv.port}"])
    assert srv.seen == []


@pytest.mark.parametrize(
    ("entry", "host", "port"),
    [
        ("Docs.Python.ORG", "docs.python.org", None),
        ("docs.python.org.", "docs.python.org", None),
        ("docs.python.org:8080", "docs.python.org", 8080),
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("[::1]:8080", "::1", 8080),
        ("0:0::1", "::1", None),
        ("bücher.example", "xn--bcher-kva.example", None),
    ],
)
def test_allow_entries_are_normalised(entry: str, host: str, port: int | None) -> None:
    parsed = parse_allow_entry(entry)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize(
    "entry", ["", "*", "*.com", "*.127.0.0.1", "http://docs.python.org", "docs.python.org/3", "a*.b.com",
              "user@host", "host:0", "host:99999", "host:http", "[::1", "bad host", "a..b"]
)  # fmt: skip
def test_invalid_allow_entries_are_reported(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_allow_entry(entry)
    with pytest.raises(ToolFailure, match="allow list is invalid"):
        fetch("http://docs.python.org/", allow=[entry])


def test_wildcards_match_subdomains_only() -> None:
    entry = parse_allow_entry("*.example.com")
    assert entry.matches("a.example.com", 443, "https") and entry.matches("a.b.example.com", 80, "http")
    assert not entry.matches("example.com", 443, "https")
    assert not entry.matches("badexample.com", 443, "https")
    assert not entry.matches("a.example.com", 8443, "https")  # not the default port


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
     "::ffff:10.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "2001:0:4136:e378:8000:63bf:f5ff:fffe"],
)  # fmt: skip
def test_private_and_local_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


def test_public_addresses_are_public() -> None:
    assert is_public(ipaddress.ip_address("93.184.216.34"))
    assert is_public(ipaddress.ip_address("2606:4700:4700::1111"))

"""A full disk and a damaged database (issue 14, fault 7 and fault 12): SQLite's errors become `disk_full`
(HTTP 507, exit 9) or a message naming the file; nothing is left half-open, so writes work again once
there is space; a service whose log cannot be written goes on.

A full disk for real: a 2 MB tmpfs mounted under the test's folder (tests run as root here), skipped
with the reason where mounting is not permitted. SQLITE_FULL for real without a mount: PRAGMA
max_page_count.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.server.db import Database

BIG = {"instructions": "x" * 200_000}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs at tmp_path/small-disk, unmounted afterwards."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("a small tmpfs needs Linux and mount(8)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Fill the file system of `disk` to the last byte; the filler's path (remove it to free the space)."""
    filler = disk / "filler"
    with filler.open("ab", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return filler


def _agent_count(db: Database) -> int:
    return len(db.list_agents())


# -- SQLite -----------------------------------------------------------------------------------------------
def test_sqlite_full_is_disk_full_and_the_next_write_works(tmp_path: Path) -> None:
    db = Database(tmp_path / "stigmer.db")
    db.put_agent("small", {"instructions": "hi"})
    pages = int(db.query("PRAGMA page_count")[0][0])
    db.query(f"PRAGMA max_page_count = {pages + 2}")  # room for a page or two, not for 200 KB
    with pytest.raises(StigmerError) as e:
        db.put_agent("big", BIG)
    assert e.value.code is ErrorCode.DISK_FULL
    assert (e.value.exit_code, e.value.code.http_status, e.value.code.code) == (9, 507, "disk_full")
    assert str(tmp_path / "stigmer.db") in e.value.message
    with pytest.raises(StigmerError) as e:  # a second try is the same clear error, not "within a transaction"
        db.create_execution("ex-1", "big", "x" * 200_000, None)
    assert e.value.code is ErrorCode.DISK_FULL
    assert _agent_count(db) == 1  # the failed writes left nothing behind
    db.query("PRAGMA max_page_count = 1073741823")  # space again
    db.put_agent("big", BIG)
    db.create_execution("ex-1", "big", "hello", None)
    db.update_execution("ex-1", state="COMPLETED")
    assert _agent_count(db) == 2
    assert (db.get_execution("ex-1") or {})["state"] == "COMPLETED"
    db.close()


def test_a_commit_that_fails_leaves_no_transaction_open(tmp_path: Path) -> None:
    """An error inside a transaction, then more writes: each is its own transaction again."""
    db = Database(tmp_path / "stigmer.db")
    with pytest.raises(StigmerError), db.tx() as c:
        c.execute("INSERT INTO agents (name, spec, created, updated) VALUES ('a', '{}', 0, 0)")
        raise StigmerError("stop", code=ErrorCode.INTERNAL)
    assert not db._conn.in_transaction
    db.put_agent("b", {})
    assert db.list_agents() == [{}]
    db.close()


def test_a_full_file_system_is_disk_full_until_there_is_space(small_disk: Path) -> None:
    db = Database(small_disk / "stigmer.db")
    db.create_execution("ex-1", "default", "hello", None)
    filler = fill(small_disk)
    failures: list[StigmerError] = []
    for i in range(5):  # the WAL may take a small write or two; big ones fail
        try:
            db.add_event("ex-1", "delta", {"text": "y" * 100_000, "n": i})
        except StigmerError as error:
            failures.append(error)
    assert failures, "no write failed on a full disk"
    assert all(f.code is ErrorCode.DISK_FULL for f in failures)
    assert str(small_disk / "stigmer.db") in failures[0].message and "df -h" in failures[0].hint
    with pytest.raises(StigmerError) as raised:
        db.update_execution("ex-1", state="COMPLETED", output="z" * 500_000)
    assert raised.value.code is ErrorCode.DISK_FULL
    filler.unlink()  # space again: the same connection writes, nothing needs restarting
    db.update_execution("ex-1", state="COMPLETED", output="done")
    db.add_event("ex-1", "completed", {"record": {}})
    assert (db.get_execution("ex-1") or {})["state"] == "COMPLETED"
    db.close()


def test_no_space_for_a_new_database_is_disk_full(small_disk: Path) -> None:
    filler = fill(small_disk)
    with pytest.raises(StigmerError) as e:
        Database(small_disk / "data" / "stigmer.db")
    assert e.value.code in (ErrorCode.DISK_FULL,)
    filler.unlink()


# -- a damaged database -----------------------------------------------------------------------------------
def test_a_corrupt_database_names_the_file_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "stigmer.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StigmerError) as e:
        Database(path)
    assert e.value.code is ErrorCode.STORE_CORRUPT
    assert str(path) in e.value.message and "damaged" in e.value.message
    assert f"mv {path} {path}.damaged" in e.value.hint and "stigmer server stop" in e.value.hint


def _api_env(paths: Paths) -> dict[str, str]:
    return {**os.environ, "STIGMER_HOME": str(paths.home)}


def test_the_api_with_a_corrupt_database_says_so_without_a_traceback(isolated_home: Paths) -> None:
    """The API's log tail (what `stigmer server` shows when the API cannot start) is the message."""
    isolated_home.data_dir.mkdir(parents=True)
    db = isolated_home.data_dir / "stigmer.db"
    db.write_bytes(b"garbage " * 1000)
    r = subprocess.run(
        [sys.executable, "-m", "stigmer.server.api"],
        env=_api_env(isolated_home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == ErrorCode.STORE_CORRUPT.exit_code, r.stderr
    assert "Traceback" not in r.stderr
    assert f"The Stigmer database {db} is damaged" in r.stderr and f"{db}.damaged" in r.stderr


# -- the API and the CLI ----------------------------------------------------------------------------------
class _Api:
    """`python -m stigmer.server.api` in a subprocess, its output in `log` (on the small disk)."""

    def __init__(self, paths: Paths, log: Path) -> None:
        self.paths = paths
        self.port = int(os.environ["STIGMER_SERVER_PORT"])
        self.out = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stigmer.server.api"],
            env=_api_env(paths),
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self.answers():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)
        from stigmer.server.token import read_token

        self.token = read_token(paths) or ""

    def answers(self) -> bool:
        try:
            return self.call("GET", "/health")[0] == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {
                "Authorization": f"Bearer {getattr(self, 'token', '')}",
                "Content-Type": "application/json",
            }
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def test_the_api_answers_507_on_a_full_disk_and_the_cli_exits_9(
    isolated_home: Paths,
    small_disk: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The database and the API's log on one full disk: 507 with the JSON error, `stigmer agent apply`
    exits 9 saying so, the API goes on (reads answer, its log writes fail quietly), and once there is
    space the same API writes again."""
    isolated_home.home.mkdir(parents=True, exist_ok=True)
    os.symlink(small_disk, isolated_home.data_dir)  # data/ (stigmer.db) on the small disk
    api = _Api(isolated_home, small_disk / "server.log")
    try:
        status, _ = api.call("POST", "/v1/agents", {"yaml": "name: one\ninstructions: hi\n"})
        assert status == 201
        filler = fill(small_disk)
        big = {"yaml": "name: big\ninstructions: " + "x" * 90_000 + "\n"}
        status, body = api.call("POST", "/v1/agents", big)
        assert status == 507, body
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "disk_full"
        assert "full" in str(error["message"]) and "stigmer.db" in str(error["message"])

        from stigmer.cli import main as cli_main
        from stigmer.cli import run_cmd
        from stigmer.server.client import ApiClient

        monkeypatch.setattr(
            run_cmd, "_api", lambda **_kw: ApiClient(f"http://127.0.0.1:{api.port}", api.token)
        )
        agent_file = isolated_home.home / "big.yaml"
        agent_file.write_text(big["yaml"])
        capsys.readouterr()
        assert cli_main.main(["agent", "apply", "-f", str(agent_file)]) == 9
        assert "is full" in capsys.readouterr().err

        assert api.call("GET", "/health")[0] == 200  # the API goes on
        status, agents = api.call("GET", "/v1/agents")
        assert status == 200
        assert api.proc.poll() is None
        filler.unlink()
        status, _ = api.call("POST", "/v1/agents", big)
        assert status == 201  # space again: written, without a restart
    finally:
        api.stop()


def test_a_service_whose_log_cannot_be_written_goes_on(isolated_home: Paths) -> None:
    """Every line the API logs fails with ENOSPC (/dev/full): it starts, answers and writes all the same."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    api = _Api(isolated_home, Path("/dev/full"))
    try:
        status, _ = api.call("POST", "/v1/agents", {"yaml": "name: one\ninstructions: hi\n"})
        assert status == 201
        assert api.proc.poll() is None
    finally:
        api.stop()


def test_disk_full_reaches_the_cli_as_exit_9() -> None:
    """The API's JSON error for a full disk, as the client turns it back into an error."""
    from stigmer.server.client import _decode

    raw = json.dumps({"error": {"code": "disk_full", "message": "The disk holding X is full", "hint": ""}})
    with pytest.raises(StigmerError) as e:
        _decode(507, raw.encode())
    assert e.value.code is ErrorCode.DISK_FULL and e.value.exit_code == 9

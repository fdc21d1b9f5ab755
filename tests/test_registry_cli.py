"""`stigmer server llm pull` from the model registry through the real CLI, then served by the engine."""

from __future__ import annotations

import json

import pytest

from stigmer.llm.endpoint import OpenAICompatible
from stigmer.llm.models.starter import starter_model_path
from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.archives import free_port
from tests.doubles.fake_registry import SIGNATURE, FakeRegistry

pytestmark = pytest.mark.usefixtures("stop_server")


def test_pull_from_registry_then_serve(isolated_home: Paths) -> None:
    gguf = starter_model_path()
    assert gguf is not None
    spec = {"model": gguf, "template": "{{ .Prompt }}", "params": {"stop": ["<|im_end|>"]}}
    with FakeRegistry({"tiny-coder:q4": spec}) as reg:
        base = f"http://127.0.0.1:{free_port()}"
        env = {
            "STIGMER_LLM_PROVIDER": "llamacpp",
            "STIGMER_LLM_REGISTRY_URL": reg.url,
            "STIGMER_LLM_BASE_URL": base,
            "STIGMER_LLM_CONTEXT_SIZE": "1024",
        }
        r = run_cli("server", "llm", "pull", "tiny-coder:q4", env=env)
        assert r.returncode == 0, r.stderr
        assert "✓ Model tiny-coder:q4 is ready" in r.stdout
        assert "stigmer config set llm.model tiny-coder:q4" in r.stdout
        assert SIGNATURE not in r.stdout + r.stderr  # the CDN's signed URL never shown
        missing = run_cli("server", "llm", "pull", "no-such:1b", env=env)
        assert missing.returncode == 6 and "not found" in missing.stderr

    # served afterwards with no registry at all
    env["STIGMER_LLM_MODEL"] = "tiny-coder:q4"
    r = run_cli("server", env=env)
    assert r.returncode == 0, r.stderr
    assert "Model:    tiny-coder:q4" in r.stdout
    listed = {m["name"]: m for m in json.loads(run_cli("server", "llm", "list", "--json", env=env).stdout)}
    assert listed["tiny-coder:q4"]["source"] == "registry" and listed["tiny-coder:q4"]["current"]
    client = OpenAICompatible(base + "/v1", "tiny-coder:q4")
    answer = client.chat([{"role": "user", "content": "Hi"}], max_tokens=8)
    assert answer.strip()

"""`stigmer doctor` through the real command: this machine's real values, the built-in engine on the CPU,
and an injected problem (a stand-in nvidia-smi on PATH reporting an H100 while the runtime stand-in's
/api/ps says the model has no byte in GPU memory) with its fix and exit code 14."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from stigmer.config import store as config_store
from stigmer.errors import ErrorCode
from stigmer.events import silent
from stigmer.llm.llamacpp.provider import LlamaCppProvider
from stigmer.net import http
from stigmer.paths import Paths
from tests.conftest import run_cli
from tests.doubles.archives import free_port
from tests.doubles.fake_ollama import FakeOllama, install_model

pytestmark = pytest.mark.usefixtures("stop_server")

PROBLEMS = ErrorCode.DOCTOR_PROBLEMS.exit_code
KEYS = {
    "ok",
    "hardware",
    "provider",
    "config",
    "runtime",
    "llm",
    "server",
    "services",
    "addresses",
    "models",
    "isolation",
    "problems",
    "notes",
}
H100_ROW = "0, NVIDIA H100 80GB HBM3, 81559, 81079, 580.159.04"  # --query-gpu=index,name,memory.total,memory.free,driver_version


def doctor(env: dict[str, str] | None = None) -> tuple[int, dict[str, object], str]:
    r = run_cli("doctor", "--json", env=env)
    data = json.loads(r.stdout)
    assert set(data) == KEYS
    assert data["ok"] == (not data["problems"]) and (r.returncode == PROBLEMS) == (not data["ok"]), r.stderr
    text = run_cli("doctor", env=env).stdout
    return r.returncode, data, text


def test_doctor_on_this_machine(isolated_home: Paths) -> None:
    code, data, text = doctor()
    hw = data["hardware"]
    assert isinstance(hw, dict)
    assert 0 < hw["ram_total"] <= psutil.virtual_memory().total and 0 < hw["ram_available"] <= hw["ram_total"]
    assert hw["cpu"]["logical_cores"] == psutil.cpu_count(logical=True)
    assert hw["cpu"]["arch"] in ("x86_64", "aarch64")
    assert data["provider"] == {"name": "ollama", "label": "Local"}
    assert data["server"]["running"] is False  # type: ignore[index]
    assert any("not running" in n for n in data["notes"])  # type: ignore[union-attr]
    assert data["addresses"]["llm"] == "127.0.0.1:11434"  # type: ignore[index]
    assert "RAM:" in text and "CPU:" in text and "Stigmer server:" in text
    iso = data["isolation"]
    assert isinstance(iso, dict) and iso["platform"] == "linux" and iso["require_sandbox"] is False
    assert iso["level"] in ("full", "partial", "none") and "Isolation:" in text and iso["summary"] in text
    if iso["level"] == "none":  # a warning, not a problem, while tools.require_sandbox is false
        assert not any("Tools will not run" in p["message"] for p in data["problems"])  # type: ignore[union-attr]
    if not hw["gpus"] and shutil.which("nvidia-smi") is None:
        assert "GPU:       none found" in text
    for problem in data["problems"]:  # type: ignore[union-attr]
        assert problem["message"] and problem["fix"]


def test_the_built_in_engine_runs_on_the_cpu(isolated_home: Paths) -> None:
    env = {
        "STIGMER_LLM_PROVIDER": "llamacpp",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_CONTEXT_SIZE": "1024",
    }
    engine = LlamaCppProvider(config_store.load(isolated_home, env), isolated_home)
    engine.start(silent)
    try:
        _code, data, text = doctor(env)
    finally:
        engine.stop()
    llm, runtime = data["llm"], data["runtime"]
    assert isinstance(llm, dict) and isinstance(runtime, dict)
    assert llm["running"] and llm["managed"] and llm["runs_on"] == "cpu" and llm["context"] == 1024
    assert runtime == {
        "name": "xllamacpp", "version": importlib.metadata.version("xllamacpp"), "source": "built-in", "path": "",
    }  # fmt: skip
    assert "Runs on:   CPU" in text and "built in (the xllamacpp package)" in text
    assert not any("GPU found" in p["message"] for p in data["problems"])  # type: ignore[union-attr]


@pytest.fixture
def fake_gpu(tmp_path: Path) -> dict[str, str]:
    """A PATH whose nvidia-smi reports one H100, as the real one does for our query."""
    folder = tmp_path / "fake-bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "if any(a.startswith('--query-gpu') for a in sys.argv[1:]):\n"
        f"    print({H100_ROW!r})\n"
        "else:\n"
        "    print('NVIDIA-SMI 580.159.04')\n"
    )
    smi.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def runtime_on(tmp_path: Path) -> Iterator[object]:
    """Start the runtime stand-in with the model loaded; `share` of it in GPU memory."""
    started: list[FakeOllama] = []

    def start(share: str, **env: str) -> FakeOllama:
        models = tmp_path / f"models-{len(started)}"
        install_model(models, "llama3.2")
        fake = FakeOllama(models, env={"OLLAMA_FAKE_SIZE_VRAM": share, **env}).start()
        started.append(fake)
        with http.request(
            fake.url + "/api/generate",
            method="POST",
            body={"model": "llama3.2", "prompt": "hi", "stream": False},
        ):
            pass  # the model is loaded now: /api/ps lists it
        return fake

    yield start
    for fake in started:
        fake.stop()


def test_a_gpu_the_runtime_does_not_use_is_a_problem_with_its_fix(
    isolated_home: Paths, fake_gpu: dict[str, str], runtime_on: object
) -> None:
    fake = runtime_on("0")  # type: ignore[operator]
    env = {**fake_gpu, "STIGMER_LLM_BASE_URL": fake.url, "STIGMER_LLM_MODEL": "llama3.2"}
    code, data, text = doctor(env)
    assert code == PROBLEMS
    gpus = data["hardware"]["gpus"]  # type: ignore[index]
    assert [g["name"] for g in gpus] == ["NVIDIA H100 80GB HBM3"] and gpus[0]["memory_total"] == 81559 << 20
    assert data["llm"]["runs_on"] == "cpu" and not data["llm"]["managed"]  # type: ignore[index]
    gpu_problems = [p for p in data["problems"] if p["message"].startswith("GPU found")]  # type: ignore[union-attr]
    assert len(gpu_problems) == 1
    problem = gpu_problems[0]
    restart = f"restart the Local LLM runtime at {fake.url}"  # not started by Stigmer: not ours to restart
    assert problem["message"].startswith(
        "GPU found (NVIDIA H100 80GB HBM3) but not used because the Local LLM (not started by Stigmer) runs"
    )
    assert problem["message"].endswith(f": run {restart}") and problem["fix"] == restart
    assert "Runs on:   CPU" in text and "✗ GPU found (NVIDIA H100 80GB HBM3) but not used because" in text
    assert "problem" in text.splitlines()[-1] and "found" in text.splitlines()[-1]

    # the status says it plainly too
    status = run_cli("server", "llm", "status", env=env).stdout
    assert "Note:     Runs on the CPU: no part of the model is in GPU memory" in status

    # a runtime started with CUDA_VISIBLE_DEVICES=-1: that is the cause named (read from the process
    # listening on the port), and the fix
    hidden_runtime = runtime_on("0", CUDA_VISIBLE_DEVICES="-1")  # type: ignore[operator]
    _code, hidden, _text = doctor({**env, "STIGMER_LLM_BASE_URL": hidden_runtime.url})
    problem = next(p for p in hidden["problems"] if p["message"].startswith("GPU found"))  # type: ignore[union-attr]
    assert "CUDA_VISIBLE_DEVICES='-1' hides it" in problem["message"]
    assert problem["fix"] == (
        f"unset CUDA_VISIBLE_DEVICES where it is started, then restart the Local LLM runtime at {hidden_runtime.url}"
    )


def test_a_runtime_on_the_gpu_is_no_problem(
    isolated_home: Paths, fake_gpu: dict[str, str], runtime_on: object
) -> None:
    fake = runtime_on("1")  # type: ignore[operator]
    env = {**fake_gpu, "STIGMER_LLM_BASE_URL": fake.url, "STIGMER_LLM_MODEL": "llama3.2"}
    _code, data, text = doctor(env)
    assert data["llm"]["runs_on"] == "gpu" and "Runs on:   GPU (all of the model in GPU memory)" in text  # type: ignore[index]
    assert not any(p["message"].startswith("GPU found") for p in data["problems"])  # type: ignore[union-attr]
    status = json.loads(run_cli("server", "llm", "status", "--json", env=env).stdout)
    assert status["runs_on"] == "gpu"


def test_a_broken_config_is_a_problem_and_the_rest_is_still_reported(isolated_home: Paths) -> None:
    isolated_home.ensure_home()
    isolated_home.config_file.write_text("backend: [broken\n")
    code, data, text = doctor()
    assert code == PROBLEMS and data["config"]["valid"] is False  # type: ignore[index]
    problem = data["problems"][0]  # type: ignore[index]
    assert problem["message"].startswith("Malformed config file") and "mv " in problem["fix"]
    assert data["hardware"]["ram_total"] > 0  # type: ignore[index]
    assert "RAM:" in text and "✗ Malformed config file" in text

"""Knowing the machine before a download: `llm show` figures checked by hand, the fit check refusing with
both numbers (memory and disk) and --force overriding it, the built-in engine's automatic context, the
default model chosen by RAM and GPU memory, and the low-RAM warning at `stigmer server`.

The registry stand-in serves real GGUF headers (tests/doubles/gguf_writer.py) of models far larger than
this machine may hold; the machine is injected (hw.report.detect replaced), so every figure is fixed.
Commands run in-process (stigmer.cli.main.main) so that the injected machine is the one they see.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stigmer.config import store as config_store
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import silent
from stigmer.hw import memory
from stigmer.hw import report as hw_report
from stigmer.hw.report import CpuInfo, GpuInfo, HardwareReport
from stigmer.llm.gguf import read_header
from stigmer.llm.models.starter import starter_model_path
from stigmer.net import retry
from stigmer.paths import Paths
from stigmer.units import human_bytes
from tests.doubles import gguf_writer as gw
from tests.doubles.archives import free_port
from tests.doubles.fake_ollama import FakeOllama
from tests.doubles.fake_registry import FakeRegistry

GIB = 1 << 30
MIB = 1 << 20
BIG = "big-coder:7b"


# -- the machine, injected ------------------------------------------------------------------------------
def machine(
    ram_available: int,
    *,
    ram_total: int | None = None,
    gpus: tuple[GpuInfo, ...] = (),
    disk_free: int = 1 << 40,
) -> HardwareReport:
    return HardwareReport(
        ram_total=ram_total or ram_available,
        ram_available=ram_available,
        cpu=CpuInfo(4, 8, "x86_64", frozenset({"avx2"}), "Test CPU"),
        disk_free=disk_free,
        models_dir=Path("/injected"),
        gpus=list(gpus),
    )


def nvidia(memory_bytes: int) -> GpuInfo:
    return GpuInfo("nvidia", "NVIDIA Test GPU", memory_bytes, memory_bytes, "580.1", 0)


class Machine:
    """What every hardware detection of the test returns (set it with .use(report))."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.report = machine(16 * GIB)
        self.calls = 0
        monkeypatch.setattr(hw_report, "detect", self._detect)

    def _detect(self, models_dir: Path, **_kw: Any) -> HardwareReport:
        self.calls += 1
        return dataclasses.replace(self.report, models_dir=models_dir)

    def use(self, report: HardwareReport) -> None:
        self.report = report


@pytest.fixture
def hw(monkeypatch: pytest.MonkeyPatch) -> Machine:
    return Machine(monkeypatch)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "DOWNLOADS", retry.RetryPolicy(first_delay=0.01, max_delay=0.05))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from stigmer.cli.main import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- models: real headers of big models ------------------------------------------------------------------
@functools.cache
def qwen7b() -> tuple[bytes, int]:
    """The header of a qwen2.5-coder:7b-shaped GGUF (no tensor data), and its weights counted by hand."""
    metadata, tensors = gw.qwen25_coder_7b()
    return gw.header_bytes(metadata, tensors), sum(t.nbytes for t in tensors)


@functools.cache
def huge_vocab() -> bytes:
    """A header longer than the first range asked (4 MiB): a 300,000-token vocabulary."""
    metadata, tensors = gw.llama_like(
        "llama", n_layers=2, n_head=4, n_head_kv=2, n_embd=64, n_ff=128, n_ctx=4096, n_vocab=300_000,
        file_type=gw.FT_Q8_0, matrix_type=gw.Q8_0, output_type=gw.Q8_0, name="huge-vocab",
    )  # fmt: skip
    return gw.header_bytes(metadata, tensors)


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    header, _weights = qwen7b()
    with FakeRegistry(
        {BIG: {"model": header, "template": "{{ .Prompt }}", "params": {"stop": ["x"]}}}
    ) as reg:
        yield reg


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, registry: FakeRegistry) -> Callable[..., None]:
    def set_env(**values: str) -> None:
        monkeypatch.setenv("STIGMER_LLM_REGISTRY_URL", registry.url)
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


# -- the estimate, by hand --------------------------------------------------------------------------------
def by_hand(
    *, weights: int, n_ctx: int, layers: int, kv_heads: int, head_dim: int, n_embd: int, n_ff: int
) -> dict[str, int]:
    """hw.fit's documented formula, written out again."""
    kv = n_ctx * layers * (head_dim + head_dim) * kv_heads * 2
    overhead = 256 * MIB + 4 * 512 * (3 * n_ff + 4 * n_embd) + 2 * 512 * n_ctx
    return {
        "n_ctx": n_ctx,
        "weights": weights,
        "kv_cache": kv,
        "overhead": overhead,
        "total": weights + kv + overhead,
    }


def largest_context(budget: int, *, weights: int, trained: int, **shape: int) -> int:
    """The largest multiple of 256 up to `trained` whose estimate fits `budget` (a plain loop)."""
    best = 0
    for n in range(256, trained + 1, 256):
        if by_hand(weights=weights, n_ctx=n, **shape)["total"] <= budget:
            best = n
    return best


STARTER_SHAPE = {"layers": 30, "kv_heads": 3, "head_dim": 64, "n_embd": 576, "n_ff": 1536}
QWEN7B_SHAPE = {"layers": 28, "kv_heads": 4, "head_dim": 128, "n_embd": 3584, "n_ff": 18944}


def test_show_starter_model_figures_by_hand(
    hw: Machine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = starter_model_path()
    assert path is not None
    header = read_header(path)
    # the shape the figures below are computed from (SmolLM2-135M)
    assert (header.block_count, header.head_count_kv, header.key_length, header.value_length) == (
        30,
        3,
        64,
        64,
    )
    assert (header.embedding_length, header.feed_forward_length, header.context_length) == (576, 1536, 8192)
    monkeypatch.setenv("STIGMER_LLM_PROVIDER", "llamacpp")
    hw.use(machine(16 * GIB))

    code, out, _err = run(capsys, "server", "llm", "show", "--json")
    assert code == 0
    data = json.loads(out)
    expected = by_hand(weights=header.tensor_data_size, n_ctx=8192, **STARTER_SHAPE)
    assert data["estimate"] == expected  # the whole trained context fits in 16 GiB
    assert expected["kv_cache"] == 188_743_680 and expected["overhead"] == 290_979_840
    assert data["context"] == {"size": 8192, "auto": True, "note": ""}
    assert data["downloaded"] and data["download_size"] == 0 and data["origin"] == str(path)
    assert (data["architecture"], data["quantization"], data["layers"], data["trained_context"]) == (
        "llama", "Q4_1", 30, 8192,
    )  # fmt: skip
    assert data["fit"]["kind"] == "cpu"  # the built-in engine: CPU only

    # little memory: the largest context that fits in 80 % of what is available, with a note
    available = 700 * 1000**2
    hw.use(machine(available))
    code, out, _err = run(capsys, "server", "llm", "show", "--json")
    data = json.loads(out)
    n = largest_context(int(available * 0.8), weights=header.tensor_data_size, trained=8192, **STARTER_SHAPE)
    assert 2048 <= n < 8192
    assert data["context"]["size"] == n and "limited" in data["context"]["note"]
    assert data["estimate"] == by_hand(weights=header.tensor_data_size, n_ctx=n, **STARTER_SHAPE)

    code, text, _err = run(capsys, "server", "llm", "show")
    assert f"Context:         {n} tokens (chosen for this machine" in text
    assert f"KV cache:      {human_bytes(data['estimate']['kv_cache'])}" in text
    assert "Fits:            yes, on the CPU" in text


def test_show_synthetic_7b_from_the_registry(
    hw: Machine, env: Callable[..., None], registry: FakeRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    _header, weights = qwen7b()
    env()  # the Local LLM runtime (default provider): its default context of 4096 tokens
    hw.use(machine(16 * GIB, gpus=(nvidia(8 * GIB),)))
    code, out, err = run(capsys, "server", "llm", "show", BIG, "--json")
    assert code == 0, err
    data = json.loads(out)
    expected = by_hand(weights=weights, n_ctx=4096, **QWEN7B_SHAPE)
    assert data["estimate"] == expected
    assert expected["kv_cache"] == 234_881_024  # 4096 x 28 x (128 + 128) x 4 x 2
    assert expected["overhead"] == 268_435_456 + 145_752_064 + 4_194_304
    assert data["context"] == {"size": 4096, "auto": False, "note": ""}
    assert (data["architecture"], data["quantization"], data["layers"], data["trained_context"]) == (
        "qwen2", "Q4_K_M", 28, 32768,
    )  # fmt: skip
    assert not data["downloaded"] and data["download_size"] == sum(
        layer["size"] for layer in json.loads(registry.manifest(BIG))["layers"]
    )
    assert data["fit"]["kind"] == "gpu" and data["fit"]["gpu"] == "NVIDIA Test GPU"
    # only the header was read: one ranged request for the model layer, nothing else fetched
    ranged = registry.requests_for(registry.digest(BIG))
    assert len(ranged) == 1 and ranged[0].range is not None and ranged[0].range.startswith("bytes=0-")

    # the built-in engine (CPU only): the whole trained context fits 16 GiB
    env(STIGMER_LLM_PROVIDER="llamacpp")
    code, out, _err = run(capsys, "server", "llm", "show", BIG, "--json")
    data = json.loads(out)
    assert data["context"]["size"] == 32768 and data["context"]["auto"]
    assert data["estimate"] == by_hand(weights=weights, n_ctx=32768, **QWEN7B_SHAPE)
    assert data["fit"]["kind"] == "cpu" and data["machine"]["gpu_budget"] == 0

    # 7 GiB: the context is cut to what fits
    hw.use(machine(7 * GIB))
    code, out, _err = run(capsys, "server", "llm", "show", BIG, "--json")
    data = json.loads(out)
    n = largest_context(int(7 * GIB * 0.8), weights=weights, trained=32768, **QWEN7B_SHAPE)
    assert 2048 <= n < 32768 and data["context"]["size"] == n
    assert "limited to" in data["context"]["note"]


def test_a_header_longer_than_the_first_range_is_read_with_a_second_one(
    hw: Machine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    header = huge_vocab()
    assert len(header) > 4 * MIB
    with FakeRegistry({"huge:1b": {"model": header}}) as reg:
        monkeypatch.setenv("STIGMER_LLM_REGISTRY_URL", reg.url)
        monkeypatch.setenv("STIGMER_LLM_PROVIDER", "llamacpp")
        code, out, err = run(capsys, "server", "llm", "show", "huge:1b", "--json")
        assert code == 0, err
        assert json.loads(out)["layers"] == 2
        ranges = [r.range for r in reg.requests_for(reg.digest("huge:1b"))]
    assert ranges[0] == f"bytes=0-{4 * MIB - 1}" and len(ranges) == 2
    assert int(ranges[1].rsplit("-", 1)[1]) + 1 >= len(header)


# -- the fit check before a download ----------------------------------------------------------------------
def test_a_pull_that_does_not_fit_is_refused_with_both_numbers_and_force_overrides(
    hw: Machine,
    env: Callable[..., None],
    registry: FakeRegistry,
    isolated_home: Paths,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _header, weights = qwen7b()
    env(STIGMER_LLM_PROVIDER="llamacpp", STIGMER_LLM_CONTEXT_SIZE="4096")
    available = 4 * GIB
    hw.use(machine(available))
    code, _out, err = run(capsys, "server", "llm", "pull", BIG)
    assert code == ErrorCode.MODEL_TOO_LARGE.exit_code == 10
    need = by_hand(weights=weights, n_ctx=4096, **QWEN7B_SHAPE)["total"]
    assert f"Model {BIG} does not fit this machine" in err
    assert (
        f"needs about {human_bytes(need)} of memory" in err
        and f"{human_bytes(available)} of RAM is available" in err
    )
    assert f"stigmer server llm pull {BIG} --force" in err
    assert config_store.load(isolated_home) and not (isolated_home.models_dir / "index.json").exists()
    assert registry.requests_for(registry.digest(BIG, "template")) == []  # nothing of the pull began

    code, out, err = run(capsys, "server", "llm", "pull", BIG, "--force")
    assert code == 0, err
    assert "Downloading it anyway (--force)" in err and f"✓ Model {BIG} is ready" in out
    assert json.loads((isolated_home.models_dir / "index.json").read_text())["models"]


def test_not_enough_disk_is_refused_with_both_numbers(
    hw: Machine, env: Callable[..., None], registry: FakeRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    env(STIGMER_LLM_PROVIDER="llamacpp", STIGMER_LLM_CONTEXT_SIZE="4096")
    hw.use(machine(64 * GIB, disk_free=1_000_000))
    code, _out, err = run(capsys, "server", "llm", "pull", BIG)
    size = sum(layer["size"] for layer in json.loads(registry.manifest(BIG))["layers"])
    assert code == ErrorCode.DISK_FULL.exit_code
    assert f"its download takes {human_bytes(size)} of disk and 1.0 MB is free" in err


def test_the_runtime_pull_is_checked_before_the_runtime_downloads(
    hw: Machine,
    env: Callable[..., None],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeOllama(tmp_path / "ollama-models") as fake:
        env(STIGMER_LLM_BASE_URL=fake.url)
        hw.use(machine(2 * GIB, gpus=(nvidia(2 * GIB),)))  # 5 GB needed; RAM and GPU memory hold 3.6
        code, _out, err = run(capsys, "server", "llm", "pull", BIG)
        assert code == 10, err
        assert "2.1 GB of RAM is available and 1.7 GB is usable on NVIDIA Test GPU" in err
        assert not list(
            (tmp_path / "ollama-models" / "manifests").rglob("*7b*")
        )  # the runtime pulled nothing


def test_server_force_passes_to_the_fit_check(
    hw: Machine, env: Callable[..., None], isolated_home: Paths
) -> None:
    from stigmer.cli.main import _parser
    from stigmer.llm import setup
    from stigmer.llm.provider import get_provider

    assert _parser().parse_args(["server", "--force"]).force
    assert _parser().parse_args(["server", "start", "--force"]).force
    env(STIGMER_LLM_PROVIDER="llamacpp", STIGMER_LLM_MODEL=BIG, STIGMER_LLM_CONTEXT_SIZE="4096")
    settings = config_store.load(isolated_home)
    hw.use(machine(4 * GIB))
    provider = get_provider(settings, isolated_home)
    with pytest.raises(StigmerError) as e:
        setup.check_fit(provider, settings, isolated_home, None, force=False)
    assert e.value.code is ErrorCode.MODEL_TOO_LARGE and "stigmer server --force" in e.value.hint
    notices = setup.check_fit(provider, settings, isolated_home, None, force=True)
    assert len(notices) == 1 and "Downloading it anyway (--force)" in notices[0]


def test_an_unreachable_registry_never_blocks(
    hw: Machine, isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stigmer.llm.models.fit_check import before_download

    monkeypatch.setenv("STIGMER_LLM_REGISTRY_URL", f"http://127.0.0.1:{free_port()}")
    settings = config_store.load(isolated_home)
    notices = before_download(
        BIG, provider="ollama", settings=settings, paths=isolated_home, force=False, force_command="x"
    )
    assert len(notices) == 1 and notices[0].startswith(f"The fit check of {BIG} was skipped: could not reach")


# -- the built-in engine's automatic context --------------------------------------------------------------
def test_the_engine_starts_with_the_context_chosen_for_the_memory_available(
    isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stigmer.llm.llamacpp.provider import LlamaCppProvider
    from stigmer.services.manager import Services

    path = starter_model_path()
    assert path is not None
    weights = read_header(path).tensor_data_size
    # Just enough for 4096 tokens (and not 4352) in 80 % of the available memory.
    need = by_hand(weights=weights, n_ctx=4096, **STARTER_SHAPE)["total"]
    available = int((need + 3_000_000) / 0.8)
    monkeypatch.setattr(memory, "detect_memory", lambda **_kw: (available * 2, available, []))
    settings = config_store.load(isolated_home, {"STIGMER_LLM_PROVIDER": "llamacpp"})
    provider = LlamaCppProvider(settings, isolated_home, base_url=f"http://127.0.0.1:{free_port()}")
    provider.start(silent)
    try:
        rec = Services(isolated_home).record("llm")
        assert rec is not None
        assert rec.argv[rec.argv.index("--ctx-size") + 1] == "4096"
        st = provider.status()
        assert st.running and st.context == 4096 and st.runs_on == "cpu"
    finally:
        provider.stop()


def test_auto_context_never_goes_below_the_floor_and_says_so(tmp_path: Path) -> None:
    from stigmer.llm.models.fit_check import auto_context_for_file

    path = starter_model_path()
    assert path is not None
    n, note = auto_context_for_file(path, ram_available=100 * 1000**2)
    assert n == 2048 and "expect the system to swap" in note
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    n, note = auto_context_for_file(broken, ram_available=16 * GIB)
    assert n == 4096 and "could not be read" in note


# -- the default model, by RAM and GPU memory -------------------------------------------------------------
@pytest.mark.parametrize(
    ("ram", "vram", "model"),
    [
        # the test machine has 4 cores (20 GB/s by hw.speed): the 7b (4.3 tokens/s) is too slow
        (int(7.7 * GIB), 0, "qwen2.5-coder:3b"),
        (4 * GIB, 0, "qwen2.5-coder:1.5b"),
        (16 * GIB, 0, "qwen2.5-coder:3b"),
        # a 24 GB GPU not in hw.speed's table (assumed 250 GB/s): the 32b at 7.5 tokens/s is too slow
        (16 * GIB, 24 * GIB, "qwen2.5-coder:14b"),
    ],
)
def test_the_default_model_follows_the_machine_and_status_says_why(
    hw: Machine, isolated_home: Paths, capsys: pytest.CaptureFixture[str], ram: int, vram: int, model: str
) -> None:
    from stigmer.llm import setup

    hw.use(machine(ram, gpus=(nvidia(vram),) if vram else ()))
    setup.look_at_machine(config_store.load(isolated_home), isolated_home)  # what `stigmer server` does
    code, out, _err = run(capsys, "server", "llm", "status", "--json")
    data = json.loads(out)
    assert code == 0 and data["model"] == model
    assert any(n.startswith("Chosen for this machine") and "tokens/s here" in n for n in data["notes"])
    assert data["expected_tokens_per_second"] >= 8
    code, text, _err = run(capsys, "server", "llm", "status")
    assert f"Model:    {model}" in text and "Note:     Chosen for this machine" in text

    # the choice is remembered: a status does not probe the machine again
    calls = hw.calls
    run(capsys, "server", "llm", "status")
    assert hw.calls == calls


def test_a_model_chosen_by_the_user_or_the_built_in_engine_keeps_its_own(
    hw: Machine, isolated_home: Paths, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hw.use(machine(4 * GIB))
    monkeypatch.setenv("STIGMER_LLM_MODEL", "llama3.2")
    data = json.loads(run(capsys, "server", "llm", "status", "--json")[1])
    assert data["model"] == "llama3.2" and not any("Chosen" in n for n in data["notes"])
    monkeypatch.delenv("STIGMER_LLM_MODEL")
    monkeypatch.setenv("STIGMER_LLM_PROVIDER", "llamacpp")
    data = json.loads(run(capsys, "server", "llm", "status", "--json")[1])
    assert data["model"] == "smollm2:135m"


def test_low_ram_warns_at_start_without_blocking(hw: Machine, isolated_home: Paths) -> None:
    from stigmer.llm import setup

    settings = config_store.load(isolated_home, {"STIGMER_LLM_MODEL": "llama3.2"})
    hw.use(machine(4 * GIB))
    _hardware, notices = setup.look_at_machine(settings, isolated_home)
    assert len(notices) == 1 and "local models need about 6 GB" in notices[0]
    assert "qwen2.5-coder:1.5b" in notices[0] and "remote provider" in notices[0]
    hw.use(machine(16 * GIB))
    assert setup.look_at_machine(settings, isolated_home)[1] == []


# -- Hugging Face: the header from a Range request to the file, without the token at the CDN --------------
@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import huggingface_hub
    from huggingface_hub import constants

    from tests.doubles.fake_hf import FakeHub

    home = tmp_path / "hf-home"
    for var in ("HF_ENDPOINT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    header, _weights = qwen7b()
    with FakeHub(
        {"big-org/Big-GGUF": {"Big-Q4_K_M.gguf": header, "README.md": b"# Big\n"}}, token="hf_x"
    ) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_TOKEN", "hf_x")
        yield fake
    huggingface_hub.close_session()


def test_a_hugging_face_model_is_checked_from_its_first_bytes(
    hw: Machine, hub: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _header, weights = qwen7b()
    monkeypatch.setenv("STIGMER_LLM_PROVIDER", "llamacpp")
    monkeypatch.setenv("STIGMER_LLM_CONTEXT_SIZE", "4096")
    hw.use(machine(4 * GIB))
    code, out, err = run(capsys, "server", "llm", "show", "hf.co/big-org/Big-GGUF", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["estimate"] == by_hand(weights=weights, n_ctx=4096, **QWEN7B_SHAPE)
    assert data["fit"]["kind"] == "does_not_fit" and data["download_size"] == len(qwen7b()[0])
    cdn = hub.cdn_gets()
    assert len(cdn) == 1 and cdn[0].range is not None and cdn[0].range.startswith("bytes=0-")
    assert cdn[0].authorization is None  # the token goes to the Hub only, never to the CDN

    code, _out, err = run(capsys, "server", "llm", "pull", "hf.co/big-org/Big-GGUF")
    assert code == 10 and "hf.co/big-org/Big-GGUF does not fit this machine" in err
    assert len(hub.cdn_gets()) == 2  # the header again; no download began


def test_the_runtime_is_installed_before_its_model_is_checked(
    hw: Machine, registry: FakeRegistry, isolated_home: Paths
) -> None:
    """Offline, the runtime's download fails first: the registry is never asked about the model (and the
    offline fallback, when on, is not held up by a fit check)."""
    from stigmer.errors import NetworkUnreachable
    from stigmer.llm import setup

    env = {
        "STIGMER_LLM_REGISTRY_URL": registry.url,
        "STIGMER_LLM_DOWNLOAD_URL": f"http://127.0.0.1:{free_port()}/releases",
        "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
        "STIGMER_LLM_OFFLINE_FALLBACK": "false",
        "STIGMER_LLM_MODEL": BIG,
    }
    hw.use(machine(2 * GIB))  # the model would not fit: it is not even looked at
    with pytest.raises(NetworkUnreachable):
        setup.setup(config_store.load(isolated_home, env), isolated_home)
    assert registry.registry_log == []

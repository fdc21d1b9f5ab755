"""The default model follows what the machine can run at a usable speed (issue 14, measured faults).

Speeds are worked out by hand from hw.speed's figures: 5 GB/s of weights per core with AVX2 (2 GB/s
without), at most 40 GB/s for the CPU; a GPU's peak bandwidth x 0.6. Sizes as Ollama's library lists
them: 1.5b 986 MB, 3b 1.9 GB, 7b 4.7 GB, 14b 9.0 GB, 32b 20 GB. Usable: 8 tokens/s.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from stigmer.cli.render import Out
from stigmer.config import store
from stigmer.errors import ErrorCode, NetworkUnreachable
from stigmer.hw import nvidia, speed
from stigmer.hw import report as hw_report
from stigmer.hw.fit import default_model, memory_tier
from stigmer.hw.report import CpuInfo, GpuInfo, HardwareReport
from stigmer.llm import setup as llm_setup
from stigmer.paths import Paths

GIB = 1 << 30
MIB = 1 << 20
H100 = Path(__file__).parent / "fixtures" / "hw" / "gpu-h100"


def machine(ram: float, cores: int, *, flags: tuple[str, ...] = ("avx2",), gpus: tuple[GpuInfo, ...] = ()):  # type: ignore[no-untyped-def]
    cpu = CpuInfo(cores, cores, "x86_64", frozenset(flags), "test CPU")
    return HardwareReport(int(ram), int(ram), cpu, 1 << 40, Path("/models"), list(gpus), [])


def this_vm() -> HardwareReport:
    """The machine the fault was measured on: 2 cores (AMD EPYC, AVX2), 24 GiB, no GPU."""
    return machine(24 * GIB, 2)


def h100() -> GpuInfo:
    [gpu] = nvidia.parse_query((H100 / "nvidia-smi-query-header.csv").read_text())
    return gpu


# -- the estimate ------------------------------------------------------------------------------------
def test_cpu_speed_is_cores_then_the_memory_bus() -> None:
    assert speed.cpu_bandwidth(CpuInfo(2, 2, "x86_64", frozenset({"avx2"}))).rate == 10e9
    assert speed.cpu_bandwidth(CpuInfo(2, 4, "x86_64", frozenset({"avx"}))).rate == 4e9  # no AVX2: 2 per core
    many = speed.cpu_bandwidth(CpuInfo(32, 64, "x86_64", frozenset({"avx512f"})))
    assert (many.rate, many.note) == (40e9, "limited by the memory bus")
    arm = speed.cpu_bandwidth(CpuInfo(4, 4, "aarch64", frozenset({"neon", "dotprod"})))
    assert arm.rate == 20e9


def test_gpu_speed_by_name() -> None:
    assert speed.gpu_bandwidth(h100()) == speed.Bandwidth(3350e9 * 0.6, "3350 GB/s")
    rtx = GpuInfo("nvidia", "NVIDIA GeForce RTX 4060 Ti", 16 * GIB, None)
    assert speed.gpu_bandwidth(rtx).note == "288 GB/s"  # not the plain 4060's 272
    amd = GpuInfo("amd", "Radeon RX 7900 XTX", 24 * GIB, None)
    assert speed.gpu_bandwidth(amd).note == "960 GB/s"
    unknown = GpuInfo("nvidia", "NVIDIA Test GPU", 8 * GIB, None)
    assert speed.gpu_bandwidth(unknown) == speed.Bandwidth(250e9 * 0.6, "assumed 250 GB/s")
    m2 = GpuInfo("apple", "Apple M2 Pro", 32 * GIB, None, unified_memory=True)
    assert speed.gpu_bandwidth(m2).note == "200 GB/s"


def test_tokens_per_second_is_bandwidth_over_bytes_read() -> None:
    cpu = speed.Bandwidth(10e9, "")
    assert speed.tokens_per_second(9.0e9, cpu) == pytest.approx(1.11, abs=0.01)  # the 14b here: ~1
    # the starter model (98 MB): ~102 tokens/s, as measured here (98-116 with 2 threads)
    assert speed.tokens_per_second(98e6, cpu) == pytest.approx(102, abs=1)
    gpu = speed.Bandwidth(100e9, "")
    # half of a 10 GB model on the GPU: 5/100 + 5/10 = 0.55 s a token
    assert speed.tokens_per_second(10e9, cpu, gpu, 5e9) == pytest.approx(1 / 0.55)
    assert speed.shown(10.14) == "about 10" and speed.shown(5.26) == "about 5.3"


# -- the choice --------------------------------------------------------------------------------------
def test_this_vm_gets_a_model_it_runs_at_a_usable_speed() -> None:
    # The fault: RAM alone chose the 14b, about 1 token/s here. 2 cores x 5 GB/s = 10 GB/s: 14b 1.1,
    # 7b 2.1, 3b 5.3, 1.5b 10.1 tokens/s; 8 is usable.
    choice = default_model(this_vm())
    assert choice.model == "qwen2.5-coder:1.5b" and choice.tokens_per_second == 10.1
    assert choice.runs_on == "cpu"
    assert choice.reason == (
        "25.8 GB of RAM, 2 CPU cores, no GPU: qwen2.5-coder:1.5b (986 MB) should generate about 10 "
        "tokens/s here, on the CPU; qwen2.5-coder:3b fits in memory but would generate about 5.3, below "
        "the 8 tokens/s that keep up with a reader"
    )
    assert memory_tier(24 * GIB) == "14b"  # RAM alone still allows the 14b: speed decides below it


@pytest.mark.parametrize(
    ("hardware", "model", "tps"),
    [
        # 8 cores x 5 = 40 GB/s: 14b 4.4, 7b 8.5
        (machine(16 * GIB, 8), "qwen2.5-coder:7b", 8.5),
        # 32 cores are capped by the memory bus at 40 GB/s: the same
        (machine(64 * GIB, 32), "qwen2.5-coder:7b", 8.5),
        # 4 cores, 20 GB/s: 7b 4.3, 3b 10.5
        (machine(7.7 * GIB, 4), "qwen2.5-coder:3b", 10.5),
        # RAM stays the upper bound: 4 GiB allows only the 1.5b, however many cores (40 GB/s: 40.6)
        (machine(4 * GIB, 16), "qwen2.5-coder:1.5b", 40.6),
        # nothing is fast enough on one core without AVX2 (2 GB/s: 2.0): the smallest, saying so
        (machine(8 * GIB, 1, flags=()), "qwen2.5-coder:1.5b", 2.0),
        # the H100 of the fixture: 3350 x 0.6 = 2010 GB/s, the 32b (20 GB) at 100.5
        (machine(128 * GIB, 16, gpus=(h100(),)), "qwen2.5-coder:32b", 100.5),
        # an RTX 4090 (24 GB, 1008 x 0.6 = 604.8 GB/s): 32b at 30.2
        (machine(16 * GIB, 8, gpus=(GpuInfo("nvidia", "NVIDIA GeForce RTX 4090", 24564 * MIB, None),)),
         "qwen2.5-coder:32b", 30.2),
        # a 24 GB card not in the table (assumed 250 x 0.6 = 150 GB/s): 32b 7.5 is too slow, 14b 16.7
        (machine(16 * GIB, 8, gpus=(GpuInfo("nvidia", "NVIDIA Test GPU", 24 * GIB, None),)),
         "qwen2.5-coder:14b", 16.7),
        # an 8 GiB RTX 4060 with 32 GB of RAM: the 14b split, 7,036,993,536 bytes on the GPU (8 GiB -
        # 457 MiB - 1 GiB) at 163.2 GB/s and the other 1.96 GB at 40 GB/s: 0.0431 + 0.0491 s = 10.8
        (machine(32 * GIB, 8, gpus=(GpuInfo("nvidia", "NVIDIA GeForce RTX 4060", 8 * GIB, None),)),
         "qwen2.5-coder:14b", 10.8),
        # Apple M1 with 16 GB (68 x 0.6 = 40.8 GB/s on unified memory): 14b 4.5, 7b 8.7
        (machine(16 * GIB, 8, gpus=(GpuInfo("apple", "Apple M1", 16 * GIB, None, unified_memory=True),)),
         "qwen2.5-coder:7b", 8.7),
    ],
)  # fmt: skip
def test_the_largest_model_that_fits_and_runs_at_a_usable_speed(
    hardware: HardwareReport, model: str, tps: float
) -> None:
    choice = default_model(hardware)
    assert (choice.model, choice.tokens_per_second) == (model, tps)


def test_the_reason_names_the_gpu_and_the_slower_choices() -> None:
    gpu = default_model(machine(128 * GIB, 16, gpus=(h100(),)))
    assert gpu.runs_on == "gpu" and gpu.reason.endswith(
        "a GPU with 85.5 GB of memory (NVIDIA H100 80GB HBM3): qwen2.5-coder:32b (20 GB) should generate "
        "about 100 tokens/s here, on the GPU (3350 GB/s)"
    )
    split = default_model(
        machine(32 * GIB, 8, gpus=(GpuInfo("nvidia", "NVIDIA GeForce RTX 4060", 8 * GIB, None),))
    )
    assert (
        split.runs_on == "partial"
        and "7.0 GB of it on the GPU (272 GB/s), the rest on the CPU" in split.reason
    )
    slow = default_model(machine(8 * GIB, 1, flags=()))
    assert slow.reason.endswith("below the 8 tokens/s that keep up with a reader (a remote LLM is faster)")


# -- where the choice is shown -----------------------------------------------------------------------
@pytest.fixture
def vm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every hardware detection sees this_vm()."""
    monkeypatch.setattr(hw_report, "detect", lambda models_dir, **_kw: this_vm())


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from stigmer.cli.main import main

    code = main(list(args))
    return code, capsys.readouterr().out


def test_status_and_doctor_show_the_expected_speed_and_why(
    vm: None, isolated_home: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    llm_setup.look_at_machine(store.load(isolated_home), isolated_home)  # what `stigmer server` does
    remembered = json.loads((isolated_home.data_dir / "default-model.json").read_text())
    assert remembered["model"] == "qwen2.5-coder:1.5b" and remembered["tokens_per_second"] == 10.1

    code, out = run(capsys, "server", "llm", "status", "--json")
    data = json.loads(out)
    assert code == 0 and data["model"] == "qwen2.5-coder:1.5b" and data["expected_tokens_per_second"] == 10.1
    [note] = data["notes"]
    assert note.startswith("Chosen for this machine: 25.8 GB of RAM, 2 CPU cores, no GPU: qwen2.5-coder:1.5b")
    assert "about 10 tokens/s here" in note and note.endswith(
        "To choose another: stigmer config set llm.model NAME"
    )
    _code, text = run(capsys, "server", "llm", "status")
    assert "Model:    qwen2.5-coder:1.5b" in text and "should generate about 10 tokens/s here" in text

    _code, doc = run(capsys, "doctor")
    assert "Model:     qwen2.5-coder:1.5b" in doc and "Speed:     about 10 tokens/s expected here" in doc
    assert "chosen for this machine: 25.8 GB of RAM, 2 CPU cores" in doc
    report = json.loads(run(capsys, "doctor", "--json")[1])
    assert report["llm"]["expected_tokens_per_second"] == 10.1


def test_the_offline_fallback_names_the_model_chosen_for_this_machine(
    vm: None, isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fault: the notice called the configured model qwen2.5-coder:7b (the settings' placeholder)
    # while the machine's choice was another. The runtime cannot be downloaded (no network); the
    # built-in engine's start is not what is tested here.
    def serve(provider, report, *, before_download=None):  # type: ignore[no-untyped-def]
        if provider.name == "ollama":
            raise NetworkUnreachable("connection refused", code=ErrorCode.NETWORK_UNREACHABLE)
        return True

    monkeypatch.setattr(llm_setup, "serve", serve)
    result = llm_setup.setup(store.load(isolated_home), isolated_home)
    fb = result.status.fallback
    assert fb is not None and fb["configured_model"] == "qwen2.5-coder:1.5b"
    assert fb["configured_provider"] == "ollama" and result.status.provider == "llamacpp"
    out = Out(io.StringIO(), io.StringIO())
    out.fallback_block(fb)
    text = out.stdout.getvalue()  # type: ignore[attr-defined]
    assert "weaker than\n            the configured qwen2.5-coder:1.5b" in text
    assert "stigmer server llm pull qwen2.5-coder:1.5b" in text and "qwen2.5-coder:7b" not in text


def test_a_model_set_by_the_user_is_the_one_the_fallback_names(
    vm: None, isolated_home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STIGMER_LLM_MODEL", "llama3.2:3b")

    def serve(provider, report, *, before_download=None):  # type: ignore[no-untyped-def]
        if provider.name == "ollama":
            raise NetworkUnreachable("connection refused", code=ErrorCode.NETWORK_UNREACHABLE)
        return True

    monkeypatch.setattr(llm_setup, "serve", serve)
    fb = llm_setup.setup(store.load(isolated_home), isolated_home).status.fallback
    assert fb is not None and fb["configured_model"] == "llama3.2:3b"


def test_doctor_notes_a_model_set_by_hand_that_is_slow_here() -> None:
    from stigmer.doctor import _slow_on_cpu

    notes: list[str] = []
    _slow_on_cpu("ollama", "qwen2.5-coder:14b", 9_000_000_000, this_vm(), notes)
    assert notes == [
        "qwen2.5-coder:14b (9.0 GB) should generate only about 1.1 tokens/s here, on 2 CPU cores: below the "
        "8 that keep up with a reader. qwen2.5-coder:1.5b runs at about 10 tokens/s here: "
        "stigmer config set llm.model qwen2.5-coder:1.5b"
    ]
    _slow_on_cpu("llamacpp", "smollm2:135m", 98_000_000, this_vm(), notes)  # ~102 tokens/s: nothing to say
    assert len(notes) == 1

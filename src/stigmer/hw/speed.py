"""How fast a model generates text here: an estimate of decode tokens/s, without running anything.

Generating one token reads every weight of a dense model once, so decoding is bound by how fast the
weights stream through the processor that runs them:

    tokens/s ~= effective bandwidth / bytes read per token (~ the model file: weights dominate)

- **GPU** (the model whole in VRAM): the card's memory bandwidth (a table of known cards, by name)
  times GPU_EFFICIENCY. Apple Silicon runs the model with Metal on unified memory: the chip's
  bandwidth, same efficiency.
- **CPU**: the lower of two limits. Each physical core dequantizes and multiplies a few GB/s of
  quantized weights (PER_CORE: compute, not the memory bus, is what limits a machine with few cores),
  and all cores together cannot read faster than the memory bus (CPU_MEMORY_CAP).
- **Partly on a GPU**: each token reads the GPU's share at the GPU's rate and the rest at the CPU's,
  one after the other: seconds per token = on_gpu / gpu rate + in_ram / cpu rate.

The figures, and what they were checked against (../shared/reference/measurements.md and
bench/README.md for this machine; llama.cpp's public benchmarks for the rest):

- PER_CORE 5 GB/s for a core with 256-bit SIMD (AVX2, AVX-512, ARM dot-product), calibrated on the
  2-core AMD EPYC VM of ../shared/reference/measurements.md: it decodes the starter model
  (SmolLM2-135M Q4_1, 98 MB) at 98-116 tokens/s with 2 threads and ~70 with 1 (9.6-11.4 and ~6.9 GB/s,
  per-token overhead included), and qwen2.5-coder:14b (9.0 GB) at about 1 token/s (~9 GB/s).
  bench/speed_estimate.py measures qwen2.5-coder-shaped models there: on a quiet machine 17.9
  tokens/s for the 1.5b shape (1.06 GB) and 9.3 for the 3b shape (2.0 GB) with 2 threads (~19 GB/s,
  ~9.5 per core), 8.4 and 4.6 with 1 thread; but 1.6 tokens/s for the 1.5b when another program kept
  one of the two cores busy (llama.cpp's threads wait for each other at every step). 5 GB/s is about
  half a quiet core: what it keeps while the same cores run the server, the agent runner and the
  user's programs. Faster desktop cores do more (a 13900K: 12.6 tokens/s with 4 threads on a 3.8 GB
  7B, ~12 GB/s per core, llama.cpp issue 34), so this is a floor. Without those instructions llama.cpp's kernels are
  several times slower: 2 GB/s.
- CPU_MEMORY_CAP 40 GB/s: dual-channel DDR4-3200 (51 GB/s peak) at ~80%, the common desktop and
  laptop; DDR5 desktops reach ~70 GB/s (13900K, DDR5-6400: 18.3 tokens/s on the 3.8 GB 7B with 8
  threads) and servers with more memory channels more, so again a floor.
- GPU_EFFICIENCY 0.6: an RTX 4090 (1008 GB/s) decodes a 7B in F16 (13.5 GB) at 61 tokens/s and in
  Q8_0 (7.2 GB) at 98 (llama.cpp PR 4766): 70-80% of its peak; llama.cpp's Metal kernels went from
  ~35% of an M2 Max's 400 GB/s (7B Q4_0 at 27 ms a token, 2023) to ~77% on an M5 Max (2026). Big data
  centre GPUs reach less of their peak on models this small, but far more tokens/s than any
  threshold here.

Memory bandwidth is not measured: a probe from Python copies with one thread (it cannot see what
all cores together get), and the same 64 MB copy on this VM gave 14-36 GB/s from one run to the next,
so it could not tell a 40 GB/s machine from an 80 GB/s one; the estimate is a pure function of the
hardware report instead, the same at every start, and the tests pass any machine they need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stigmer.hw.report import CpuInfo, GpuInfo

GB = 1e9

PER_CORE = 5 * GB  # bytes of weights per second one core decodes, with 256-bit SIMD
PER_CORE_PLAIN = 2 * GB  # ... without it
SIMD_FLAGS = frozenset({"avx2", "avx512f", "dotprod"})
CPU_MEMORY_CAP = 40 * GB
GPU_EFFICIENCY = 0.6
UNKNOWN_GPU = 250  # GB/s for a dedicated GPU not in the table: an entry-level card (RTX 4060: 272)
UNKNOWN_APPLE = 100  # GB/s for an Apple chip not in the table: the base M2/M3

# Peak memory bandwidth in GB/s, from the vendors' specifications; the first pattern that matches the
# lower-cased name wins, so the specific variants come first.
GPU_BANDWIDTH: tuple[tuple[str, int], ...] = (
    # NVIDIA data centre
    (r"b200", 8000), (r"h200", 4800), (r"h100.*nvl", 3900), (r"h100.*pcie", 2000), (r"h100", 3350),
    (r"a100.*80", 2039), (r"a100", 1555), (r"l40", 864), (r"\bl4\b", 300),
    (r"\ba10g?\b", 600), (r"\ba40\b", 696), (r"\bt4\b", 320), (r"v100", 900), (r"p100", 732),
    (r"p40\b", 347), (r"rtx 6000 ada", 960), (r"rtx a6000", 768), (r"rtx a5000", 768),
    (r"rtx a4000", 448),
    # NVIDIA GeForce
    (r"5090", 1792), (r"5080", 960), (r"5070 ti", 896), (r"5070", 672), (r"5060 ti", 448), (r"5060", 448),
    (r"4090", 1008), (r"4080", 717), (r"4070 ti super", 672), (r"4070 ti", 504), (r"4070", 504),
    (r"4060 ti", 288), (r"4060", 272), (r"3090", 936), (r"3080 ti", 912), (r"3080", 760),
    (r"3070", 448), (r"3060 ti", 448), (r"3060", 360), (r"3050", 224), (r"2080 ti", 616),
    (r"2080", 448), (r"2070", 448), (r"2060", 336), (r"1080 ti", 484), (r"1080", 320), (r"1070", 256),
    # AMD
    (r"mi300", 5300), (r"mi250", 3277), (r"mi210", 1638), (r"mi100", 1229), (r"7900 ?xtx", 960),
    (r"7900 ?xt", 800), (r"7900 ?gre", 576), (r"7800 ?xt", 624), (r"7700 ?xt", 432), (r"7600", 288),
    (r"6950", 576), (r"6900", 512), (r"6800", 512), (r"6700", 384), (r"6600", 256),
)  # fmt: skip
APPLE_BANDWIDTH: tuple[tuple[str, int], ...] = (
    (r"m1 ultra", 800), (r"m1 max", 400), (r"m1 pro", 200), (r"m1", 68),
    (r"m2 ultra", 800), (r"m2 max", 400), (r"m2 pro", 200), (r"m2", 100),
    (r"m3 ultra", 819), (r"m3 max", 400), (r"m3 pro", 150), (r"m3", 100),
    (r"m4 max", 546), (r"m4 pro", 273), (r"m4", 120),
)  # fmt: skip


@dataclass(frozen=True)
class Bandwidth:
    """Bytes of weights per second a processor decodes, and what the figure rests on."""

    rate: float  # bytes/s, efficiency included
    note: str  # "3350 GB/s", "assumed 250 GB/s", "limited by the memory bus", or ""


def cpu_bandwidth(cpu: CpuInfo) -> Bandwidth:
    """The CPU's: its physical cores (llama.cpp and the runtime run one thread per physical core), up
    to the memory bus."""
    cores = max(1, cpu.physical_cores)
    per_core = PER_CORE if cpu.flags & SIMD_FLAGS else PER_CORE_PLAIN
    if cores * per_core > CPU_MEMORY_CAP:
        return Bandwidth(CPU_MEMORY_CAP, "limited by the memory bus")
    return Bandwidth(cores * per_core, "")


def _lookup(name: str, table: tuple[tuple[str, int], ...]) -> int | None:
    low = " ".join(name.lower().replace("-", " ").split())
    return next((gbs for pattern, gbs in table if re.search(pattern, low)), None)


def gpu_bandwidth(gpu: GpuInfo) -> Bandwidth:
    """A GPU's effective decode bandwidth (Apple Silicon's: the chip's unified memory)."""
    table, unknown = (
        (APPLE_BANDWIDTH, UNKNOWN_APPLE) if gpu.vendor == "apple" else (GPU_BANDWIDTH, UNKNOWN_GPU)
    )
    peak = _lookup(gpu.name, table)
    note = f"{peak} GB/s" if peak is not None else f"assumed {unknown} GB/s"
    return Bandwidth((peak or unknown) * GB * GPU_EFFICIENCY, note)


def tokens_per_second(
    model_bytes: float, cpu: Bandwidth, gpu: Bandwidth | None = None, on_gpu: float = 0
) -> float:
    """Decode speed of a model of `model_bytes` with `on_gpu` of its bytes on `gpu`, the rest in RAM."""
    on_gpu = min(max(on_gpu, 0), model_bytes) if gpu is not None else 0
    seconds = (on_gpu / gpu.rate if gpu is not None and on_gpu else 0) + (model_bytes - on_gpu) / cpu.rate
    return 1 / seconds if seconds > 0 else 0.0


def shown(tps: float) -> str:
    """A speed as said to users: "about 12", "about 5.3" (the estimate is no closer than that)."""
    return f"about {tps:.0f}" if tps >= 10 else f"about {tps:.1f}"

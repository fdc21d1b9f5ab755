"""What a model needs (weights + KV cache + overhead) and where it fits (GPU, GPU+CPU, CPU, nowhere).

Pure functions over a GGUF header (or the few facts taken from one) and a HardwareReport, so every
figure can be checked by hand in the tests.

The estimate, for llama.cpp as the built-in engine runs it (f16 KV cache, micro-batches of 512 tokens,
flash attention on, as llama.cpp's "auto" chooses on CPU, CUDA and Metal):

    weights  = the tensor data (what the loader maps; the file size when the tensors are unknown)
    kv_cache = n_ctx x n_layers x (key_length + value_length) x n_head_kv x 2 bytes
    overhead = 256 MiB                                  runtime, backend contexts, allocator slack
             + 4 x 512 x (3 x n_ff + 4 x n_embd)        f32 activations of one micro-batch (FFN, attention)
             + 2 x 512 x n_ctx                          flash attention's f16 mask of one micro-batch

Checked against llama.cpp's own log for SmolLM2-135M (n_ff 1536, n_embd 576): the formula's compute
part gives 13.5 MiB + 2 MiB at 2048 tokens and + 8 MiB at 8192; llama.cpp reserved 16.6 and 22.6 MiB,
and its KV cache (45 and 180 MiB) is exactly kv_cache. Ollama's llm/memory.go sizes the graph for
attention without flash attention (4 x batch x n_ctx x n_head bytes), which llama.cpp no longer
allocates; the fixed 256 MiB is there for what no formula sees (CUDA/Metal contexts, fragmentation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stigmer.hw.report import GpuInfo, HardwareReport
from stigmer.llm.gguf import GgufHeader
from stigmer.units import human_bytes

MIB = 1 << 20
GIB = 1 << 30
FIXED_OVERHEAD = 256 * MIB
N_UBATCH = 512  # llama.cpp's default micro-batch
KV_BYTES_PER_ELEMENT = 2  # f16
# What each GPU runtime takes before any model (Ollama's discover package reserves the same amounts).
GPU_RESERVE = {"nvidia": 457 * MIB, "amd": 457 * MIB, "apple": 512 * MIB, "other": 512 * MIB}
# Metal lets the GPU wire about this share of unified memory (recommendedMaxWorkingSetSize).
APPLE_GPU_SHARE = 2 / 3
CONTEXT_STEP = 256
UNKNOWN_CONTEXT = 4096  # when a header gives no trained context: llama.cpp's long-time default

FitKind = Literal["gpu", "partial", "cpu", "does_not_fit"]


@dataclass(frozen=True)
class ModelFacts:
    """The few numbers of a model that memory depends on."""

    n_layers: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    embedding_length: int
    feed_forward_length: int
    context_length: int  # trained maximum; 0 when unknown
    weights: int  # bytes

    @classmethod
    def from_header(cls, header: GgufHeader, *, file_size: int | None = None) -> ModelFacts:
        weights = header.tensor_data_size if header.tensors else (file_size or 0)
        return cls(
            n_layers=header.block_count,
            n_head=header.head_count,
            n_head_kv=header.head_count_kv,
            key_length=header.key_length,
            value_length=header.value_length,
            embedding_length=header.embedding_length,
            feed_forward_length=header.feed_forward_length,
            context_length=header.context_length,
            weights=weights,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    n_ctx: int
    weights: int
    kv_cache: int
    overhead: int
    n_layers: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def per_layer(self) -> int:
        """Weights and KV cache of one layer: the unit a partial GPU offload moves."""
        return (self.weights + self.kv_cache) // max(self.n_layers, 1)


@dataclass(frozen=True)
class FitResult:
    kind: FitKind
    reason: str
    gpu: GpuInfo | None = None  # the GPU that takes all or part of the model
    disk_ok: bool = True
    disk_reason: str = ""


def kv_cache_bytes(
    n_ctx: int,
    n_layers: int,
    n_head_kv: int,
    key_length: int,
    value_length: int,
    bytes_per_element: float = KV_BYTES_PER_ELEMENT,
) -> int:
    """llama.cpp's KV cache: one K and one V vector per head, per layer, per token of context."""
    return int(n_ctx * n_layers * (key_length + value_length) * n_head_kv * bytes_per_element)


def overhead_bytes(facts: ModelFacts, n_ctx: int) -> int:
    n_ff = facts.feed_forward_length or 4 * facts.embedding_length  # the usual ratio when unknown
    compute = 4 * N_UBATCH * (3 * n_ff + 4 * facts.embedding_length)
    mask = 2 * N_UBATCH * n_ctx
    return FIXED_OVERHEAD + compute + mask


def _facts(model: GgufHeader | ModelFacts) -> ModelFacts:
    return model if isinstance(model, ModelFacts) else ModelFacts.from_header(model)


def estimate(model: GgufHeader | ModelFacts, n_ctx: int) -> MemoryEstimate:
    facts = _facts(model)
    kv = kv_cache_bytes(n_ctx, facts.n_layers, facts.n_head_kv, facts.key_length, facts.value_length)
    return MemoryEstimate(n_ctx, facts.weights, kv, overhead_bytes(facts, n_ctx), facts.n_layers)


def gpu_budget(gpu: GpuInfo, ram_total: int) -> int:
    """Bytes a model may take on `gpu`: free VRAM minus the runtime's reserve; for Apple's unified
    memory the share of RAM Metal lets the GPU use."""
    reserve = GPU_RESERVE[gpu.vendor]
    if gpu.unified_memory:
        return max(0, int(ram_total * APPLE_GPU_SHARE) - reserve)
    usable = gpu.usable
    return max(0, usable - reserve) if usable is not None else 0


def best_gpu(hardware: HardwareReport) -> tuple[GpuInfo | None, int]:
    """The GPU with the largest budget, and that budget (None, 0 without a usable one)."""
    scored = [(gpu_budget(g, hardware.ram_total), g) for g in hardware.gpus]
    scored = [(budget, g) for budget, g in scored if budget > 0]
    if not scored:
        return None, 0
    budget, gpu = max(scored, key=lambda pair: pair[0])
    return gpu, budget


def fit(estimate: MemoryEstimate, hardware: HardwareReport, free_disk_needed: int = 0) -> FitResult:
    """Where the model runs: wholly on the best GPU, split between it and the CPU, on the CPU, or not
    at all; and, separately, whether `free_disk_needed` bytes (a download) fit on the disk."""
    need = estimate.total
    ram = hardware.ram_available
    gpu, vram = best_gpu(hardware)
    if free_disk_needed > hardware.disk_free:
        disk_ok = False
        disk_reason = (
            f"needs {human_bytes(free_disk_needed)} of disk, "
            f"{human_bytes(hardware.disk_free)} free in {hardware.models_dir}"
        )
    else:
        disk_ok, disk_reason = True, ""

    def result(kind: FitKind, reason: str, on: GpuInfo | None = None) -> FitResult:
        return FitResult(kind, reason, on, disk_ok, disk_reason)

    if gpu is not None and need <= vram:
        return result("gpu", f"needs {human_bytes(need)}, {human_bytes(vram)} usable on {gpu.name}", gpu)
    if gpu is not None and not gpu.unified_memory and vram >= estimate.overhead + estimate.per_layer:
        # Enough VRAM for the compute buffers and one layer at least: llama.cpp offloads what fits.
        if need <= vram + ram:
            return result(
                "partial",
                f"needs {human_bytes(need)}: {human_bytes(vram)} usable on {gpu.name} holds part, "
                f"the other {human_bytes(need - vram)} go to RAM ({human_bytes(ram)} available)",
                gpu,
            )
    where = f", {human_bytes(vram)} usable on {gpu.name}" if gpu is not None else ""
    if need <= ram:
        return result("cpu", f"needs {human_bytes(need)}, {human_bytes(ram)} of RAM available{where}")
    return result("does_not_fit", f"needs {human_bytes(need)}, {human_bytes(ram)} of RAM available{where}")


def choose_context(
    model: GgufHeader | ModelFacts,
    available_memory: int,
    *,
    floor: int = 2048,
    cap: int | None = None,
) -> tuple[int, str]:
    """The largest context (a multiple of 256, up to the trained maximum and `cap`) whose whole
    estimate fits in `available_memory`; never below `floor` (or the trained maximum if smaller),
    with a note saying why it is not the maximum.
    """
    facts = _facts(model)
    trained = facts.context_length or UNKNOWN_CONTEXT
    ceiling = min(trained, cap) if cap else trained
    low = min(floor, ceiling)

    def fits(n: int) -> bool:
        return estimate(facts, n).total <= available_memory

    if fits(ceiling):
        return ceiling, ""
    # Largest k with fits(k x 256): the estimate grows with n_ctx, so a binary search finds it.
    lo, hi = 0, ceiling // CONTEXT_STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * CONTEXT_STEP):
            lo = mid
        else:
            hi = mid - 1
    best = lo * CONTEXT_STEP
    if best < low:
        return low, (
            f"only {best} tokens of context fit in {human_bytes(available_memory)}; "
            f"using {low} anyway, expect the system to swap"
        )
    return best, f"context limited to {best} tokens by memory (the model supports {ceiling})"


# (tag, download size as Ollama's library lists it, in bytes) of the qwen2.5-coder family, smallest
# first: one family at every size keeps the chat template and tool-calling behaviour the agents are
# tuned for. (The seed document's pick for small machines, deepseek-coder:6.7b, is a 3.8 GB download:
# hardly smaller than the 7b, and too big for the 4-6 GB machines that need a smaller model.)
MODELS = {
    "1.5b": ("qwen2.5-coder:1.5b", "986 MB", 986_000_000),
    "3b": ("qwen2.5-coder:3b", "1.9 GB", 1_900_000_000),
    "7b": ("qwen2.5-coder:7b", "4.7 GB", 4_700_000_000),
    "14b": ("qwen2.5-coder:14b", "9.0 GB", 9_000_000_000),
    "32b": ("qwen2.5-coder:32b", "20 GB", 20_000_000_000),
}
_ORDER = list(MODELS)
# Machines report less than the size they are sold with (firmware and integrated graphics reserve
# some), so an "8 GB" laptop shows ~7.6 GiB: thresholds sit half a GiB or so below the nominal sizes.
RAM_TIERS = ((15 * GIB, "14b"), (7.5 * GIB, "7b"), (5.5 * GIB, "3b"), (0, "1.5b"))
VRAM_TIERS = ((22 * GIB, "32b"), (11 * GIB, "14b"), (7 * GIB, "7b"))
MIN_RAM = 5.5 * GIB  # "6 GB"
# The slowest generation the default model may have here (tokens/s). People read ~4-5 words (~5-7
# tokens) a second, so at 8 an answer streams faster than it is read, and an agent step of ~300 tokens
# takes under 40 s; the estimate (hw.speed) is a floor, so real speeds are at or above it. On a common
# 8-core desktop without a GPU (dual-channel memory, ~40 GB/s) it keeps the 7b (about 8.5 tokens/s)
# and drops the 14b (about 4.4); on a 2-core VM (about 10 GB/s) only the 1.5b reaches it.
USABLE_TOKENS_PER_SECOND = 8.0
# VRAM a partly offloaded model leaves for the KV cache and compute buffers (a 14b at 4096 tokens of
# context needs ~0.8 GB of KV cache plus llama.cpp's buffers).
GPU_CONTEXT_ALLOWANCE = 1 * GIB


@dataclass(frozen=True)
class DefaultChoice:
    model: str
    reason: str
    tokens_per_second: float  # the estimate for `model` here (hw.speed)
    runs_on: str  # gpu | partial | cpu, as the estimate assumes


def memory_tier(ram_total: int, vram_total: int = 0) -> str:
    """The largest size memory allows (the upper bound of the choice): by RAM, 16 GB or more -> 14b,
    8 GB -> 7b, 6 GB -> 3b, less -> 1.5b; a dedicated GPU with room for a bigger model in VRAM lifts it
    (8 GB -> 7b, 12 GB -> 14b, 24 GB -> 32b). Apple's unified memory is RAM."""
    ram_size = next(size for limit, size in RAM_TIERS if ram_total >= limit)
    vram_size = next((size for limit, size in VRAM_TIERS if vram_total >= limit), None)
    if vram_size is not None and _ORDER.index(vram_size) > _ORDER.index(ram_size):
        return vram_size
    return ram_size


def _machine(hardware: HardwareReport, gpu: GpuInfo | None) -> str:
    cores = hardware.cpu.physical_cores
    parts = [f"{human_bytes(hardware.ram_total)} of RAM", f"{cores} CPU core{'s' if cores != 1 else ''}"]
    if gpu is not None and gpu.unified_memory:
        parts.append(f"{gpu.name} sharing the RAM")
    elif gpu is not None:
        parts.append(f"a GPU with {human_bytes(gpu.memory_total or 0)} of memory ({gpu.name})")
    else:
        parts.append("no usable GPU" if hardware.gpus else "no GPU")
    return ", ".join(parts)


def default_model(hardware: HardwareReport, *, usable: float = USABLE_TOKENS_PER_SECOND) -> DefaultChoice:
    """The model to install by default, why, and how fast it is expected to generate here.

    The largest size that memory allows (memory_tier: RAM, raised by a GPU's VRAM) and that reaches
    `usable` tokens/s by the estimate of hw.speed: on the GPU when it holds the whole model (within
    its VRAM tier, or with room to spare), split between GPU and CPU when it holds part, else on the
    CPU. When no size is fast enough, the smallest, saying so.
    """
    from stigmer.hw import speed

    dedicated = [g for g in hardware.gpus if not g.unified_memory and g.memory_total]
    gpu = max(dedicated, key=lambda g: g.memory_total or 0, default=None)
    apple = next((g for g in hardware.gpus if g.unified_memory), None)
    cpu = speed.cpu_bandwidth(hardware.cpu)
    top = memory_tier(hardware.ram_total, hardware.vram_total)
    vram_size = next((size for limit, size in VRAM_TIERS if hardware.vram_total >= limit), None)

    def estimate(size: str) -> tuple[float, str, str]:
        """(tokens/s, gpu | partial | cpu, where it runs in words) for a size."""
        nbytes = MODELS[size][2]
        if apple is not None:
            bw = speed.gpu_bandwidth(apple)
            return speed.tokens_per_second(nbytes, cpu, bw, nbytes), "gpu", f"on the GPU ({bw.note})"
        if gpu is not None:
            bw = speed.gpu_bandwidth(gpu)
            room = (gpu.memory_total or 0) - GPU_RESERVE[gpu.vendor] - GPU_CONTEXT_ALLOWANCE
            if (vram_size is not None and _ORDER.index(size) <= _ORDER.index(vram_size)) or room >= nbytes:
                return speed.tokens_per_second(nbytes, cpu, bw, nbytes), "gpu", f"on the GPU ({bw.note})"
            if room > 0:
                tps = speed.tokens_per_second(nbytes, cpu, bw, room)
                return (
                    tps,
                    "partial",
                    f"{human_bytes(room)} of it on the GPU ({bw.note}), the rest on the CPU",
                )
        return (
            speed.tokens_per_second(nbytes, cpu),
            "cpu",
            "on the CPU" + (f" ({cpu.note})" if cpu.note else ""),
        )

    candidates = _ORDER[: _ORDER.index(top) + 1]
    chosen = next((s for s in reversed(candidates) if estimate(s)[0] >= usable), candidates[0])
    tps, runs_on, where = estimate(chosen)
    name, download, _nbytes = MODELS[chosen]
    reason = (
        f"{_machine(hardware, gpu or apple)}: {name} ({download}) should generate "
        f"{speed.shown(tps)} tokens/s here, {where}"
    )
    bigger = _ORDER.index(chosen) + 1
    if tps < usable:
        reason += f", below the {usable:.0f} tokens/s that keep up with a reader (a remote LLM is faster)"
    elif bigger < len(candidates):
        other = candidates[bigger]
        reason += (
            f"; {MODELS[other][0]} fits in memory but would generate {speed.shown(estimate(other)[0])}, "
            f"below the {usable:.0f} tokens/s that keep up with a reader"
        )
    return DefaultChoice(name, reason, round(tps, 1), runs_on)


def requirements_warning(ram_total: int) -> str | None:
    """A warning for machines below the 6 GB local models need, or None."""
    if ram_total >= MIN_RAM:
        return None
    return (
        f"This machine has {human_bytes(ram_total)} of RAM; local models need about 6 GB and may be slow "
        f"or unstable here. Use a smaller model ({MODELS['1.5b'][0]}) or a remote provider instead."
    )

"""All GPUs of the machine: NVIDIA (nvidia-smi), AMD (sysfs, else rocm-smi), Apple Silicon, and
others seen on the PCI bus; plus the problems met on the way.

Apple Silicon has no VRAM of its own: the GPU uses the RAM (unified memory), so its memory_total is
the RAM and its name the chip's (sysctl's machdep.cpu.brand_string, "Apple M2 Pro").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from stigmer.hw import amd, nvidia
from stigmer.hw.report import GpuInfo
from stigmer.hw.run import Run


def apple_gpu(*, system: str, arch: str, ram_total: int, chip: str) -> GpuInfo | None:
    """The integrated GPU of an Apple Silicon Mac (macOS on arm64), or None elsewhere."""
    if system != "Darwin" or arch != "aarch64":
        return None
    return GpuInfo(
        vendor="apple",
        name=chip or "Apple Silicon GPU",
        memory_total=ram_total,
        memory_free=None,  # shared with everything else: fit() budgets a share of the RAM instead
        driver="Metal",
        index=0,
        unified_memory=True,
    )


def detect_gpus(
    *,
    system: str,
    arch: str,
    environ: Mapping[str, str],
    run: Run,
    timeout: float,
    ram_total: int,
    chip: str = "",
    sysfs: Path = amd.SYSFS,
    is_file: Callable[[str], bool] = os.path.isfile,
) -> tuple[list[GpuInfo], list[str]]:
    apple = apple_gpu(system=system, arch=arch, ram_total=ram_total, chip=chip)
    if apple is not None:
        return [apple], []
    problems: list[str] = []
    pci = amd.pci_gpus(sysfs) if system == "Linux" else []

    nvidia_gpus: list[GpuInfo] = []
    smi = nvidia.find(system, environ, is_file=is_file) if system != "Darwin" else None
    if smi is not None:
        nvidia_gpus, notes = nvidia.detect_nvidia(smi, run=run, timeout=timeout)
        problems += notes
    if not nvidia_gpus:
        nvidia_gpus = [g for g in pci if g.vendor == "nvidia"]  # listed, with memory unknown
        if nvidia_gpus and smi is None:
            problems.append(
                "an NVIDIA GPU is installed but nvidia-smi was not found: install the NVIDIA driver to use it"
            )

    amd_gpus = [g for g in pci if g.vendor == "amd"]
    if not amd_gpus or any(g.memory_total is None for g in amd_gpus):
        rocm = amd.find_rocm_smi(environ, is_file=is_file) if system == "Linux" else None
        if rocm is not None:
            found, notes = amd.detect_rocm(rocm, run=run, timeout=timeout)
            problems += notes
            amd_gpus = found or amd_gpus

    others = [g for g in pci if g.vendor == "other"]
    return nvidia_gpus + amd_gpus + others, problems

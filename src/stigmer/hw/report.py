"""What this machine has for running a model: RAM, CPU, GPUs, free disk, and what detection ran into.

`detect` never raises for a missing or broken probe: a driver that does not answer, a tool that is not
installed or output we do not understand becomes a line in `problems` (shown by `doctor`), and the
rest of the report is still filled in. Detection runs each external program with a deadline, so it
returns within a few seconds even when nvidia-smi hangs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stigmer.hw.run import DEFAULT_TIMEOUT, Run

log = logging.getLogger(__name__)

GpuVendor = Literal["nvidia", "amd", "apple", "other"]


@dataclass(frozen=True)
class CpuInfo:
    physical_cores: int
    logical_cores: int
    arch: str  # x86_64 or aarch64 (normalised: AMD64 and arm64 say the same things differently)
    flags: frozenset[str]  # the instruction sets llama.cpp's builds select on (cpu.LLAMA_FLAGS)
    model: str = ""


@dataclass(frozen=True)
class GpuInfo:
    vendor: GpuVendor
    name: str
    memory_total: int | None  # bytes; None when unknown
    memory_free: int | None  # bytes; None when unknown
    driver: str = ""
    index: int = 0
    unified_memory: bool = False  # Apple Silicon: the GPU shares the RAM

    @property
    def usable(self) -> int | None:
        """Bytes a model may take on it now: free memory, else total; None when nothing is known."""
        return self.memory_free if self.memory_free is not None else self.memory_total


@dataclass(frozen=True)
class HardwareReport:
    ram_total: int
    ram_available: int
    cpu: CpuInfo
    disk_free: int  # bytes free on the file system holding models_dir
    models_dir: Path
    gpus: list[GpuInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def vram_total(self) -> int:
        """Memory of the largest dedicated GPU (0 without one; Apple's unified memory is RAM)."""
        return max((g.memory_total or 0 for g in self.gpus if not g.unified_memory), default=0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (sizes in bytes) for `--json` output."""
        return {
            "ram_total": self.ram_total,
            "ram_available": self.ram_available,
            "cpu": {
                "physical_cores": self.cpu.physical_cores,
                "logical_cores": self.cpu.logical_cores,
                "arch": self.cpu.arch,
                "flags": sorted(self.cpu.flags),
                "model": self.cpu.model,
            },
            "disk_free": self.disk_free,
            "models_dir": str(self.models_dir),
            "gpus": [
                {
                    "vendor": g.vendor,
                    "name": g.name,
                    "memory_total": g.memory_total,
                    "memory_free": g.memory_free,
                    "driver": g.driver,
                    "index": g.index,
                    "unified_memory": g.unified_memory,
                }
                for g in self.gpus
            ],
            "problems": list(self.problems),
        }


def normalize_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(m, m)


def disk_free(path: Path) -> int:
    """Free bytes on the file system that holds `path`, measured at its nearest existing ancestor (the
    models folder may not exist before the first download)."""
    import shutil

    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def detect(
    models_dir: Path,
    *,
    environ: Mapping[str, str] | None = None,
    run: Run | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> HardwareReport:
    """This machine's report. `environ` (PATH, ProgramFiles...) and `run` are for tests."""
    import platform  # here, not at import: fit.py imports this module for its types only

    from stigmer.hw import cpu, gpu, memory
    from stigmer.hw.run import run_probe

    env = os.environ if environ is None else environ
    runner = run or run_probe
    system = platform.system()
    machine = platform.machine()
    problems: list[str] = []

    ram_total, ram_available, notes = memory.detect_memory(system=system)
    problems += notes
    cpu_info, notes = cpu.detect_cpu(system=system, machine=machine, run=runner, timeout=timeout)
    problems += notes
    gpus, notes = gpu.detect_gpus(
        system=system,
        arch=cpu_info.arch,
        environ=env,
        run=runner,
        timeout=timeout,
        ram_total=ram_total,
        chip=cpu_info.model,
    )
    problems += notes
    try:
        free = disk_free(models_dir)
    except OSError as e:
        problems.append(f"cannot measure free disk space for {models_dir}: {e.strerror or e}")
        free = 0
    for note in problems:
        log.info("hardware detection: %s", note)
    return HardwareReport(
        ram_total=ram_total,
        ram_available=ram_available,
        cpu=cpu_info,
        disk_free=free,
        models_dir=models_dir,
        gpus=gpus,
        problems=problems,
    )

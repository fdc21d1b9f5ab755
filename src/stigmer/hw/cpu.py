"""The CPU: cores, architecture, model name, and the instruction sets llama.cpp's builds select on.

Flags come from /proc/cpuinfo on Linux (`flags` on x86, `Features` on ARM), `sysctl` on macOS and
IsProcessorFeaturePresent on Windows; each source's names are mapped onto one vocabulary (LLAMA_FLAGS,
llama.cpp's system-info names, lower case), so the rest of the product asks one question ("avx2" in
flags) whatever the platform. The parsers are pure and tested on captured text.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from stigmer.hw.report import CpuInfo, normalize_arch
from stigmer.hw.run import Run

LLAMA_FLAGS = frozenset(
    {
        # x86
        "sse3", "ssse3", "avx", "avx2", "avx_vnni", "fma", "f16c", "bmi2", "avx512f", "avx512bw",
        "avx512_vbmi", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
        # ARM
        "neon", "fp16_va", "dotprod", "matmul_int8", "sve", "sve2", "sme",
    }
)  # fmt: skip

# Linux /proc/cpuinfo names -> ours. ARM kernels say "asimd" for NEON (Advanced SIMD) on 64-bit and
# "neon" on 32-bit; "asimdhp" is FP16 vector arithmetic, "asimddp" the dot-product instructions.
_LINUX = {
    "pni": "sse3", "ssse3": "ssse3", "avx": "avx", "avx2": "avx2", "avx_vnni": "avx_vnni", "fma": "fma",
    "f16c": "f16c", "bmi2": "bmi2", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512vbmi": "avx512_vbmi", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
    "amx_int8": "amx_int8", "amx_bf16": "amx_bf16",
    "asimd": "neon", "neon": "neon", "asimdhp": "fp16_va", "asimddp": "dotprod", "i8mm": "matmul_int8",
    "sve": "sve", "sve2": "sve2", "sme": "sme",
}  # fmt: skip

# macOS `sysctl hw.optional` keys (lower-cased) -> ours.
_SYSCTL = {
    "hw.optional.sse3": "sse3", "hw.optional.supplementalsse3": "ssse3", "hw.optional.avx1_0": "avx",
    "hw.optional.avx2_0": "avx2", "hw.optional.fma": "fma", "hw.optional.f16c": "f16c",
    "hw.optional.bmi2": "bmi2",
    "hw.optional.avx512f": "avx512f", "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vbmi": "avx512_vbmi",
    "hw.optional.neon": "neon", "hw.optional.advsimd": "neon", "hw.optional.neon_fp16": "fp16_va",
    "hw.optional.arm.feat_fp16": "fp16_va", "hw.optional.arm.feat_dotprod": "dotprod",
    "hw.optional.arm.feat_i8mm": "matmul_int8", "hw.optional.arm.feat_sme": "sme",
}  # fmt: skip
# Intel Macs list F16C only among machdep.cpu.features (upper case, space separated).
_MACHDEP = {"F16C": "f16c", "FMA": "fma", "AVX1.0": "avx", "AVX2": "avx2"}
SYSCTL_ARGV = ["sysctl", "hw.optional", "machdep.cpu.features", "machdep.cpu.brand_string"]

# Windows PF_* constants (winnt.h) -> ours.
WINDOWS_FEATURES = {
    13: "sse3", 36: "ssse3", 39: "avx", 40: "avx2", 41: "avx512f",
    19: "neon", 43: "dotprod", 46: "sve", 47: "sve2",
}  # fmt: skip

# /proc/cpuinfo on ARM often has no model name, only the implementer code (ARM's MIDR register).
_IMPLEMENTERS = {
    0x41: "ARM", 0x42: "Broadcom", 0x43: "Cavium", 0x48: "HiSilicon", 0x4E: "NVIDIA", 0x51: "Qualcomm",
    0x61: "Apple", 0xC0: "Ampere",
}  # fmt: skip


def parse_cpuinfo(text: str) -> tuple[frozenset[str], str]:
    """(flags, model name) from the text of /proc/cpuinfo."""
    flags: set[str] = set()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        value = value.strip()
        if key in ("flags", "features"):
            flags.update(_LINUX[f] for f in value.lower().split() if f in _LINUX)
        else:
            fields.setdefault(key, value)
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu model", "")
    if not model and "cpu implementer" in fields:
        model = _arm_model(fields["cpu implementer"], fields.get("cpu part", ""))
    return frozenset(flags), model


def _arm_model(implementer: str, part: str) -> str:
    try:
        vendor = _IMPLEMENTERS.get(int(implementer, 0), f"implementer {implementer}")
    except ValueError:
        vendor = f"implementer {implementer}"
    return f"{vendor} CPU (part {part})" if part else f"{vendor} CPU"


def parse_sysctl(text: str) -> tuple[frozenset[str], str]:
    """(flags, brand string) from `sysctl hw.optional machdep.cpu.features machdep.cpu.brand_string`."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        low = key.lower()
        if low == "machdep.cpu.brand_string":
            model = value
        elif low == "machdep.cpu.features":
            flags.update(_MACHDEP[f] for f in value.split() if f in _MACHDEP)
        elif low in _SYSCTL and value == "1":
            flags.add(_SYSCTL[low])
    return frozenset(flags), model


def windows_flags(present: Callable[[int], bool], *, arch: str) -> frozenset[str]:
    """Our flags from IsProcessorFeaturePresent (passed in, so the mapping is tested anywhere).

    Windows has no PF_ constant for FMA or F16C; every x86 CPU with AVX2 (Intel since Haswell, AMD
    since Excavator) has both, so they are inferred from it. ARM64 Windows requires NEON.
    """
    flags = {name for pf, name in WINDOWS_FEATURES.items() if present(pf)}
    if "avx2" in flags:
        flags |= {"fma", "f16c"}
    if arch == "aarch64":
        flags.add("neon")
    return frozenset(flags)


def _windows_present(feature: int) -> bool:
    import ctypes

    windll = getattr(ctypes, "windll", None)  # only on Windows
    if windll is None:
        return False
    return bool(windll.kernel32.IsProcessorFeaturePresent(feature))


def _cores() -> tuple[int, int]:
    import psutil

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return physical, logical


def detect_cpu(
    *,
    system: str,
    machine: str,
    run: Run,
    timeout: float,
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> tuple[CpuInfo, list[str]]:
    """This CPU, and notes on what could not be read."""
    arch = normalize_arch(machine)
    physical, logical = _cores()
    problems: list[str] = []
    flags: frozenset[str] = frozenset()
    model = ""
    if system == "Linux":
        try:
            flags, model = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
        except OSError as e:
            problems.append(f"cannot read {cpuinfo}: {e.strerror or e}")
    elif system == "Darwin":
        try:
            # Exit code 1 only means one of the names is unknown (no machdep.cpu.features on Apple
            # Silicon): the others are still printed.
            _code, out, _err = run(SYSCTL_ARGV, timeout)
            flags, model = parse_sysctl(out)
        except (OSError, TimeoutError) as e:
            problems.append(f"sysctl failed: {e}")
        if arch == "aarch64":
            flags |= {"neon"}  # every Apple Silicon chip has it, even if sysctl did not answer
    elif system == "Windows":
        flags = windows_flags(_windows_present, arch=arch)
        model = _windows_model()
    return CpuInfo(physical, logical, arch, flags, re.sub(r"\s+", " ", model).strip()), problems


def _windows_model() -> str:
    """The marketing name ("AMD Ryzen 7 5800X 8-Core Processor") from the registry."""
    if sys.platform == "win32":  # mypy checks the body only for Windows
        import winreg

        try:
            path = r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path) as key:
                value, _type = winreg.QueryValueEx(key, "ProcessorNameString")
            return str(value)
        except OSError:
            pass
    return os.environ.get("PROCESSOR_IDENTIFIER", "")

"""GPUs seen on the PCI bus (Linux sysfs), with AMD's VRAM, and AMD GPUs through rocm-smi.

The amdgpu kernel driver publishes VRAM size and use in sysfs (`mem_info_vram_total`,
`mem_info_vram_used`), so no ROCm install is needed to know an AMD GPU's memory; rocm-smi is asked
only when sysfs has no figures. The PCI scan also sees GPUs with no driver loaded at all, which lets
the report say "an NVIDIA GPU is installed but its driver is not" instead of nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from stigmer.hw.report import GpuInfo, GpuVendor
from stigmer.hw.run import Run

SYSFS = Path("/sys")
ROCM_FOLDERS = ("/opt/rocm/bin",)
_VENDORS: dict[str, tuple[GpuVendor, str]] = {
    "0x1002": ("amd", "AMD"),
    "0x10de": ("nvidia", "NVIDIA"),
    "0x8086": ("other", "Intel"),
}  # other display controllers (a server's BMC VGA) compute nothing and are left out


def rocm_argv(exe: str) -> list[str]:
    return [exe, "--showmeminfo", "vram", "--showproductname", "--json"]


def pci_gpus(root: Path = SYSFS) -> list[GpuInfo]:
    """Display controllers (PCI class 0x03xxxx) from AMD, NVIDIA and Intel, in PCI address order.

    Only AMD's carry memory figures (amdgpu's sysfs files); the others have None until their own tool
    (nvidia-smi) answers.
    """
    devices = root / "bus" / "pci" / "devices"
    try:
        entries = sorted(devices.iterdir())
    except OSError:
        return []
    gpus: list[GpuInfo] = []
    for dev in entries:
        if not _read(dev / "class").startswith("0x03"):
            continue
        known = _VENDORS.get(_read(dev / "vendor").lower())
        if known is None:
            continue
        vendor, brand = known
        total = _int(dev / "mem_info_vram_total") if vendor == "amd" else None
        used = _int(dev / "mem_info_vram_used") if vendor == "amd" else None
        name = _read(dev / "product_name") or f"{brand} GPU (device {_read(dev / 'device') or '?'})"
        gpus.append(
            GpuInfo(
                vendor=vendor,
                name=name,
                memory_total=total,
                memory_free=total - used if total is not None and used is not None else None,
                driver=_driver(dev),
                index=sum(1 for g in gpus if g.vendor == vendor),
            )
        )
    return gpus


def _driver(dev: Path) -> str:
    try:
        return Path(os.readlink(dev / "driver")).name  # "amdgpu", "nvidia", "i915"
    except OSError:
        return ""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _int(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text.isdigit() else None


def find_rocm_smi(
    environ: Mapping[str, str], *, is_file: Callable[[str], bool] = os.path.isfile
) -> str | None:
    folders = [p for p in environ.get("PATH", "").split(":") if p.startswith("/")] + list(ROCM_FOLDERS)
    return next((f"{p.rstrip('/')}/rocm-smi" for p in folders if is_file(f"{p.rstrip('/')}/rocm-smi")), None)


def parse_rocm_smi(text: str) -> list[GpuInfo]:
    """GPUs from `rocm-smi --showmeminfo vram --showproductname --json`.

    The JSON maps "card0", "card1"... to string fields; key case changed between ROCm releases ("Card
    series" / "Card Series"), and warnings may precede the JSON, so both are tolerated. Anything else
    gives [] (or ValueError when there is no JSON object at all).
    """
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    data, _end = json.JSONDecoder().raw_decode(text[start:])
    if not isinstance(data, dict):
        raise ValueError("the JSON is not an object")
    gpus: list[GpuInfo] = []
    for card, fields in data.items():
        match = re.fullmatch(r"card(\d+)", str(card))
        if not match or not isinstance(fields, dict):
            continue
        values = {str(k).lower(): str(v).strip() for k, v in fields.items()}
        total = _number(values.get("vram total memory (b)"))
        used = _number(values.get("vram total used memory (b)"))
        name = values.get("card series") or values.get("card model") or "AMD GPU"
        gpus.append(
            GpuInfo(
                vendor="amd",
                name=name,
                memory_total=total,
                memory_free=total - used if total is not None and used is not None else None,
                index=int(match.group(1)),
            )
        )
    return gpus


def _number(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def detect_rocm(exe: str, *, run: Run, timeout: float) -> tuple[list[GpuInfo], list[str]]:
    try:
        code, out, err = run(rocm_argv(exe), timeout)
    except TimeoutError:
        return [], [f"rocm-smi did not answer within {timeout:g} s; AMD GPU memory unknown"]
    except OSError as e:
        return [], [f"rocm-smi at {exe} could not be run: {e.strerror or e}"]
    first = next((line.strip() for line in (err + "\n" + out).splitlines() if line.strip()), "no message")
    if code != 0:
        return [], [f"rocm-smi failed: {first[:200]} (exit {code})"]
    try:
        return parse_rocm_smi(out), []
    except ValueError as e:
        return [], [f"rocm-smi output not understood ({e}): {first[:200]!r}"]

"""NVIDIA GPUs through nvidia-smi: where it is, what it says, and what its failures mean.

nvidia-smi ships with the driver, so finding it is also how we learn a driver is installed. It is not
always on PATH (containers put it in /usr/local/nvidia/bin, WSL2 in /usr/lib/wsl/lib, Windows in
System32 or the old NVSMI folder), so the usual folders are searched too. Only absolute folders are
searched: an empty or relative PATH entry means the current directory, and a file named nvidia-smi
there is no reason to run it.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath, PurePosixPath, PureWindowsPath

from stigmer.hw.report import GpuInfo
from stigmer.hw.run import Run

QUERY_FIELDS = ("index", "name", "memory.total", "memory.free", "driver_version")
POSIX_FOLDERS = ("/usr/local/nvidia/bin", "/usr/lib/wsl/lib", "/usr/bin", "/usr/local/bin", "/opt/nvidia/bin")
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_MISSING = {"", "n/a", "[n/a]", "[not supported]", "[unknown error]", "[insufficient permissions]"}

# Failures with a known cause -> what to do about it (nvidia-smi's exit codes are NVML's error codes:
# 6 not found, 9 driver not loaded, 18 library/driver version mismatch).
HINTS = (
    ("version mismatch", "the NVIDIA driver was updated but the old one is still loaded: reboot"),
    ("couldn't communicate with the nvidia driver", "the NVIDIA driver is not loaded: install or reload it"),
    ("no devices were found", "no NVIDIA GPU is visible (in a container, pass it in: docker run --gpus all)"),
)


def query_argv(exe: str) -> list[str]:
    return [exe, f"--query-gpu={','.join(QUERY_FIELDS)}", "--format=csv,noheader,nounits"]


def _env(environ: Mapping[str, str], name: str) -> str:
    """An environment variable by name, ignoring case as Windows does (Path, PATH)."""
    if name in environ:
        return environ[name]
    return next((v for k, v in environ.items() if k.upper() == name.upper()), "")


def candidates(system: str, environ: Mapping[str, str]) -> list[str]:
    """Every path where nvidia-smi may be, in the order to try; a pure function of platform and env."""
    extra: list[PurePath]
    if system == "Windows":
        path_type: type[PurePath] = PureWindowsPath
        exe, sep = "nvidia-smi.exe", ";"
        system_root = _env(environ, "SystemRoot") or r"C:\Windows"
        program_files = [_env(environ, "ProgramW6432"), _env(environ, "ProgramFiles") or r"C:\Program Files"]
        extra = [PureWindowsPath(system_root, "System32")]
        extra += [PureWindowsPath(p, "NVIDIA Corporation", "NVSMI") for p in program_files if p]
    else:
        path_type, exe, sep = PurePosixPath, "nvidia-smi", ":"
        extra = [PurePosixPath(p) for p in POSIX_FOLDERS]
    folders = [path_type(p) for p in _env(environ, "PATH").split(sep) if p.strip()] + extra
    seen: set[str] = set()
    found: list[str] = []
    for folder in folders:
        if not folder.is_absolute():
            continue
        path = str(folder / exe)
        key = path.lower() if system == "Windows" else path
        if key not in seen:
            seen.add(key)
            found.append(path)
    return found


def find(
    system: str, environ: Mapping[str, str], *, is_file: Callable[[str], bool] = os.path.isfile
) -> str | None:
    return next((c for c in candidates(system, environ) if is_file(c)), None)


def parse_query(text: str, fields: Sequence[str] = QUERY_FIELDS) -> list[GpuInfo]:
    """GPUs from `nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`.

    Without a header the columns are `fields` in order; a header line (`index, name, memory.total
    [MiB], ...`) names them and their units instead. Values may carry their unit ("81559 MiB");
    "[N/A]" and the like mean unknown. Lines that are not GPU rows (warnings) are skipped.
    """
    columns = [f.lower() for f in fields]
    units: dict[str, str] = {}
    gpus: list[GpuInfo] = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if cells[0].lower().startswith("index") or cells[0].lower() == "name":
            columns, units = [], {}
            for cell in cells:
                name, _, unit = cell.partition("[")
                columns.append(name.strip().lower())
                units[name.strip().lower()] = unit.rstrip("]").strip().lower()
            continue
        if len(cells) != len(columns):
            continue
        record = dict(zip(columns, cells, strict=True))
        index = record.get("index", "")
        if not index.isdigit():
            continue
        gpus.append(
            GpuInfo(
                vendor="nvidia",
                name=record.get("name") or "NVIDIA GPU",
                memory_total=_bytes(record.get("memory.total"), units.get("memory.total")),
                memory_free=_bytes(record.get("memory.free"), units.get("memory.free")),
                driver=record.get("driver_version", ""),
                index=int(index),
            )
        )
    return gpus


def _bytes(value: str | None, unit: str | None) -> int | None:
    """Bytes from a memory cell: "81559" (MiB, nvidia-smi's unit), "81559 MiB", or "[N/A]" -> None."""
    if value is None or value.lower() in _MISSING:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]iB|B)?", value, re.IGNORECASE)
    if not match:
        return None
    scale = _UNITS.get((match.group(2) or unit or "mib").lower())
    return int(float(match.group(1)) * scale) if scale else None


def explain(code: int, stdout: str, stderr: str) -> str:
    """One line for a failed nvidia-smi: its own message, its exit code, and the fix when we know it."""
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    message = lines[0] if lines else "no message"
    if len(message) > 200:
        message = message[:200] + "..."
    text = " ".join(lines).lower()
    hint = next((h for pattern, h in HINTS if pattern in text), "")
    return f"nvidia-smi failed: {message} (exit {code})" + (f"; {hint}" if hint else "")


def detect_nvidia(exe: str, *, run: Run, timeout: float) -> tuple[list[GpuInfo], list[str]]:
    """GPUs reported by the nvidia-smi at `exe`, and problems (a failure, a hang, odd output)."""
    try:
        code, out, err = run(query_argv(exe), timeout)
    except TimeoutError:
        return [], [f"nvidia-smi did not answer within {timeout:g} s (a hung GPU driver?); GPU not used"]
    except OSError as e:
        return [], [f"nvidia-smi at {exe} could not be run: {e.strerror or e}"]
    if code != 0:
        return [], [explain(code, out, err)]
    gpus = parse_query(out)
    if not gpus:
        first = next((line.strip() for line in out.splitlines() if line.strip()), "nothing")
        return [], [f"nvidia-smi answered, but not with GPU rows we understand: {first[:200]!r}"]
    return gpus, []

"""RAM: total and available now, lowered to the container's memory limit when there is one.

Inside a container psutil sees the host's memory, but the kernel kills us at the cgroup's limit, so a
model that "fits" the host could still be killed. Linux cgroup v2 (`memory.max`) and v1
(`memory.limit_in_bytes`) are both read, along our cgroup's path and every ancestor's (the smallest
limit wins); the root is injectable for tests.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_UNLIMITED = 1 << 60  # v1 writes "no limit" as a huge number (9223372036854771712)


def detect_memory(
    *,
    system: str,
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
) -> tuple[int, int, list[str]]:
    """(total bytes, available bytes, notes)."""
    import psutil  # ~10 ms: only when the machine is really examined

    vm = psutil.virtual_memory()
    total, available = int(vm.total), int(vm.available)
    notes: list[str] = []
    if system == "Linux":
        try:
            text = proc_self_cgroup.read_text()
        except OSError:
            text = ""
        limit = cgroup_limit(text, cgroup_root)
        if limit is not None and limit[0] < total:
            cap, used = limit
            total = cap
            available = max(0, min(available, cap - used))
            notes.append(f"memory is limited to {cap} bytes by the container (cgroup), below the host's")
    return total, available, notes


def cgroup_limit(proc_self_cgroup: str, root: Path = CGROUP_ROOT) -> tuple[int, int] | None:
    """(limit, usage) in bytes of the tightest memory limit on our cgroup and its ancestors, or None.

    `proc_self_cgroup` is the text of /proc/self/cgroup: "0::/path" (v2) or "N:memory:/path" (v1).
    """
    best: tuple[int, int] | None = None
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        if controllers == "":
            base, limit_file, usage_file = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for folder in _ancestors(base, path):
            limit = _read_int(folder / limit_file)
            if limit is None or limit >= _UNLIMITED:
                continue
            usage = _read_int(folder / usage_file) or 0
            if best is None or limit < best[0]:
                best = (limit, usage)
    return best


def _ancestors(base: Path, cgroup_path: str) -> list[Path]:
    """base/a/b/c, base/a/b, base/a, base: the cgroup's folder and every parent up to the mount."""
    rel = PurePosixPath(cgroup_path.strip() or "/")
    parts = [p for p in rel.parts if p not in ("/", "..", ".")]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2's no-limit) is not a number

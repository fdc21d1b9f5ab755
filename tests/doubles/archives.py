"""Builders of fake Ollama release folders (`root/v{version}/{asset}` + `sha256sum.txt`).

Pure functions writing files; they follow the asset table of /work/shared/reference/ollama.md. The
`ollama` inside every archive is fake_ollama.py with a shebang to this Python, so an unpacked release
really runs (`bin/ollama serve`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import re
import secrets
import socket
import stat
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

FAKE_OLLAMA = Path(__file__).with_name("fake_ollama.py")
CHECKSUMS = "sha256sum.txt"
DEFAULT_PLATFORMS: tuple[str, ...] = ("linux-amd64", "linux-arm64", "darwin", "windows-amd64")
PLATFORMS: tuple[str, ...] = (
    "linux-amd64",
    "linux-arm64",
    "darwin",
    "windows-amd64",
    "windows-arm64",
    "linux-amd64-rocm",
    "linux-arm64-jetpack5",
    "linux-arm64-jetpack6",
)
_MTIME = 1_767_225_600  # fixed member times keep archives byte-for-byte reproducible


@dataclass(frozen=True)
class Member:
    """One archive entry. kind: "file", "dir", "symlink", "hardlink", "fifo", "chardev"."""

    name: str
    data: bytes = b""
    mode: int = 0o644
    kind: str = "file"
    linkname: str = ""


def parse_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of "0.33.0", "v0.14.0-rc1"; pre-release suffixes are ignored."""
    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return int(m[1]), int(m[2]), int(m[3])


def asset_name(platform: str, version: str) -> str:
    """The release asset for a platform at a version (ollama.md's table)."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; one of {', '.join(PLATFORMS)}")
    v = parse_version(version)
    if platform.startswith("windows-"):
        return f"ollama-{platform}.zip"
    if platform == "darwin":
        return "ollama-darwin.tgz" if v >= (0, 3, 7) else "ollama-darwin"
    if v >= (0, 14, 0):
        return f"ollama-{platform}.tar.zst"
    if v >= (0, 3, 7):
        return f"ollama-{platform}.tgz"
    return f"ollama-{platform}"  # bare binary before 0.3.7


def ollama_program(python: str = sys.executable, *, version: str | None = None) -> bytes:
    """fake_ollama.py with its first line replaced by a shebang to `python`.

    `version`: what the program reports (`--version`, /api/version, the Listening line); default 0.33.0.
    """
    text = FAKE_OLLAMA.read_bytes()
    _, _, rest = text.partition(b"\n")
    if version is not None:
        line = b'\nVERSION = "0.33.0"\n'
        if rest.count(line) != 1:
            raise RuntimeError("fake_ollama.py no longer has one VERSION line to replace")
        rest = rest.replace(line, f'\nVERSION = "{version.removeprefix("v")}"\n'.encode())
    return f"#!{python}\n".encode() + rest


def _dummy(name: str, version: str, platform: str) -> bytes:
    # The platform is in the bytes so the archives of two platforms never share a checksum.
    return b"\x7fELF\x02\x01\x01\x00" + f"fake {name} of ollama {version} for {platform}\n".encode()


def payload(platform: str, version: str, program: bytes) -> list[Member]:
    """The members of a platform's archive, in the order `tar c` would write them."""
    if platform == "darwin":  # flat layout, no bin/
        return [
            Member("ollama", program, 0o755),
            Member("llama-server", _dummy("llama-server", version, platform), 0o755),
            Member("libggml-base.dylib", _dummy("libggml-base.dylib", version, platform), 0o755),
            Member("libggml-cpu.so", _dummy("libggml-cpu.so", version, platform), 0o755),
            Member("ggml-metal.metallib", _dummy("ggml-metal.metallib", version, platform)),
        ]
    if platform.startswith("windows-"):
        return [
            Member("ollama.exe", program, 0o755),
            Member("lib/ollama/ggml-base.dll", _dummy("ggml-base.dll", version, platform)),
            Member("lib/ollama/llama-server.exe", _dummy("llama-server.exe", version, platform), 0o755),
        ]
    if platform.endswith(("-rocm", "-jetpack5", "-jetpack6")):  # add-ons: lib/ only, unpacked on top
        sub = "rocm_v6" if platform.endswith("-rocm") else f"cuda_{platform.rsplit('-', 1)[1]}"
        return [
            Member("lib/", kind="dir", mode=0o755),
            Member("lib/ollama/", kind="dir", mode=0o755),
            Member(f"lib/ollama/{sub}/", kind="dir", mode=0o755),
            Member(f"lib/ollama/{sub}/libggml-gpu.so", _dummy("libggml-gpu.so", version, platform), 0o755),
        ]
    return [
        Member("bin/", kind="dir", mode=0o755),
        Member("bin/ollama", program, 0o755),
        Member("lib/", kind="dir", mode=0o755),
        Member("lib/ollama/", kind="dir", mode=0o755),
        Member("lib/ollama/libggml-base.so", _dummy("libggml-base.so", version, platform), 0o755),
        Member("lib/ollama/llama-server", _dummy("llama-server", version, platform), 0o755),
        # Real archives carry versioned .so symlinks inside the tree; a safe unpack must allow these.
        Member("lib/ollama/cuda_v12/", kind="dir", mode=0o755),
        Member("lib/ollama/cuda_v12/libcudart.so.12.8.90", _dummy("libcudart.so", version, platform), 0o755),
        Member(
            "lib/ollama/cuda_v12/libcudart.so.12", kind="symlink", mode=0o777, linkname="libcudart.so.12.8.90"
        ),
    ]


# -- writing archives ---------------------------------------------------------------------------------


def tar_bytes(members: Iterable[Member]) -> bytes:
    """An uncompressed GNU tar, as `tar c --owner 0 --group 0` makes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mode, info.mtime = m.mode, _MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            data = None
            if m.kind == "file":
                info.size = len(m.data)
                data = io.BytesIO(m.data)
            elif m.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif m.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, m.linkname
            elif m.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, m.linkname
            elif m.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif m.kind == "chardev":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3  # like /dev/null
            else:
                raise ValueError(f"unknown member kind {m.kind!r}")
            tar.addfile(info, data)
    return buf.getvalue()


def zip_bytes(members: Iterable[Member]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for m in members:
            info = zipfile.ZipInfo(m.name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            if m.kind == "file":
                info.external_attr = (stat.S_IFREG | m.mode) << 16
                zf.writestr(info, m.data)
            elif m.kind == "dir":
                info.external_attr = ((stat.S_IFDIR | m.mode) << 16) | 0x10
                zf.writestr(info, b"")
            elif m.kind == "symlink":  # Info-ZIP convention: mode S_IFLNK, content = target
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, m.linkname.encode())
            else:
                raise ValueError(f"a zip cannot hold a {m.kind} member")
    return buf.getvalue()


def write_archive(path: Path, members: Sequence[Member]) -> Path:
    """Write members as .tar.zst, .tgz/.tar.gz or .zip, chosen by the file name."""
    name = path.name
    if name.endswith(".tar.zst"):
        # Like `zstd` in a pipe: no content size in the frame header (one-shot decompress() fails
        # on such frames, a pitfall worth testing), checksum on.
        data = zstandard.ZstdCompressor(level=19, write_content_size=False, write_checksum=True).compress(
            tar_bytes(members)
        )
    elif name.endswith((".tgz", ".tar.gz")):
        data = gzip.compress(tar_bytes(members), mtime=0)
    elif name.endswith(".zip"):
        data = zip_bytes(members)
    else:
        raise ValueError(f"no archive format for {name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(release_dir: Path, assets: Iterable[str]) -> Path:
    """sha256sum.txt in GNU format with the `./` prefix GitHub's ollama releases use."""
    lines = [f"{sha256_file(release_dir / a)}  ./{a}\n" for a in sorted(assets)]
    path = release_dir / CHECKSUMS
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _tamper(path: Path) -> None:
    """Flip one byte in the middle: same size, different sha256."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- releases -----------------------------------------------------------------------------------------


def build_release(
    root: Path,
    version: str,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    program: bytes | None = None,
    tamper: Iterable[str] = frozenset(),
    omit_checksum: Iterable[str] = frozenset(),
) -> dict[str, Path]:
    """Write `root/v{version}/` with one asset per platform and sha256sum.txt.

    Returns {asset name: path}, plus "sha256sum.txt". Versions < 0.3.7 give bare binaries (mode 0755).
    `program`: the `ollama` bytes; default fake_ollama.py reporting `version`.
    `tamper`: asset names altered after their checksum was taken. `omit_checksum`: asset names left
    out of sha256sum.txt. sha256sum.txt lists this call's assets only.
    """
    program = ollama_program(version=version) if program is None else program
    release = Path(root) / f"v{version.removeprefix('v')}"
    release.mkdir(parents=True, exist_ok=True)
    assets: dict[str, Path] = {}
    for platform in platforms:
        name = asset_name(platform, version)
        path = release / name
        if name.endswith((".zip", ".tgz", ".tar.zst")):
            write_archive(path, payload(platform, version, program))
        else:
            path.write_bytes(program)
            path.chmod(0o755)
        assets[name] = path
    unknown = (set(tamper) | set(omit_checksum)) - set(assets)
    if unknown:
        raise ValueError(f"not assets of this release: {sorted(unknown)}")
    assets[CHECKSUMS] = write_checksums(release, [a for a in assets if a not in set(omit_checksum)])
    for name in tamper:
        _tamper(assets[name])
    return assets


EVIL_KINDS = ("traversal", "absolute", "symlink", "hardlink", "fifo", "device")


def build_malicious(
    root: Path,
    version: str,
    kind: str,
    *,
    asset: str = "ollama-linux-amd64.tar.zst",
    program: bytes | None = None,
) -> dict[str, Path]:
    """A release whose one asset holds the normal payload plus one hostile member, with a correct
    sha256sum.txt, so only a safe-unpack check can refuse it.

    kind: "traversal" (`../evil.txt`), "absolute" (`/tmp/stigmer-evil-<random>`), "symlink"
    (`lib/ollama/link -> ../../../../outside` plus `lib/ollama/link/pwned.txt` written through it),
    "hardlink" (`lib/ollama/hard` linking `../outside.txt`), "fifo", "device" (char device 1,3).
    The archive format follows `asset` (.tar.zst, .tgz, .zip; a zip supports traversal, absolute,
    symlink). Returns {asset: path, "sha256sum.txt": path, "target": the path the attack aims at,
    relative to the unpack folder unless absolute}.
    """
    if kind not in EVIL_KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(EVIL_KINDS)}")
    program = ollama_program(version=version) if program is None else program
    platform = "windows-amd64" if asset.endswith(".zip") else "darwin" if "darwin" in asset else "linux-amd64"
    members = payload(platform, version, program)
    evil = b"stigmer test: this file must never be written\n"
    target = Path("../evil.txt")
    if kind == "traversal":
        members.append(Member("../evil.txt", evil))
    elif kind == "absolute":
        target = Path(f"/tmp/stigmer-evil-{secrets.token_hex(6)}")  # the attack aims outside any unpack dir
        members.append(Member(str(target), evil))
    elif kind == "symlink":
        target = Path("../../outside/pwned.txt")
        members += [
            Member("lib/ollama/link", kind="symlink", mode=0o777, linkname="../../../../outside"),
            Member("lib/ollama/link/pwned.txt", evil),
        ]
    elif kind == "hardlink":
        target = Path("../outside.txt")
        members.append(Member("lib/ollama/hard", kind="hardlink", linkname="../outside.txt"))
    elif kind == "fifo":
        target = Path("lib/ollama/fifo")
        members.append(Member("lib/ollama/fifo", kind="fifo"))
    else:
        target = Path("lib/ollama/null")
        members.append(Member("lib/ollama/null", kind="chardev", mode=0o666))
    release = Path(root) / f"v{version.removeprefix('v')}"
    path = write_archive(release / asset, members)
    return {asset: path, CHECKSUMS: write_checksums(release, [asset]), "target": target}


def evil_traversal(root: Path, version: str, asset: str = "ollama-linux-amd64.tar.zst") -> dict[str, Path]:
    return build_malicious(root, version, "traversal", asset=asset)


def evil_absolute(root: Path, version: str, asset: str = "ollama-linux-amd64.tar.zst") -> dict[str, Path]:
    return build_malicious(root, version, "absolute", asset=asset)


def evil_symlink(root: Path, version: str, asset: str = "ollama-linux-amd64.tar.zst") -> dict[str, Path]:
    return build_malicious(root, version, "symlink", asset=asset)


def evil_special(
    root: Path, version: str, asset: str = "ollama-linux-amd64.tar.zst", *, kind: str = "fifo"
) -> dict[str, Path]:
    """A fifo (kind="fifo") or character device (kind="device") member."""
    return build_malicious(root, version, kind, asset=asset)


def evil_zip_traversal(root: Path, version: str, asset: str = "ollama-windows-amd64.zip") -> dict[str, Path]:
    return build_malicious(root, version, "traversal", asset=asset)


# -- reading, for assertions --------------------------------------------------------------------------


def archive_members(path: Path) -> dict[str, tuple[str, int, str]]:
    """{name: (kind, mode, linkname)} of a .tar.zst/.tgz/.zip, read the streaming way."""
    out: dict[str, tuple[str, int, str]] = {}
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for zinfo in zf.infolist():
                mode = zinfo.external_attr >> 16
                kind = "symlink" if stat.S_ISLNK(mode) else "dir" if zinfo.is_dir() else "file"
                link = zf.read(zinfo).decode() if kind == "symlink" else ""
                out[zinfo.filename] = (kind, stat.S_IMODE(mode), link)
        return out
    raw = path.open("rb")
    try:
        stream = zstandard.ZstdDecompressor().stream_reader(raw) if path.name.endswith(".zst") else raw
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                kind = (
                    "dir"
                    if info.isdir()
                    else "symlink"
                    if info.issym()
                    else "hardlink"
                    if info.islnk()
                    else "fifo"
                    if info.isfifo()
                    else "chardev"
                    if info.ischr()
                    else "file"
                )
                out[info.name] = (kind, info.mode, info.linkname)
    finally:
        raw.close()
    return out


def read_checksums(path: Path) -> dict[str, str]:
    """{asset: hex} from a sha256sum.txt, with the `./` prefix stripped."""
    result = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(None, 1)
            result[name.strip().lstrip("*").removeprefix("./")] = digest
    return result


# The ports free_port() hands out. Not the OS's choice (bind to port 0): that comes from the ephemeral
# range (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default), where every outgoing connection
# and every server that binds port 0 (the product's own internal ports, Temporal's, uvicorn's) takes its
# port too, so a port found free there can be taken before the test's server binds it, and a port meant to
# stay dead (conftest's registry and Hugging Face addresses) can come alive. Below that range only the
# tests hand out ports, and each pytest-xdist worker from a slice of its own, in turn: no two tests that
# run at the same time, and no two calls within one test, get the same port.
_PORTS = (15000, 32768)
_SKIP = {11434, 11435}  # ollama's and the built-in engine's defaults
_ports_lock = threading.Lock()
_next_port: list[int] = []  # [offset of the next port in this process's slice], once chosen


def _port_slice() -> tuple[int, int]:
    """[low, high) of this process's ports: its xdist worker's share of _PORTS below the ephemeral range."""
    low, high = _PORTS
    try:
        high = min(high, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        pass  # not Linux: the ephemeral range starts at 49152 (macOS, Windows)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1), 1)
    index = int(worker[2:]) % count if worker[:2] == "gw" and worker[2:].isdigit() else 0
    width = (high - low) // count
    return low + index * width, low + (index + 1) * width


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that no other test running now was given, never ollama's default 11434
    (see _PORTS)."""
    low, high = _port_slice()
    if high - low < 100:  # an unusual ephemeral range: let the OS choose
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _SKIP:
                return port
    with _ports_lock:
        if not _next_port:  # a random start: two pytest runs on one machine rarely walk the same ports
            _next_port.append(random.SystemRandom().randrange(high - low))
        for _ in range(high - low):
            port = low + _next_port[0] % (high - low)
            _next_port[0] += 1
            if port in _SKIP:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue  # in use (a server of this test, or another program)
            return port
    raise OSError(f"no free port in {low}-{high - 1}")

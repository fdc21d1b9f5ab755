"""Safe unpacking of release archives (.tar.zst, .tgz, .zip) into a folder.

Nothing may land outside the folder: absolute paths, `..`, links pointing out and device files refuse
the whole archive. tarfile's "data" filter does these checks for tar; zip members are checked here.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from stigmer.errors import ErrorCode, StigmerError


class UnsafeArchive(StigmerError):
    pass


def _unsafe(archive: Path, why: str) -> UnsafeArchive:
    return UnsafeArchive(
        f"Refused to unpack {archive.name}: {why}.",
        hint="The archive tries to write outside its folder. Nothing was installed.",
        code=ErrorCode.UNSAFE_ARCHIVE,
    )


def extract(archive: Path, target: Path) -> None:
    """Unpack archive into target (which must exist and be empty). On error target may hold a part:
    the caller unpacks into a staging folder and throws it away on failure."""
    name = archive.name.lower()
    try:
        if name.endswith(".tar.zst"):
            import zstandard

            with (
                archive.open("rb") as raw,
                zstandard.ZstdDecompressor().stream_reader(raw) as zst,
                tarfile.open(fileobj=zst, mode="r|") as tar,
            ):
                _extract_tar(tar, target, archive)
        elif name.endswith((".tgz", ".tar.gz")):
            with tarfile.open(archive, mode="r:gz") as tar:
                _extract_tar(tar, target, archive)
        elif name.endswith(".zip"):
            _extract_zip(archive, target)
        else:
            raise StigmerError(f"Unknown archive type: {archive.name}", code=ErrorCode.UNSAFE_ARCHIVE)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise StigmerError(
            f"The archive {archive.name} is damaged: {e}.",
            code=ErrorCode.ARCHIVE_DAMAGED,
            hint="Nothing was installed. Run the command again to download it anew.",
        ) from e
    except OSError as e:
        if "zstd" in type(e).__module__ or "zstd" in str(e).lower():
            raise StigmerError(
                f"The archive {archive.name} is damaged: {e}.",
                code=ErrorCode.ARCHIVE_DAMAGED,
                hint="Nothing was installed. Run the command again.",
            ) from e
        raise


def _extract_tar(tar: tarfile.TarFile, target: Path, archive: Path) -> None:
    try:
        tar.extractall(target, filter=_strict_filter)
    except tarfile.AbsolutePathError as e:
        raise _unsafe(archive, f"member {e.tarinfo.name!r} has an absolute path") from e
    except tarfile.OutsideDestinationError as e:
        raise _unsafe(archive, f"member {e.tarinfo.name!r} points outside the folder") from e
    except tarfile.LinkOutsideDestinationError as e:
        raise _unsafe(archive, f"link {e.tarinfo.name!r} points outside the folder") from e
    except tarfile.SpecialFileError as e:
        raise _unsafe(archive, f"member {e.tarinfo.name!r} is a device or special file") from e
    except tarfile.FilterError as e:
        raise _unsafe(archive, str(e)) from e


def _strict_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter, except that absolute names are refused instead of made relative."""
    if member.name.startswith(("/", "\\")) or PureWindowsPath(member.name).drive:
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _extract_zip(archive: Path, target: Path) -> None:
    root = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # check every member before writing any
            name = info.filename
            if (
                PurePosixPath(name).is_absolute()
                or PureWindowsPath(name).is_absolute()
                or PureWindowsPath(name).drive
            ):
                raise _unsafe(archive, f"member {name!r} has an absolute path")
            parts = PureWindowsPath(name).parts
            if ".." in parts:
                raise _unsafe(archive, f"member {name!r} points outside the folder")
            mode = info.external_attr >> 16
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _unsafe(archive, f"member {name!r} is a link or special file")
            if not (root / name).resolve().is_relative_to(root):
                raise _unsafe(archive, f"member {name!r} points outside the folder")
        for info in infos:
            out = Path(zf.extract(info, target))
            mode = info.external_attr >> 16
            if mode & 0o111 and out.is_file():
                out.chmod(0o755)


def install_bare_binary(binary: Path, target: Path, name: str) -> Path:
    """Releases before 0.3.7 shipped a bare executable: lay it out like the archives do."""
    dest = target / "bin" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    binary.replace(dest)
    dest.chmod(0o755)
    return dest

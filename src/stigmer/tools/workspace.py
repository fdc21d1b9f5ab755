"""An agent's workspace: a folder it may list, read, write and search, and nothing outside it.

Confinement is the point. A path from the model is first checked as text (no absolute path, drive
letter, `~`, `..`, NUL byte or over-long name), then resolved with its symlinks: a path whose real
location is outside the root is refused. Symlinks that stay inside are followed.

Between that check and the open, something else (the agent's own shell command, another tool call)
can swap a folder or the file for a symlink. So on POSIX every operation walks the resolved path again
from a descriptor of the root, one component at a time with O_NOFOLLOW (a component that has become a
link fails to open), and then checks where the opened descriptor really is (/proc/self/fd on Linux,
F_GETPATH on macOS). Where descriptors relative to a folder do not exist (Windows), the file is opened
by path and its real path and identity are checked after opening; a swap back and forth between those
two steps is not caught there.

Not detected: hard links (one made inside reads what it links to; making one needs the shell tool,
which is not confined anyway).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

from stigmer.errors import ErrorCode, StigmerError
from stigmer.services.env import child_env
from stigmer.tools.errors import ToolFailure

log = logging.getLogger(__name__)

ESCAPES = "path escapes the workspace"
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
SNIFF_BYTES = 8192  # how much of a file decides whether it is text
MAX_PATTERN = 500
SEARCH_MAX_FILE_BYTES = 2_000_000  # larger files are skipped by search (and said so)
SEARCH_MAX_TOTAL_BYTES = 20_000_000  # a search stops after reading this much
SEARCH_MAX_ENTRIES = 100_000  # per folder: a folder of a million files is not read whole into memory
SEARCH_LINE_CHARS = 300
REGEX_TIMEOUT = 10.0  # seconds for the regex child process (see _regex_hits)
# What the tools create is the user's alone, as everything under STIGMER_HOME (a file they replace
# keeps its mode): not 0644/0755 from a usual umask.
NEW_FILE = 0o600
NEW_FOLDER = 0o700

Lines = list[str]  # `list` is a method name inside Workspace

_AGENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # as an agent file's `name:`
_DRIVE = re.compile(r"[A-Za-z]:")
# Windows opens a device for these names in any folder (CON would wait for console input).
_DEVICES = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?", re.IGNORECASE)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO for reading would otherwise wait forever
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_FD_SAFE = (
    hasattr(os, "O_NOFOLLOW")
    and hasattr(os, "O_DIRECTORY")
    and {os.open, os.mkdir, os.stat, os.unlink, os.rename} <= os.supports_dir_fd
    and os.scandir in os.supports_fd
)
_REASONS = {
    "ENOENT": "no such file or folder",
    "ENOTDIR": "a part of the path is not a folder",
    "EISDIR": "it is a folder",
    "EACCES": "permission denied",
    "EPERM": "permission denied",
    "ENAMETOOLONG": "the name is too long",
    "ENOSPC": "no space left on the disk",
    "EDQUOT": "the disk quota is used up",
    "EROFS": "the disk is read-only",
    "ELOOP": f"{ESCAPES} (a link on the path loops or appeared while it was opened)",
    "EMLINK": f"{ESCAPES} (a link appeared on the path while it was opened)",
    "EMFILE": "too many open files; try again",
    "ENFILE": "too many open files; try again",
}
_REASON_BY_ERRNO = {getattr(errno, k): v for k, v in _REASONS.items() if hasattr(errno, k)}


class Workspace:
    """A folder the agent's file tools are confined to (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        root = Path(os.path.abspath(root))
        for folder in [*reversed(root.parents), root]:  # every folder made here is private (parents too)
            if not folder.exists():
                folder.mkdir(mode=NEW_FOLDER, exist_ok=True)
        real = os.path.realpath(root)
        if os.path.dirname(real) == real:
            raise ValueError("a workspace cannot be the filesystem root")
        self.root = Path(real)
        self._root = real

    @classmethod
    def for_agent(cls, data_dir: Path, agent: str, folder: str | None = None) -> Workspace:
        """`<data_dir>/workspace/<agent>/`, or the folder the agent file names (`workspace:`).

        A named folder may start with `~`; a relative one is taken from the data folder. It may not be
        the filesystem root, the user's home or the data folder, nor a folder that contains one of them
        (the data folder holds the product's databases).
        """
        if not _AGENT.fullmatch(agent):
            raise StigmerError(
                f"Agent name {agent[:80]!r} cannot name a workspace folder.",
                hint="Agent names are 1-63 letters, digits, - or _.",
                code=ErrorCode.INVALID_INPUT,
            )
        data = Path(os.path.realpath(data_dir.expanduser()))
        if folder is None or not folder.strip():
            target = data / "workspace" / agent
        else:
            target = _chosen_folder(folder, data, agent)
        try:
            return cls(target)
        except OSError as e:
            raise StigmerError(
                f"Could not create the workspace folder {target}: {e.strerror}.",
                hint="Check the permissions of its parent folder, or name another folder with workspace:.",
                code=ErrorCode.FILESYSTEM,
            ) from e

    # -- the tool's operations ------------------------------------------------------------------

    def list(self, path: str = ".", *, recursive: bool = False, limit: int = 1000) -> Lines:
        """Paths relative to the root, sorted, folders with a "/" suffix. Symlinks are listed by name and
        never descended into. Past `limit` entries the listing stops with a note as its last line."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        shown, asked, real = self._resolve(path)
        out: Lines = []
        with _os_errors(shown):
            if real and self._kind(real, shown) not in (None, "dir"):
                raise ToolFailure(f"{shown} is a file, not a folder; read it instead")
        walk = self._walk(real, recursive=recursive, cap=limit + 1)
        with _os_errors(shown), contextlib.closing(walk):
            for parts, kind, _folder in walk:
                if len(out) >= limit:
                    return [*sorted(out), f"[stopped after {limit} entries; list a subfolder to see more]"]
                name = "/".join([*asked, *parts[len(real) :]])
                out.append(name + "/" if kind == "dir" else name)
        return sorted(out)

    def read(self, path: str, *, max_bytes: int = 1_000_000) -> str:
        """A text file's content; past `max_bytes`, the first `max_bytes` and a note. Binary files are
        refused with a short description."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        shown, _asked, real = self._resolve(path)
        if not real:
            raise ToolFailure("'.' is the workspace folder itself: give a file path, or list the folder")
        with _os_errors(shown):
            fd, size = self._open_file(real, shown)
            with os.fdopen(fd, "rb") as f:
                data = f.read(max_bytes + 1)
        truncated = len(data) > max_bytes
        data = data[:max_bytes]
        text = _text(data, final=not truncated)
        if text is None:
            raise ToolFailure(f"{shown} is a binary file ({size} bytes); this tool reads text files only")
        if truncated:
            text += (
                f"\n[truncated: this is the first {max_bytes} of {size} bytes; "
                "search the file to find lines further in]"
            )
        return text

    def write(self, path: str, content: str, *, max_bytes: int = 10_000_000) -> str:
        """Write text (UTF-8), creating parent folders. The file is replaced whole or not at all: the
        text goes to a temporary file in the same folder, which is then renamed over the target."""
        if not isinstance(content, str):
            raise ToolFailure("content must be text")
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError:
            raise ToolFailure("content is not valid text (it holds an unpaired surrogate)") from None
        if len(data) > max_bytes:
            raise ToolFailure(f"content is {len(data)} bytes; the limit is {max_bytes} bytes")
        shown, _asked, real = self._resolve(path)
        if not real:
            raise ToolFailure("give the path of a file to write, such as notes/todo.md")
        with _os_errors(shown):
            folder = self._open_folder(real[:-1], create=True)
            try:
                existed = folder.replace(real[-1], data, shown)
            finally:
                folder.close()
        return f"{'replaced' if existed else 'created'} {shown} ({len(data)} bytes)"

    def search(self, pattern: str, path: str = ".", *, max_results: int = 200, regex: bool = False) -> Lines:
        """Lines containing `pattern` (plain text; a Python regular expression with regex=True), as
        "path:line: text", in the file or folder `path` (recursively; links are not followed, binary
        files and files over SEARCH_MAX_FILE_BYTES are skipped). Notes, if any, come last in brackets."""
        if max_results < 1:
            raise ValueError("max_results must be at least 1")
        if not isinstance(pattern, str) or not pattern:
            raise ToolFailure("give the text to search for")
        if len(pattern) > MAX_PATTERN:
            raise ToolFailure(f"the pattern is {len(pattern)} characters; the limit is {MAX_PATTERN}")
        if regex:
            try:
                re.compile(pattern)
            except (re.error, OverflowError, RecursionError) as e:
                raise ToolFailure(f"invalid regular expression: {e}") from None
        shown, asked, real = self._resolve(path)
        notes: Lines = []
        with _os_errors(shown), contextlib.closing(self._texts(asked, real, notes)) as texts:
            hits = (
                _regex_hits(pattern, texts, max_results)
                if regex
                else _plain_hits(pattern, texts, max_results)
            )
        out = [f"{name}:{number}: {_clip(line)}" for name, number, line in hits]
        if len(out) >= max_results:
            notes.insert(0, f"[stopped at {max_results} results]")
        return [*out, *notes]

    # -- confinement ------------------------------------------------------------------------------

    def _resolve(self, path: str) -> tuple[str, Lines, Lines]:
        """(the path as shown to the model, its parts as asked, its real parts below the root)."""
        asked = _split(path)
        shown = "/".join(asked) or "."
        real = os.path.realpath(os.path.join(self._root, *asked))
        if not self._inside(real):
            raise _escape(path, "a link on it leads outside")
        rel = os.path.relpath(real, self._root)
        return shown, asked, ([] if rel == "." else rel.split(os.sep))

    def _inside(self, real: str) -> bool:
        return real == self._root or real.startswith(self._root.rstrip(os.sep) + os.sep)

    def _check_fd(self, fd: int, shown: str) -> None:
        """Refuse a descriptor whose real location (when the platform can tell) is outside the root."""
        where = _fd_path(fd)
        if where is not None and not self._inside(where):
            raise _escape(shown, "it was moved outside while it was opened")

    def _open_folder(self, parts: Lines, *, create: bool = False) -> _Folder:
        if not _FD_SAFE:
            return self._open_folder_by_path(parts, create=create)
        fd = os.open(self._root, _DIR_FLAGS)
        try:
            for name in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, NEW_FOLDER, dir_fd=fd)
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    # O_NOFOLLOW|O_DIRECTORY on a link: ELOOP (Linux, macOS), EMLINK (FreeBSD), ENOTDIR.
                    if e.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR) and _is_link(name, fd):
                        raise _escape("/".join(parts), "a folder on it was replaced by a link") from None
                    raise
                os.close(fd)
                fd = child
            self._check_fd(fd, "/".join(parts))
        except BaseException:
            os.close(fd)
            raise
        return _Folder(self, parts, fd)

    def _open_folder_by_path(self, parts: Lines, *, create: bool) -> _Folder:
        where = os.path.join(self._root, *parts)
        if create:
            try:
                os.makedirs(where, NEW_FOLDER, exist_ok=True)  # Windows: modes mostly do not apply
            except FileExistsError:  # a file where a folder should be
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", where) from None
        if not self._inside(os.path.realpath(where)):
            raise _escape("/".join(parts), "a folder on it was replaced by a link")
        if not os.path.isdir(where):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", where)
        return _Folder(self, parts, None)

    def _open_file(self, real: Lines, shown: str) -> tuple[int, int]:
        """A read-only descriptor of the regular file at `real`, and its size."""
        folder = self._open_folder(real[:-1])
        try:
            fd = folder.open_file(real[-1], shown)
        finally:
            folder.close()
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ToolFailure(f"{shown} is a folder; list it instead")
            if not stat.S_ISREG(info.st_mode):
                raise ToolFailure(f"{shown} is not a regular file (a pipe, socket or device)")
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size

    def _walk(
        self, start: Lines, *, recursive: bool, cap: int
    ) -> Generator[tuple[Lines, str, _Folder], None, None]:
        """(real parts, kind, its open folder) for each entry below `start`, depth first. Each folder is
        opened again from the root (never through a link), so nothing here follows a swapped-in link."""
        pending = [start]
        while pending:
            parts = pending.pop()
            folder = self._open_folder(parts)
            subfolders: list[Lines] = []
            try:
                for name, kind in folder.entries(cap):
                    yield [*parts, name], kind, folder
                    if recursive and kind == "dir":
                        subfolders.append([*parts, name])
            finally:
                folder.close()
            pending.extend(reversed(subfolders))

    def _texts(self, asked: Lines, real: Lines, notes: Lines) -> Generator[tuple[str, str], None, None]:
        """(name as shown, text) of each searchable file at or below `real`, within the size budgets."""
        total = skipped = 0
        if real and self._kind(real, "/".join(asked)) not in (None, "dir"):
            found: list[tuple[str, Lines]] = [("/".join(asked), real)]
            walk = None
        else:
            found = []
            walk = self._walk(real, recursive=True, cap=SEARCH_MAX_ENTRIES)
        with contextlib.closing(walk) if walk is not None else contextlib.nullcontext():
            files = found or (
                ("/".join([*asked, *parts[len(real) :]]), parts)
                for parts, kind, _ in walk or ()
                if kind == "file"
            )
            for name, parts in files:
                try:
                    fd, size = self._open_file(parts, name)
                except (ToolFailure, OSError):
                    continue  # replaced, removed or unreadable while we searched: skip it, go on
                with os.fdopen(fd, "rb") as f:
                    if size > SEARCH_MAX_FILE_BYTES:
                        skipped += 1
                        continue
                    data = f.read(SEARCH_MAX_FILE_BYTES + 1)[:SEARCH_MAX_FILE_BYTES]
                text = _text(data, final=True)
                if text is None:
                    continue
                total += len(data)
                if total > SEARCH_MAX_TOTAL_BYTES:
                    notes.append(
                        f"[searched only the first {SEARCH_MAX_TOTAL_BYTES} bytes; search a subfolder]"
                    )
                    break
                yield name, text
        if skipped:
            notes.append(f"[skipped {skipped} files larger than {SEARCH_MAX_FILE_BYTES} bytes]")

    def _kind(self, real: Lines, shown: str) -> str | None:
        """dir, file or other for what is at `real` (None: nothing). It was resolved, so a link there
        now was swapped in since: refused."""
        folder = self._open_folder(real[:-1])
        try:
            info = folder.lstat(real[-1])
        finally:
            folder.close()
        if info is None:
            return None
        if stat.S_ISLNK(info.st_mode):
            raise _escape(shown, "it was replaced by a link while it was opened")
        return "dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode) else "other"


class _Folder:
    """An open folder of a workspace: a descriptor on POSIX (fd), a checked path elsewhere (fd None)."""

    def __init__(self, ws: Workspace, parts: Lines, fd: int | None) -> None:
        self.ws = ws
        self.parts = parts
        self.fd = fd
        self.path = os.path.join(ws._root, *parts)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def entries(self, cap: int) -> list[tuple[str, str]]:
        """(name, kind) sorted by name, at most `cap` of them; kind: dir, file, link or other."""
        out: list[tuple[str, str]] = []
        with os.scandir(self.fd) if self.fd is not None else os.scandir(self.path) as found:
            for entry in found:
                if entry.is_symlink():
                    kind = "link"
                elif entry.is_dir(follow_symlinks=False):
                    kind = "dir"
                elif entry.is_file(follow_symlinks=False):
                    kind = "file"
                else:
                    kind = "other"
                out.append((entry.name, kind))
                if len(out) >= cap:
                    break
        return sorted(out)

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            if self.fd is not None:
                return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return os.lstat(os.path.join(self.path, name))
        except FileNotFoundError:
            return None

    def open_file(self, name: str, shown: str) -> int:
        if self.fd is None:
            where = os.path.join(self.path, name)
            fd = os.open(where, os.O_RDONLY | getattr(os, "O_BINARY", 0) | _NONBLOCK)
            try:
                real = os.path.realpath(where)
                if not self.ws._inside(real) or not os.path.samestat(os.fstat(fd), os.stat(real)):
                    raise _escape(shown, "it was replaced by a link while it was opened")
            except BaseException:
                os.close(fd)
                raise
            return fd
        try:
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK):  # the resolved file has become a link since
                raise _escape(shown, "it was replaced by a link while it was opened") from None
            raise
        try:
            self.ws._check_fd(fd, shown)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def replace(self, name: str, data: bytes, shown: str) -> bool:
        """Atomically put `data` at `name` in this folder; True when a file was replaced."""
        old = self.lstat(name)
        if old is not None and stat.S_ISDIR(old.st_mode):
            raise ToolFailure(f"{shown} is a folder; give a file path")
        keep = stat.S_IMODE(old.st_mode) if old is not None and stat.S_ISREG(old.st_mode) else None
        if self.fd is None:
            self._replace_by_path(name, data, keep, shown)
            return old is not None
        tmp = f".stigmer-{secrets.token_hex(8)}.tmp"
        # O_EXCL|O_NOFOLLOW: never through a planted link.
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, NEW_FILE, dir_fd=self.fd
        )
        try:
            try:
                _write_all(fd, data)
                if keep is not None:
                    os.fchmod(fd, keep)
                os.fsync(fd)
            finally:
                os.close(fd)
            # rename() replaces a link at `name` itself, never what it points to.
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        return old is not None

    def _replace_by_path(self, name: str, data: bytes, keep: int | None, shown: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".stigmer-", suffix=".tmp", dir=self.path)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, keep if keep is not None else NEW_FILE)
            if not self.ws._inside(os.path.realpath(self.path)):
                raise _escape(shown, "a folder on it was replaced by a link")
            os.replace(tmp, os.path.join(self.path, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _split(path: str) -> Lines:
    """The parts of a path from the model, checked as text (before anything touches the disk)."""
    if not isinstance(path, str):
        raise ToolFailure("a path is text relative to the workspace, such as notes/todo.md")
    if "\x00" in path:
        raise ToolFailure("invalid path: it contains a NUL byte")
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise ToolFailure("invalid path: it is not valid text") from None
    if size > MAX_PATH_BYTES:
        raise ToolFailure(f"invalid path: it is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith(("/", "\\")) or _DRIVE.match(path):
        raise _escape(path, "give a path relative to the workspace, such as notes/todo.md")
    if path.startswith("~"):
        raise _escape(path, "'~' is not the workspace; give a path relative to it")
    # Backslashes separate too, on every platform, so `..\x` means the same everywhere.
    parts = [p for p in re.split(r"[\\/]", path) if p not in ("", ".")]
    if ".." in parts:
        raise _escape(path, "'..' is not allowed")
    for part in parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise ToolFailure(f"invalid path: a name in it is longer than {MAX_NAME_BYTES} bytes")
        if os.name == "nt" and (":" in part or _DEVICES.fullmatch(part.rstrip(" ."))):
            raise ToolFailure(f"invalid path: {part[:50]!r} is not allowed as a name on Windows")
    return parts


def _escape(path: str, why: str) -> ToolFailure:
    shown = path if len(path) <= 200 else path[:200] + "..."
    return ToolFailure(f"{ESCAPES}: {shown!r} ({why})")


@contextlib.contextmanager
def _os_errors(shown: str) -> Iterator[None]:
    """An OSError from the file system becomes a ToolFailure naming the path as the model wrote it."""
    try:
        yield
    except OSError as e:
        reason = _REASON_BY_ERRNO.get(e.errno or 0) or (e.strerror or str(e)).lower()
        raise ToolFailure(f"{shown}: {reason}") from None


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _fd_path(fd: int) -> str | None:
    """Where an open descriptor really is, or None when the platform cannot tell."""
    if sys.platform.startswith("linux"):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None  # /proc not mounted: the O_NOFOLLOW walk still holds
    if sys.platform == "darwin":
        import fcntl

        try:
            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
        except OSError:
            return None
        return os.fsdecode(raw.split(b"\0", 1)[0])
    return None


def _text(data: bytes, *, final: bool) -> str | None:
    """`data` as text, or None when it looks binary. A cut in the middle of a character (final=False)
    drops that character rather than showing a replacement sign."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return codecs.getincrementaldecoder("utf-16")("replace").decode(data, final)
    head = data[:SNIFF_BYTES]
    if b"\0" in head:
        return None
    text = codecs.getincrementaldecoder("utf-8-sig")("replace").decode(data, final)
    sample = text[:SNIFF_BYTES]
    if sample and sample.count("\ufffd") > max(4, len(sample) // 4):
        # Mostly undecodable: binary without early NULs. Legacy-encoded text (Latin-1 French: a few
        # percent of its characters) stays readable, with replacement signs.
        return None
    return text


def _clip(line: str) -> str:
    line = line.strip()
    return line if len(line) <= SEARCH_LINE_CHARS else line[:SEARCH_LINE_CHARS] + "..."


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # Split on "\n" only (str.splitlines also splits on form feeds and U+2028): line numbers as editors count.
    for number, line in enumerate(text.split("\n"), 1):
        yield number, line.rstrip("\r")


def _plain_hits(pattern: str, texts: Iterator[tuple[str, str]], limit: int) -> list[tuple[str, int, str]]:
    hits: list[tuple[str, int, str]] = []
    for name, text in texts:
        if pattern not in text:
            continue
        for number, line in _lines(text):
            if pattern in line:
                hits.append((name, number, line))
                if len(hits) >= limit:
                    return hits
    return hits


# Python's re cannot be interrupted: a pattern like (a+)+$ on a long line can run for hours holding the
# GIL, which would stall the whole worker process (heartbeats, other activities). So regular
# expressions run in a child interpreter that is killed at REGEX_TIMEOUT; plain text stays in-process.
_REGEX_CHILD = """
import json, re, sys
request = json.load(sys.stdin)
pattern = re.compile(request["pattern"])
hits = []
for index, text in enumerate(request["texts"]):
    for number, line in enumerate(text.split("\\n"), 1):
        if pattern.search(line.rstrip("\\r")):
            hits.append([index, number])
            if len(hits) >= request["max"]:
                break
    if len(hits) >= request["max"]:
        break
json.dump(hits, sys.stdout)
"""


def _regex_hits(pattern: str, texts: Iterator[tuple[str, str]], limit: int) -> list[tuple[str, int, str]]:
    found = list(texts)
    if not found:
        return []
    if not sys.executable:
        raise ToolFailure("regular expressions are not available here; search for plain text instead")
    request = json.dumps({"pattern": pattern, "texts": [text for _, text in found], "max": limit})
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _REGEX_CHILD],
            input=request.encode(),
            capture_output=True,
            timeout=REGEX_TIMEOUT,
            env=child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ToolFailure(
            f"the regular expression took longer than {REGEX_TIMEOUT:g}s; "
            "use a simpler pattern (no nested repeats such as (a+)+) or search for plain text"
        ) from None
    if done.returncode != 0:
        last = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise ToolFailure(f"the regular expression search failed: {last[0][:200]}")
    hits: list[tuple[str, int, str]] = []
    split: dict[int, Lines] = {}
    for index, number in json.loads(done.stdout):
        name, text = found[index]
        lines = split.setdefault(index, text.split("\n"))
        hits.append((name, number, lines[number - 1].rstrip("\r")))
    return hits


def _chosen_folder(folder: str, data: Path, agent: str) -> Path:
    """The folder an agent file names as its workspace, refused when it would expose too much."""
    if "\x00" in folder:
        raise StigmerError("workspace: the folder name contains a NUL byte.", code=ErrorCode.INVALID_INPUT)
    path = Path(folder).expanduser()
    if not path.is_absolute():
        path = data / path
    real = Path(os.path.realpath(path))
    home = Path(os.path.realpath(Path.home()))
    exposed = (
        "the whole file system"
        if real.parent == real
        else "your home folder"
        if real == home or real in home.parents
        else "Stigmer's data folder"
        if real == data or real in data.parents
        else None
    )
    if exposed is not None:
        raise StigmerError(
            f"workspace: {folder!r} ({real}) would give the agent {exposed}.",
            hint=f"Name a folder of its own, such as ~/agents/{agent}, or leave workspace: out.",
            code=ErrorCode.INVALID_INPUT,
        )
    return real

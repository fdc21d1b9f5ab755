"""Every file the product writes lives under STIGMER_HOME; this module is the one place that says where.

The home and everything in it are private to the user (folders 0700, files 0600): it holds API keys,
tokens, logs of what agents did, and pid records that decide which processes we may signal.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

PRIVATE_DIR = 0o700


@dataclass(frozen=True)
class Paths:
    home: Path  # always absolute: a relative STIGMER_HOME would name another folder from another cwd

    @classmethod
    def from_env(cls, environ: os._Environ[str] | dict[str, str] | None = None) -> Paths:
        env = os.environ if environ is None else environ
        raw = env.get("STIGMER_HOME", "").strip()
        home = Path(raw).expanduser() if raw else Path.home() / ".stigmer"
        return cls(Path(os.path.abspath(home)))

    @property
    def config_file(self) -> Path:
        return self.home / "config.yaml"

    @property
    def bin_dir(self) -> Path:
        return self.home / "bin"

    @property
    def runtime_dir(self) -> Path:
        """Versioned installs of downloaded runtimes: runtime/<name>/<version>/."""
        return self.home / "runtime"

    @property
    def downloads_dir(self) -> Path:
        """Partial downloads, kept between runs so that they resume."""
        return self.home / "downloads"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        """Pid records of the services we started, and the lock that serialises starting and stopping."""
        return self.home / "run"

    @property
    def models_dir(self) -> Path:
        """The built-in engine's model store."""
        return self.home / "models"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def pid_file(self, service: str) -> Path:
        return self.run_dir / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.logs_dir / f"{service}.log"

    @property
    def legacy_llm_pid(self) -> Path:
        """Where versions before the service layer recorded the LLM server: still found and honoured."""
        return self.home / "llm.pid"

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "control.lock"

    def ensure_home(self) -> None:
        """Create the home (0700), or make an existing one private again."""
        self.home.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        _make_private(self.home)

    def ensure(self, *dirs: Path) -> None:
        self.ensure_home()
        for d in dirs:
            d.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            if d.parent == self.home:
                _make_private(d)


def _make_private(folder: Path) -> None:
    if os.name == "nt":
        return  # NTFS permissions follow the user profile; POSIX modes mean nothing there
    with contextlib.suppress(OSError):
        st = folder.stat()
        if stat.S_IMODE(st.st_mode) != PRIVATE_DIR and st.st_uid == os.getuid():
            folder.chmod(PRIVATE_DIR)

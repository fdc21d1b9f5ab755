"""Every file the product writes lives under STIGMER_HOME; this module is the one place that says where."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    home: Path

    @classmethod
    def from_env(cls, environ: os._Environ[str] | dict[str, str] | None = None) -> Paths:
        env = os.environ if environ is None else environ
        raw = env.get("STIGMER_HOME", "").strip()
        return cls(Path(raw).expanduser() if raw else Path.home() / ".stigmer")

    @property
    def config_file(self) -> Path:
        return self.home / "config.yaml"

    @property
    def config_cache(self) -> Path:
        """config.yaml parsed, as JSON: lets quick commands skip the YAML parser (20-30 ms)."""
        return self.home / ".config-cache.json"

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
    def llm_log(self) -> Path:
        return self.logs_dir / "llm.log"

    @property
    def llm_pid(self) -> Path:
        return self.home / "llm.pid"

    @property
    def models_dir(self) -> Path:
        """The built-in engine's model store."""
        return self.home / "models"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    def ensure(self, *dirs: Path) -> None:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)

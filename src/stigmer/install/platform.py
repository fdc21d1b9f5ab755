"""The OS and CPU a release asset is chosen for."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass
from typing import ClassVar, Self

from stigmer.errors import ErrorCode, StigmerError

_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Platform:
    system: str  # linux | darwin | windows
    arch: str  # amd64 | arm64

    # How an unsupported platform is reported: what is missing, and what to do instead. A program
    # with a better alternative to offer subclasses this and names its own (llm/ollama/assets.py).
    product: ClassVar[str] = "This download"
    instead: ClassVar[str] = ""

    @classmethod
    def current(cls) -> Self:
        return cls.of(_platform.system(), _platform.machine())

    @classmethod
    def of(cls, system: str, machine: str) -> Self:
        sysname = system.lower()
        if sysname not in ("linux", "darwin", "windows"):
            raise StigmerError(
                f"{cls.product} is not available for {system}.", hint=cls.instead, code=ErrorCode.UNSUPPORTED
            )
        arch = _ARCHES.get(machine.lower())
        if arch is None:
            raise StigmerError(
                f"{cls.product} is not available for {machine} CPUs.",
                hint=cls.instead,
                code=ErrorCode.UNSUPPORTED,
            )
        return cls(sysname, arch)

    @property
    def exe_suffix(self) -> str:
        return ".exe" if self.system == "windows" else ""

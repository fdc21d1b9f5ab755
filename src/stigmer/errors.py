"""One exception type for everything a user can cause or meet.

It carries what happened, what to do about it, a stable code for --json output and an exit code.
The CLI catches it once and prints it; anything else is a bug and keeps its traceback under --debug.
"""

from __future__ import annotations


class StigmerError(Exception):
    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        code: str = "error",
        exit_code: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message}\n\n{self.hint}" if self.hint else self.message


class NetworkUnreachable(StigmerError):
    """The network (or the server we tried) could not be reached at all: the offline fallback may apply."""


class IntegrityError(StigmerError):
    """Downloaded bytes did not match their published checksum. Never a reason to fall back silently."""

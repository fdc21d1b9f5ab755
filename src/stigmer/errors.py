"""One exception type for everything a user can cause or meet, and one enum of what can go wrong.

Each ErrorCode carries a stable name (printed by --json commands and the HTTP API), the CLI's exit code,
the HTTP status the API answers with, and whether trying again later may succeed. Exit codes are grouped
by kind so that scripts can tell them apart; the table is in the README ("Exit codes").

The CLI catches StigmerError once and prints it; anything else is a bug and keeps its traceback under
--debug.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    # name: (code, exit code, HTTP status, worth retrying)
    INTERNAL = ("internal", 1, 500, False)
    # 2: the command line itself
    USAGE = ("usage", 2, 400, False)
    CONFIG_UNKNOWN_KEY = ("config_unknown_key", 2, 400, False)
    INVALID_MODEL_NAME = ("invalid_model_name", 2, 400, False)
    INVALID_INPUT = ("invalid_input", 2, 400, False)
    TOO_LARGE = ("too_large", 2, 413, False)  # a request body or input over its size limit
    # 3: the configuration
    CONFIG_MALFORMED = ("config_malformed", 3, 500, False)
    CONFIG_INVALID = ("config_invalid", 3, 400, False)
    CONFIG_UNREADABLE = ("config_unreadable", 3, 500, False)
    CLOUD_MODE = ("cloud_mode", 3, 409, False)
    # 4: the network (trying again may work)
    NETWORK_UNREACHABLE = ("network_unreachable", 4, 503, True)
    DOWNLOAD_FAILED = ("download_failed", 4, 502, True)
    DOWNLOAD_HTTP_ERROR = ("download_http_error", 4, 502, False)
    REGISTRY_UNAVAILABLE = ("registry_unavailable", 4, 503, True)
    REGISTRY_ERROR = ("registry_error", 4, 502, False)
    REGISTRY_BAD_MANIFEST = ("registry_bad_manifest", 4, 502, False)
    HF_UNAVAILABLE = ("hf_unavailable", 4, 503, True)
    HF_ERROR = ("hf_error", 4, 502, False)
    HF_OFFLINE = ("hf_offline", 4, 503, False)
    # 5: integrity (nothing was installed)
    CHECKSUM_MISMATCH = ("checksum_mismatch", 5, 502, True)
    CHECKSUM_MISSING = ("checksum_missing", 5, 502, False)
    UNSAFE_ARCHIVE = ("unsafe_archive", 5, 502, False)
    ARCHIVE_DAMAGED = ("archive_damaged", 5, 502, True)
    INVALID_MODEL_FILE = ("invalid_model_file", 5, 400, False)
    STORE_CORRUPT = ("store_corrupt", 5, 500, False)
    # 6: something named does not exist
    MODEL_NOT_FOUND = ("model_not_found", 6, 404, False)
    NOT_FOUND = ("not_found", 6, 404, False)
    # 7: busy or in the way (another program, another command, a model in use)
    PORT_IN_USE = ("port_in_use", 7, 409, False)
    BUSY = ("busy", 7, 409, True)
    CONFLICT = ("conflict", 7, 409, False)  # already decided, already ended: the request came too late
    MODEL_IN_USE = ("model_in_use", 7, 409, False)
    # 8: a service: not running, failed to start, failed a request
    NOT_RUNNING = ("not_running", 8, 503, True)
    START_FAILED = ("start_failed", 8, 500, False)
    LLM_REQUEST_FAILED = ("llm_request_failed", 8, 502, True)
    PULL_FAILED = ("pull_failed", 8, 502, True)
    INSTALL_FAILED = ("install_failed", 8, 500, False)
    # 9: the local disk
    DISK_FULL = ("disk_full", 9, 507, False)
    FILESYSTEM = ("filesystem", 9, 500, False)
    # 10: not possible here
    UNSUPPORTED = ("unsupported", 10, 501, False)
    MODEL_TOO_LARGE = ("model_too_large", 10, 507, False)  # a model this machine cannot hold
    # 11: refused by someone else's server
    ACCESS_DENIED = ("access_denied", 11, 403, False)
    UNAUTHORIZED = ("unauthorized", 11, 401, False)
    # 12, 13: an agent execution did not complete
    EXECUTION_FAILED = ("execution_failed", 12, 500, False)
    EXECUTION_CANCELLED = ("execution_cancelled", 13, 409, False)
    # 14: `stigmer doctor` found problems (its report says which, each with its fix)
    DOCTOR_PROBLEMS = ("doctor_problems", 14, 500, False)
    # 130: interrupted (Ctrl-C), as shells report SIGINT
    INTERRUPTED = ("interrupted", 130, 499, True)

    def __init__(self, code: str, exit_code: int, http_status: int, retryable: bool) -> None:
        self.code = code
        self.exit_code = exit_code
        self.http_status = http_status
        self.retryable = retryable

    @classmethod
    def from_code(cls, code: str) -> ErrorCode:
        """The member for a stable code name (as sent by the API); INTERNAL for one we do not know."""
        return _BY_CODE.get(code, cls.INTERNAL)


_BY_CODE = {member.code: member for member in ErrorCode}


class StigmerError(Exception):
    def __init__(self, message: str, *, code: ErrorCode, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    @property
    def exit_code(self) -> int:
        return self.code.exit_code

    def to_dict(self) -> dict[str, str]:
        """The JSON shape of an error: on stderr for --json commands, in the body of API answers."""
        return {"code": self.code.code, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        return f"{self.message}\n\n{self.hint}" if self.hint else self.message


class NetworkUnreachable(StigmerError):
    """The network (or the server we tried) could not be reached at all: the offline fallback may apply."""


class IntegrityError(StigmerError):
    """Downloaded bytes did not match their published checksum. Never a reason to fall back silently."""

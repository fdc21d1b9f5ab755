"""What a failed download says: urllib's errors turned into StigmerErrors that name the file and server.

Every message names what was being downloaded (`what`, e.g. "local LLM" or "model smollm2:135m") and the
URL without its query (signed CDN URLs carry tokens). The advice for failures that a setting or a mirror
can cause comes from the caller (`hint`): this layer serves the Local LLM, the Temporal CLI and models
alike, so it knows none of their settings.
"""

from __future__ import annotations

import urllib.error

from stigmer.errors import ErrorCode, IntegrityError, NetworkUnreachable, StigmerError
from stigmer.net import http

RESUME_HINT = "What was downloaded is kept; run the command again to continue where it stopped."


class Transient(Exception):
    """A failure worth another try (a cut, a stall, HTTP 5xx/408/429); its text says what happened."""


class HttpStatusError(StigmerError):
    """The server answered an HTTP error that trying again will not change (404, 403, ...)."""

    def __init__(self, message: str, *, status: int, code: ErrorCode, hint: str = "") -> None:
        super().__init__(message, code=code, hint=hint)
        self.status = status


def join(*parts: str) -> str:
    """Sentences of a hint, the empty ones left out."""
    return " ".join(p.strip() for p in parts if p and p.strip())


def http_error(err: urllib.error.HTTPError, *, what: str, url: str, hint: str) -> HttpStatusError:
    return HttpStatusError(
        f"Download of {what} failed: {http.redact(url)} answered HTTP {err.code} {err.reason}.",
        status=err.code,
        code=ErrorCode.DOWNLOAD_HTTP_ERROR,
        hint=hint or "Check the address, then run the command again.",
    )


def unreachable(err: BaseException, *, what: str, url: str, hint: str) -> NetworkUnreachable:
    """Nothing answered at `url` (see retry.is_unreachable)."""
    return NetworkUnreachable(
        f"Failed to download {what}: {http.describe(err)} ({http.redact(url)}).",
        hint=join("Check your connection (and HTTPS_PROXY).", hint),
        code=ErrorCode.NETWORK_UNREACHABLE,
    )


def attempt_failed(err: BaseException, *, first: bool, what: str, url: str, hint: str) -> Exception:
    """What one failed request means: Transient (worth another try) or the error to report. `err` is an
    HTTPError or one of retry.TRANSIENT_ERRORS; nothing answering on the first attempt is final."""
    from stigmer.net import retry

    if isinstance(err, urllib.error.HTTPError):
        if retry.transient_status(err.code):
            return Transient(f"server answered HTTP {err.code}")
        return http_error(err, what=what, url=url, hint=hint)
    if first and retry.is_unreachable(err):
        return unreachable(err, what=what, url=url, hint=hint)
    return Transient(http.describe(err))


def gave_up(reason: BaseException, *, what: str, attempts: int, hint: str = "") -> NetworkUnreachable:
    return NetworkUnreachable(
        f"Download of {what} failed after {attempts} attempts: {reason}.",
        hint=join(RESUME_HINT, hint),
        code=ErrorCode.DOWNLOAD_FAILED,
    )


def checksum_mismatch(*, what: str, expected: str, got: str, hint: str) -> IntegrityError:
    return IntegrityError(
        f"Checksum mismatch for {what}: expected sha256 {expected}, got {got}.",
        hint=join(
            "The download was corrupted or tampered with; it was deleted and nothing was installed. "
            "Run the command again; if it repeats, the server sends a different file.",
            hint,
        ),
        code=ErrorCode.CHECKSUM_MISMATCH,
    )


def wrong_size(*, what: str, expected: int, got: str, hint: str) -> IntegrityError:
    return IntegrityError(
        f"Download of {what} has the wrong size: expected {expected} bytes, the server has {got}.",
        hint=join("The server or mirror serves a different file; nothing was installed.", hint),
        code=ErrorCode.CHECKSUM_MISMATCH,
    )


def disk_filled(err: OSError, *, what: str) -> StigmerError | None:
    """Our error for a write that failed because the disk (or quota) is full; None for other errors."""
    if err.errno not in (28, 122):  # ENOSPC, EDQUOT (not in every platform's errno module)
        return None
    return StigmerError(
        f"The disk filled up while downloading {what}.",
        code=ErrorCode.DISK_FULL,
        hint="Free some space and run the command again; the download resumes where it stopped.",
    )

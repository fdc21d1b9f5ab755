"""Our errors for those huggingface_hub raises, with the token kept out of every message.

Only huggingface_hub's own error types and the standard library's are named here. Its HTTP client
changed between major versions (requests in 0.x, httpx in 1.x, httpx2 in 2.x) and is not a dependency
of ours, so a failed connection is recognised by what every one of them keeps: the socket error that
caused it, chained as __cause__ or __context__ (see transport_failure).
"""

from __future__ import annotations

import errno
import os

from stigmer.errors import ErrorCode, NetworkUnreachable, StigmerError
from stigmer.llm.names import ModelName
from stigmer.net.http import describe, redact

# Base classes of the transport errors of requests (RequestException) and httpx / httpx2
# (TransportError): matched by name because their packages are huggingface_hub's, not ours.
_TRANSPORT_BASES = frozenset({"TransportError", "RequestException"})
_CHAIN_LIMIT = 16  # links of __cause__/__context__ followed; chains are short, a loop must not hang us


def secrets() -> list[str]:
    return [t for t in (os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if t]


def scrub(text: str) -> str:
    """Belt and braces: whatever text from huggingface_hub we show, the token never appears in it."""
    for secret in secrets():
        text = text.replace(secret, "***")
    return text


def socket_cause(e: BaseException) -> OSError | None:
    """The OSError (refused, unresolvable, timed out, reset) that an HTTP client's error was raised from."""
    seen: set[int] = set()
    link: BaseException | None = e.__cause__ or e.__context__
    while link is not None and id(link) not in seen and len(seen) < _CHAIN_LIMIT:
        if isinstance(link, OSError):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def transport_failure(e: BaseException) -> bool:
    """True when the connection failed (as opposed to an answer we did not like)."""
    if any(cls.__name__ in _TRANSPORT_BASES for cls in type(e).__mro__):
        return True
    return not isinstance(e, OSError) and socket_cause(e) is not None


def reason(e: BaseException) -> str:
    """A short reason for a failed connection: "connection refused", "timed out", ..."""
    cause = e if isinstance(e, ConnectionError | TimeoutError) else socket_cause(e)
    if cause is not None:
        return describe(cause)
    text = str(e).lower()
    if "refused" in text:
        return "connection refused"
    if "timed out" in text or "timeout" in type(e).__name__.lower():
        return "timed out"
    if "name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text:
        return "host name could not be resolved"
    return scrub(str(e).splitlines()[0] if str(e) else type(e).__name__)


def unreachable(name: ModelName, endpoint: str, e: BaseException) -> NetworkUnreachable:
    return NetworkUnreachable(
        f"Could not reach Hugging Face ({redact(endpoint)}) to pull {name}: {reason(e)}.",
        hint="Check your connection (and HTTPS_PROXY). To use a mirror, set HF_ENDPOINT; models already "
        "in the Hugging Face cache work offline with HF_HUB_OFFLINE=1.",
        code=ErrorCode.NETWORK_UNREACHABLE,
    )


def translate(e: BaseException, name: ModelName, endpoint: str) -> StigmerError | None:
    """Our error for one raised by huggingface_hub (or its HTTP client); None when it is not one of those."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = f"{name.namespace}/{name.model}"
    page = f"https://huggingface.co/{repo}"
    if isinstance(e, GatedRepoError):
        status = e.response.status_code
        if status == 401:  # no token, or an invalid one
            hint = f"Accept its terms on {page} while logged in, then set HF_TOKEN to a read token of "
            hint += "that account."
        else:
            hint = "Your Hugging Face token has no access to it: accept its terms on "
            hint += f"{page} with the account the token belongs to."
        return StigmerError(
            f"hf.co/{repo} is a gated repository: its files need an accepted licence and a token "
            f"(Hugging Face answered HTTP {status}).",
            hint=hint,
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError):
        return StigmerError(
            f"Hugging Face repository hf.co/{repo} was not found (or is private).",
            hint="Check the name: hf.co/ORG/REPO[:QUANT], as in the repository's address on huggingface.co. "
            "For a private repository, set HF_TOKEN to a token that can read it.",
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
        return StigmerError(
            f"A file of hf.co/{repo} was not found on Hugging Face (the repository changed meanwhile?).",
            hint="Run the command again.",
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code
        if status >= 500 or status == 429:
            return NetworkUnreachable(
                f"Hugging Face ({redact(endpoint)}) is unavailable: HTTP {status}.",
                hint="Try again later; models already in the Hugging Face cache work offline with "
                "HF_HUB_OFFLINE=1.",
                code=ErrorCode.HF_UNAVAILABLE,
            )
        return StigmerError(
            f"Hugging Face ({redact(endpoint)}) answered HTTP {status} for hf.co/{repo}.",
            hint="Check the name and HF_ENDPOINT (when set); if a token is needed, set HF_TOKEN.",
            code=ErrorCode.HF_ERROR,
        )
    # LocalEntryNotFoundError online: hf_hub_download could reach neither the Hub nor a cached copy.
    if isinstance(e, OfflineModeIsEnabled | LocalEntryNotFoundError) or transport_failure(e):
        return unreachable(name, endpoint, e)
    if isinstance(e, HFValidationError):
        return StigmerError(
            f"{name} is not a valid Hugging Face repository name: {scrub(str(e))}",
            hint="Names look like hf.co/ORG/REPO[:QUANT].",
            code=ErrorCode.INVALID_MODEL_NAME,
        )
    return _local_failure(e, name)


def _local_failure(e: BaseException, name: ModelName) -> StigmerError | None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return StigmerError(
            f"The disk holding the Hugging Face cache is full: {scrub(str(e))}",
            hint="Free some space, or point HF_HOME (or HF_HUB_CACHE) at a bigger disk, and run the "
            "command again.",
            code=ErrorCode.DISK_FULL,
        )
    if isinstance(e, PermissionError):
        return StigmerError(
            f"Cannot write to the Hugging Face cache: {scrub(str(e))}",
            hint="Fix the folder's permissions, or point HF_HOME (or HF_HUB_CACHE) at a writable folder.",
            code=ErrorCode.FILESYSTEM,
        )
    if isinstance(e, OSError):
        # e.g. "Consistency check failed": the body was shorter than announced (a dropped connection).
        return NetworkUnreachable(
            f"Downloading {name} from Hugging Face failed: {reason(e)}",
            hint="Run the command again.",
            code=ErrorCode.DOWNLOAD_FAILED,
        )
    return None

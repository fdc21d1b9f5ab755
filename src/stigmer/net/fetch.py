"""Small files read into memory (checksum lists, chat templates), with the downloads' retry policy.

Nothing is written to disk and nothing resumes: these files are a few KB, so a failed try starts over.
"""

from __future__ import annotations

import logging
import urllib.error
from dataclasses import dataclass

from stigmer.net import failures, http, retry
from stigmer.net.failures import Transient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetched:
    data: bytes
    final_url: str  # after redirects: GitHub's "latest" names its version here


def fetch_small(
    url: str,
    *,
    what: str,
    limit: int,
    hint: str = "",
    headers: dict[str, str] | None = None,
    timeout: float = http.DEFAULT_TIMEOUT,
    policy: retry.RetryPolicy | None = None,
) -> Fetched:
    """At most `limit` bytes of url; the caller checks them (size, digest, format).

    Raises NetworkUnreachable when nothing answers the first try, failures.HttpStatusError for an HTTP
    error that another try would not change, and NetworkUnreachable (download_failed) once the retry
    policy's attempts are spent.
    """
    policy = retry.current(policy)
    sent = {"Accept-Encoding": "identity", **(headers or {})}
    attempt = 0
    while True:
        attempt += 1
        try:
            return _try(url, sent, limit=limit, timeout=timeout, what=what, hint=hint, first=attempt == 1)
        except Transient as e:
            if attempt >= policy.attempts:
                raise failures.gave_up(e, what=what, attempts=attempt, hint=hint) from None
            log.info("fetching %s: %s; retrying in %.2fs", http.redact(url), e, policy.delay(attempt))
            policy.wait(attempt)


def _try(
    url: str, headers: dict[str, str], *, limit: int, timeout: float, what: str, hint: str, first: bool
) -> Fetched:
    # `from None` below: the chained urllib error would repeat the full URL, which may be signed.
    try:
        with http.request(url, headers=headers, timeout=timeout) as resp:
            return Fetched(resp.read(limit), resp.geturl())
    except urllib.error.HTTPError as e:
        e.close()
        raise failures.attempt_failed(e, first=first, what=what, url=url, hint=hint) from None
    except retry.TRANSIENT_ERRORS as e:
        raise failures.attempt_failed(e, first=first, what=what, url=url, hint=hint) from None

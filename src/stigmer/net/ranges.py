"""The Content-Range header of a 206 or 416 answer, read strictly (RFC 9110, section 14.4).

A resumed download writes the body at the offset this header names, so a value we cannot fully trust
is treated as no value at all: the caller then retries instead of writing bytes at a guessed place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(?:(?P<start>\d+)-(?P<end>\d+)|\*)/(?P<total>\d+|\*)\s*")


@dataclass(frozen=True)
class ContentRange:
    start: int | None  # first byte of the body; None for "bytes */N" (the answer to an unsatisfiable range)
    end: int | None  # last byte of the body, inclusive
    total: int | None  # size of the whole file; None when the server wrote "*"


def parse_content_range(value: str | None) -> ContentRange | None:
    """'bytes 100-199/200' -> ContentRange(100, 199, 200); 'bytes */100' -> (None, None, 100);
    None for a missing or malformed value, or one that contradicts itself (end before start, end past
    the total)."""
    m = _CONTENT_RANGE.fullmatch(value or "")
    if m is None:
        return None
    total = None if m["total"] == "*" else int(m["total"])
    if m["start"] is None:
        return None if total is None else ContentRange(None, None, total)  # "bytes */*" says nothing
    start, end = int(m["start"]), int(m["end"])
    if end < start or (total is not None and end >= total):
        return None
    return ContentRange(start, end, total)

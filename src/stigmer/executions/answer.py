"""The answer a stream showed against the answer the record keeps: a client that followed the stream ends
on the recorded answer, never on less (the CLI's `stigmer run`, the OpenAI-compatible endpoint)."""

from __future__ import annotations


def rest_of(shown: str, answer: str) -> str | None:
    """What of `answer` is still to be shown after `shown` ("" for nothing), compared without white space
    (the stream and the record may join parts differently); None when `shown` is not the start of it."""
    seen, want = "".join(shown.split()), "".join(answer.split())
    if want in seen:
        return ""
    if not want.startswith(seen):
        return None
    count = 0
    for i, ch in enumerate(answer):
        if count == len(seen):
            rest = answer[i:]
            # the white space already shown at the end of `shown` is not shown again
            shown_ws = len(shown) - len(shown.rstrip())
            rest_ws = len(rest) - len(rest.lstrip())
            return rest[min(shown_ws, rest_ws) :]
        if not ch.isspace():
            count += 1
    return ""

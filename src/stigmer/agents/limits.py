"""What one execution of an agent may use: model calls, tool calls, tokens (in and out, over all model
calls) and seconds. Every agent has limits: generous defaults, which the agent file's `limits:` and a
run's `--limit NAME=N` lower or raise within bounds, so a model that calls tools forever, or talks
forever, stops.

    limits: {model_calls: 20, tool_calls: 40, tokens: 200000, seconds: 600}
"""

from __future__ import annotations

from typing import Any

from stigmer.errors import ErrorCode, StigmerError

# name -> (default, most allowed)
LIMITS: dict[str, tuple[int, int]] = {
    "model_calls": (100, 10_000),
    "tool_calls": (200, 10_000),
    "tokens": (2_000_000, 100_000_000),
    "seconds": (3600, 7 * 24 * 3600),
}
HINT = (
    "Limits are model_calls, tool_calls, tokens and seconds, each a whole number from 1 up to "
    + ", ".join(f"{name} {most:,}" for name, (_, most) in LIMITS.items())
    + "."
)


def check(raw: Any, where: str = "limits") -> dict[str, int]:
    """The limits a mapping sets, each a known name with a positive whole number within its bound."""
    if not isinstance(raw, dict):
        raise StigmerError(
            f"{where}: `limits` must be a mapping like {{tool_calls: 10, seconds: 600}}.",
            hint=HINT,
            code=ErrorCode.INVALID_INPUT,
        )
    out: dict[str, int] = {}
    for name, value in raw.items():
        if name not in LIMITS:
            raise StigmerError(
                f"{where}: unknown limit {str(name)[:40]!r}.", hint=HINT, code=ErrorCode.INVALID_INPUT
            )
        most = LIMITS[name][1]
        if type(value) is not int or not 1 <= value <= most:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise StigmerError(
                f"{where}: limit {name} must be a whole number from 1 to {most}, not {shown}.",
                hint=HINT,
                code=ErrorCode.INVALID_INPUT,
            )
        out[name] = value
    return out


def parse_flags(flags: list[str]) -> dict[str, int]:
    """`--limit tool_calls=10` flags as a mapping (checked)."""
    raw: dict[str, Any] = {}
    for flag in flags:
        name, sep, value = flag.partition("=")
        if not sep or not value.strip().isdigit():
            raise StigmerError(
                f"--limit {flag[:60]!r}: give NAME=N, e.g. --limit tool_calls=10.",
                hint=HINT,
                code=ErrorCode.USAGE,
            )
        raw[name.strip()] = int(value.strip())
    return check(raw, "--limit")


def effective(agent: dict[str, int] | None, run: dict[str, int] | None) -> dict[str, int]:
    """Every limit of an execution: the run's, else the agent file's, else the default."""
    return {
        name: (run or {}).get(name) or (agent or {}).get(name) or default
        for name, (default, _) in LIMITS.items()
    }

"""How deeply nested parsed data is, measured without recursion.

Parsed JSON or YAML from outside (an API body, an agent file) is walked by recursive code afterwards
(validation, copying, serialising), which a document of 100,000 `[` would take past Python's recursion
limit: a RecursionError, not an answer. Such input is refused first, by depth.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 100  # nothing Stigmer reads nests more than a few levels; generous for tool arguments


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when lists and dicts in `value` nest more than `limit` levels deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False

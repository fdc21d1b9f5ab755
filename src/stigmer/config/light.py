"""A few settings read without the settings schema or a YAML library, for commands with a tight budget.

`stigmer server llm status` must answer in under 100 ms, and the full loader (store.load) costs ~15 ms
for the typed schema and ~20 ms for ruamel.yaml before it reads a byte. The status needs four values
(llm.provider, llm.model, llm.base_url, llm.fallback_base_url). This reader takes them from the environment and config.yaml
as store.load would, defaults < file < environment, and understands exactly the YAML that `stigmer
config set` writes and people write by hand: block mappings of plain or quoted scalars, with comments.
For anything else (flow collections, lists, anchors, tags, block or multi-line scalars, tabs, a
duplicate key, a value YAML might read as a number, a file too large or not UTF-8) it answers None,
and the caller uses the full loader: it never guesses. Values are returned as text, unchecked: the
caller validates what it uses, and leaves a value it cannot vouch for to the full loader.

Nothing here is cached: the file is read each time, so nothing can go stale.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_BYTES = 64 * 1024  # as store.MAX_BYTES: a larger file is the full loader's to refuse

# Where each key lives in config.yaml, and its environment variable (as the schema derives them;
# tests/test_light_config.py checks this table against the schema).
KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "llm.provider": (("backend", "local", "llm", "provider"), "STIGMER_LLM_PROVIDER"),
    "llm.model": (("backend", "local", "llm", "model"), "STIGMER_LLM_MODEL"),
    "llm.base_url": (("backend", "local", "llm", "base_url"), "STIGMER_LLM_BASE_URL"),
    "llm.fallback_base_url": (
        ("backend", "local", "llm", "fallback_base_url"),
        "STIGMER_LLM_FALLBACK_BASE_URL",
    ),
}

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_INT = re.compile(r"0|[1-9][0-9]*")
_NUMBERISH = re.compile(r"[-+.]?[0-9.]")  # a plain scalar YAML may read as a number: not ours to type
_SPECIAL = {"~", "null", "Null", "NULL"}
_TRUE = {"true", "True", "TRUE"}
_FALSE = {"false", "False", "FALSE"}
_INDICATORS = tuple("[]{}#&*!|>'\"%@`,?")


class _Unsure(Exception):
    """The text is outside the subset read here."""


class Untyped(str):
    """A plain scalar YAML may read as a number (010, 0x1f, 1_000, 2.5, .inf, 0.33.0): kept as its
    text, so a file holding one still reads, but never given out as a value (read() says None)."""


def read(
    config_file: Path, names: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> dict[str, tuple[str, str]] | None:
    """{name: (value as text, "default" | "file" | "env")} for the keys asked (all in KEYS); a key
    neither in the file nor in the environment is ("", "default"). None: use the full loader."""
    env = os.environ if environ is None else environ
    doc = read_file(config_file)
    if doc is None:
        return None
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        path, env_name = KEYS[name]
        value: tuple[str, str] = ("", "default")
        node: Any = doc
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            if not isinstance(node, str) or isinstance(node, Untyped):
                return None  # a number, a boolean or an untyped value: the full loader says what it is
            value = (node, "file")
        raw = env.get(env_name)
        if raw:  # as store.load: an empty variable is not set
            value = (raw, "env")
        out[name] = value
    return out


def read_file(config_file: Path) -> dict[str, Any] | None:
    """config.yaml as nested dicts ({} when there is no file), or None when it is not plainly readable
    here (missing permissions, too large, not UTF-8, or YAML outside the subset)."""
    try:
        with config_file.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError:
        return None
    if len(data) > MAX_BYTES:
        return None
    try:
        return parse(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def parse(text: str) -> dict[str, Any] | None:
    """The block mappings of `text` as nested dicts, or None for anything outside the subset."""
    try:
        return _parse(text)
    except _Unsure:
        return None


def _parse(text: str) -> dict[str, Any]:
    if text.startswith("\ufeff") or "\t" in text or "\r" in text:
        raise _Unsure
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict[str, Any]]] = [(-1, root)]  # (indent of its keys, mapping); -1: unset
    pending: tuple[int, dict[str, Any], str] | None = None  # a key whose value may be a nested mapping
    for line in text.split("\n"):
        body = line.strip()
        if not body or body.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if pending is not None:
            p_indent, p_map, p_key = pending
            pending = None
            if indent > p_indent:
                child: dict[str, Any] = {}
                p_map[p_key] = child
                stack.append((indent, child))
            else:
                p_map[p_key] = None  # `key:` with nothing under it is null
        while len(stack) > 1 and stack[-1][0] > indent:
            stack.pop()
        level, mapping = stack[-1]
        if level == -1:
            stack[-1] = (indent, mapping)
        elif level != indent:
            raise _Unsure  # not aligned with its siblings
        key, sep, rest = body.partition(":")
        if not sep or not _KEY.fullmatch(key) or (rest and not rest.startswith(" ")):
            raise _Unsure  # a list item, a quoted or complex key, a document marker, a directive...
        if key in mapping:
            raise _Unsure  # duplicate: YAML refuses it
        value = rest.strip()
        if not value or value.startswith("#"):
            pending = (indent, mapping, key)
            continue
        mapping[key] = _scalar(value)
    if pending is not None:
        pending[1][pending[2]] = None
    return root


def _scalar(text: str) -> Any:
    """One scalar and an optional comment after it, typed as YAML 1.2 (ruamel's default) types it."""
    if text[0] in "'\"":
        quote = text[0]
        end = 1
        while True:
            end = text.find(quote, end)
            if end == -1:
                raise _Unsure
            if quote == "'" and text[end + 1 : end + 2] == "'":
                end += 2  # '' is an escaped quote
                continue
            break
        inner, after = text[1:end], text[end + 1 :].strip()
        if after and not after.startswith("#"):
            raise _Unsure
        if quote == '"' and "\\" in inner:
            raise _Unsure  # escapes: leave them to a real parser
        return inner.replace("''", "'") if quote == "'" else inner
    value, _, _comment = text.partition(" #")
    value = value.strip()
    if value.startswith(_INDICATORS) or value.startswith(("- ", ": ")) or value == "-" or ": " in value:
        raise _Unsure
    if value.endswith(":"):
        raise _Unsure
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value in _SPECIAL:
        return None
    if _INT.fullmatch(value):
        return int(value)
    if _NUMBERISH.match(value):
        return Untyped(value)  # YAML's rules for numbers, not ours
    return value

"""Load and save config.yaml: defaults < file < environment, comments kept on write.

A malformed file is never overwritten: every command that reads it fails with the file, line and column.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stigmer.config.keys import BY_NAME, KEYS, PROVIDER_DEFAULTS, Key, Value
from stigmer.errors import StigmerError
from stigmer.fsutil import atomic_write
from stigmer.paths import Paths

Source = Literal["default", "file", "env"]

CONFIG_MODE = 0o600  # it may hold API keys and tokens

HEADER = """\
# Stigmer configuration. Edit by hand or with `stigmer config set KEY VALUE`.
# Environment variables (STIGMER_LLM_MODEL, ...) override what is written here.
"""


@dataclass
class Settings:
    values: dict[str, Value]
    sources: dict[str, Source]
    file: Path
    file_exists: bool

    def get(self, name: str) -> Value:
        """Effective value; llm.model and llm.base_url follow the provider when left empty."""
        value = self.values[name]
        if value == "" and name in ("llm.model", "llm.base_url"):
            return PROVIDER_DEFAULTS[self.provider][name]
        return value

    def source(self, name: str) -> Source:
        return self.sources[name]

    @property
    def provider(self) -> str:
        return str(self.values["llm.provider"])

    @property
    def model(self) -> str:
        return str(self.get("llm.model"))

    @property
    def base_url(self) -> str:
        return str(self.get("llm.base_url"))

    def with_values(self, overrides: dict[str, Value]) -> Settings:
        """A copy with some keys replaced (e.g. by the offline fallback), by short name."""
        return Settings({**self.values, **overrides}, dict(self.sources), self.file, self.file_exists)


def _yaml() -> Any:
    from ruamel.yaml import YAML  # 20 ms: only when a file is really read or written

    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _read_document(path: Path) -> Any:
    """The parsed round-trip document, or None when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StigmerError(
            f"Cannot read {path}: {e.strerror}.",
            hint="Check the file's permissions.",
            code="config_unreadable",
        ) from e
    from ruamel.yaml.error import MarkedYAMLError

    try:
        doc = _yaml().load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise StigmerError(
            f"Malformed config file {where}: {e.problem or e.context}.",
            hint=f"Fix the file by hand (it was left as it is), or move it away to start from defaults:\n"
            f"  mv {path} {path}.bak",
            code="config_malformed",
        ) from e
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise StigmerError(
            f"Malformed config file {path}: the top level must be a mapping of keys.",
            hint="See `stigmer config list` for the expected keys.",
            code="config_malformed",
        )
    return doc


def _dig(doc: Mapping[str, Any], key: Key, path: Path) -> tuple[bool, Any]:
    node: Any = doc
    for i, part in enumerate(key.path):
        if node is None:
            return False, None
        if not isinstance(node, Mapping):
            where = ".".join(key.path[:i])
            raise StigmerError(
                f"Malformed config file {path}: '{where}' must be a mapping.",
                hint="Fix the file by hand, or move it away to start from defaults.",
                code="config_malformed",
            )
        if part not in node:
            return False, None
        node = node[part]
    return node is not None, node


def _line_of(doc: Any, key: Key) -> str:
    """' (line N)' for a key in a round-trip document, when ruamel knows it."""
    node = doc
    try:
        for part in key.path[:-1]:
            node = node[part]
        line, _col = node.lc.key(key.path[-1])
        return f", line {line + 1}"
    except Exception:  # position is a nicety; never fail over it
        return ""


def _stamp(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _cached_document(paths: Paths, stamp: list[int] | None) -> Any:
    """The parsed file from the JSON cache when it was made from this very file (same mtime, size, inode)."""
    if stamp is None:
        return None
    try:
        data = json.loads(paths.config_cache.read_bytes())
    except (OSError, ValueError):
        return None
    return data.get("doc") if isinstance(data, dict) and data.get("stamp") == stamp else None


def _plain(node: Any) -> Any:
    """A round-trip document as plain JSON types (ruamel's booleans are ints underneath)."""
    from ruamel.yaml.scalarbool import ScalarBoolean

    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, ScalarBoolean):
        return bool(node)
    if node is None or isinstance(node, bool | int | float | str):
        return node
    return str(node)


def _save_cache(paths: Paths, stamp: list[int], doc: Any) -> None:
    try:
        body = json.dumps({"stamp": stamp, "doc": _plain(doc)}).encode()
        atomic_write(paths.config_cache, body, mode=CONFIG_MODE)  # it holds what the file holds
    except (OSError, TypeError, ValueError):
        pass  # only a speed-up: never fail a command over it


def load(paths: Paths, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    stamp = _stamp(paths.config_file)
    doc = _cached_document(paths, stamp)
    from_cache = doc is not None
    if not from_cache:
        doc = _read_document(paths.config_file)
    values: dict[str, Value] = {}
    sources: dict[str, Source] = {}
    for key in KEYS:
        values[key.name], sources[key.name] = key.default, "default"
        if doc is not None:
            present, raw = _dig(doc, key, paths.config_file)
            if present:
                try:
                    values[key.name] = key.validate(raw)
                except (ValueError, StigmerError) as e:
                    why = e.message if isinstance(e, StigmerError) else str(e)
                    raise StigmerError(
                        f"Invalid value for {key.name} in {paths.config_file}{_line_of(doc, key)}: "
                        f"{raw!r} {why}",
                        hint=f"Fix it with: stigmer config set {key.name} <value>",
                        code="config_invalid",
                    ) from None
                sources[key.name] = "file"
        env_raw = env.get(key.env)
        if env_raw is not None and env_raw != "":
            try:
                values[key.name] = key.validate(env_raw)
            except (ValueError, StigmerError) as e:
                why = e.message if isinstance(e, StigmerError) else str(e)
                raise StigmerError(
                    f"Invalid value in environment variable {key.env}={env_raw!r}: {why}",
                    hint=f"Fix or unset {key.env}.",
                    code="config_invalid",
                ) from None
            sources[key.name] = "env"
    if doc is not None and not from_cache and stamp is not None:
        _save_cache(paths, stamp, doc)  # only a file whose values all passed validation
    return Settings(values, sources, paths.config_file, doc is not None)


def _default_document() -> Any:
    y = _yaml()
    doc = y.load(HEADER + "{}\n")
    for key in KEYS:
        if key.name in ("llm.model", "llm.base_url"):
            continue  # left out so that they follow the provider until the user sets them
        _set_in(doc, key.path, key.default)
    return doc


def _set_in(doc: Any, path: tuple[str, ...], value: Value) -> None:
    from ruamel.yaml.comments import CommentedMap

    node = doc
    for part in path[:-1]:
        if part not in node or node[part] is None:
            node[part] = CommentedMap()
        node = node[part]
    node[path[-1]] = value


def _write(path: Path, doc: Any) -> None:
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    atomic_write(path, buf.getvalue().encode("utf-8"), mode=CONFIG_MODE)


def ensure_file(paths: Paths) -> bool:
    """Create config.yaml with the defaults on first run. True when it was created now."""
    if paths.config_file.exists():
        return False
    _write(paths.config_file, _default_document())
    return True


def set_value(paths: Paths, name: str, raw: str) -> Value:
    key = require_key(name)
    try:
        value = key.validate(raw)
    except ValueError as e:
        raise StigmerError(
            f"Invalid value for {name}: {raw!r} {e}.",
            hint=f"{name}: {key.doc}",
            code="config_invalid",
        ) from None
    doc = _read_document(paths.config_file)
    if doc is None:
        doc = _default_document()
    else:
        for k in KEYS:  # refuse to write on top of a file that holds other bad values
            _dig(doc, k, paths.config_file)
    _set_in(doc, key.path, value)
    _write(paths.config_file, doc)
    return value


def require_key(name: str) -> Key:
    key = BY_NAME.get(name)
    if key is None:
        raise StigmerError(
            f"Unknown config key {name!r}.",
            hint="Valid keys:\n" + "\n".join(f"  {k.name}" for k in KEYS),
            code="config_unknown_key",
        )
    return key


def display(key: Key, value: Value) -> str:
    if key.secret and value:
        return "********"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

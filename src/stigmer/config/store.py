"""Load and save config.yaml: defaults < file < environment, comments kept on write.

A malformed file is never overwritten: every command that reads it fails with the file, line and column.
The file is small by nature, so one over MAX_BYTES is refused rather than parsed; YAML anchors and
aliases are refused too (a few hundred bytes of nested aliases expand to gigabytes).
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stigmer.config.kinds import Value
from stigmer.config.schema import (
    BY_NAME,
    FOLLOW_PROVIDER,
    KEYS,
    PROVIDER_DEFAULTS,
    SECTIONS,
    BackendSettings,
    CloudSettings,
    Key,
    LlmSettings,
    ServerSettings,
    TemporalSettings,
    ToolsSettings,
    check,
)
from stigmer.errors import ErrorCode, StigmerError
from stigmer.fsutil import PRIVATE_FILE, atomic_write
from stigmer.paths import Paths

Source = Literal["default", "file", "env"]

MAX_BYTES = 64 * 1024  # a full config.yaml with comments is ~1.5 KB

HEADER = """\
# Stigmer configuration. Edit by hand or with `stigmer config set KEY VALUE`.
# Environment variables (STIGMER_LLM_MODEL, ...) override what is written here.
"""


@dataclass(frozen=True)
class Settings:
    backend: BackendSettings
    llm: LlmSettings
    temporal: TemporalSettings
    server: ServerSettings
    tools: ToolsSettings
    cloud: CloudSettings
    sources: Mapping[str, Source]
    file: Path
    file_exists: bool
    notices: tuple[str, ...] = field(default=())  # things worth a warning (a file fixed on load)

    def value(self, name: str) -> Value:
        """A setting by its key name (`llm.model`); the code reads the typed sections instead."""
        key = require_key(name)
        return getattr(getattr(self, key.section), key.field)  # type: ignore[no-any-return]

    def source(self, name: str) -> Source:
        return self.sources[name]


def defaults(paths: Paths) -> Settings:
    return _build({k.name: k.default for k in KEYS}, {k.name: "default" for k in KEYS}, paths, False)


def _build(values: dict[str, Value], sources: dict[str, Source], paths: Paths, exists: bool) -> Settings:
    provider = str(values["llm.provider"])
    for name in FOLLOW_PROVIDER:
        if values[name] == "":
            values[name] = PROVIDER_DEFAULTS[provider][name.split(".", 1)[1]]
    sections: dict[str, Any] = {}
    for section, (cls, _path) in SECTIONS.items():
        sections[section] = cls(**{f.name: values[f"{section}.{f.name}"] for f in dataclasses.fields(cls)})
    return Settings(**sections, sources=sources, file=paths.config_file, file_exists=exists)


# -- reading ---------------------------------------------------------------------------------------------
def _yaml() -> Any:
    from ruamel.yaml import YAML  # 20 ms: only when a file is really read or written

    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _malformed(where: str, why: str, path: Path) -> StigmerError:
    return StigmerError(
        f"Malformed config file {where}: {why}.",
        hint=f"Fix the file by hand (it was left as it is), or move it away to start from defaults:\n"
        f"  mv {path} {path}.bak",
        code=ErrorCode.CONFIG_MALFORMED,
    )


def _read_text(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise _malformed(str(path), "it is a folder, not a file", path) from None
    except NotADirectoryError:
        raise  # STIGMER_HOME is a file: the CLI explains that
    except OSError as e:
        raise StigmerError(
            f"Cannot read {path}: {e.strerror}.",
            hint="Check the file's permissions.",
            code=ErrorCode.CONFIG_UNREADABLE,
        ) from e
    if len(data) > MAX_BYTES:
        raise _malformed(
            str(path), f"it is larger than {MAX_BYTES // 1024} KB, far more than settings need", path
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise _malformed(f"{path}:{line}:{col}", "it is not UTF-8 text", path) from None


def _refuse_aliases(text: str, path: Path, yaml: Any) -> None:
    if "*" not in text and "&" not in text:
        return  # no anchor or alias can be there: skip the event scan
    from ruamel.yaml.events import AliasEvent

    for event in yaml.parse(text):
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise _malformed(
                f"{path}:{mark.line + 1}:{mark.column + 1}",
                "YAML anchors and aliases (& and *) are not allowed in config.yaml",
                path,
            )


def _read_document(path: Path) -> Any:
    """The parsed round-trip document, or None when the file does not exist."""
    text = _read_text(path)
    if text is None:
        return None
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    yaml = _yaml()
    try:
        _refuse_aliases(text, path, yaml)
        doc = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise _malformed(where, str(e.problem or e.context), path) from None
    except (YAMLError, RecursionError, ValueError) as e:
        raise _malformed(str(path), str(e) or type(e).__name__, path) from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise StigmerError(
            f"Malformed config file {path}: the top level must be a mapping of keys.",
            hint="See `stigmer config list` for the expected keys.",
            code=ErrorCode.CONFIG_MALFORMED,
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
                code=ErrorCode.CONFIG_MALFORMED,
            )
        if part not in node:
            return False, None
        node = node[part]
    return node is not None, node


def _line_of(doc: Any, key: Key) -> str:
    """', line N' for a key in a round-trip document, when ruamel knows it."""
    node = doc
    try:
        for part in key.path[:-1]:
            node = node[part]
        line, _col = node.lc.key(key.path[-1])
        return f", line {line + 1}"
    except Exception:  # position is a nicety; never fail over it
        return ""


def _shown(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def load(paths: Paths, environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    doc = _read_document(paths.config_file)
    values: dict[str, Value] = {}
    sources: dict[str, Source] = {}
    for key in KEYS:
        values[key.name], sources[key.name] = key.default, "default"
        if doc is not None:
            present, raw = _dig(doc, key, paths.config_file)
            if present:
                try:
                    values[key.name] = key.parse(raw)
                except ValueError as e:
                    raise StigmerError(
                        f"Invalid value for {key.name} in {paths.config_file}{_line_of(doc, key)}: "
                        f"{_shown(raw)} {e}.",
                        hint=f"Fix it with: stigmer config set {key.name} <value>  ({key.valid})",
                        code=ErrorCode.CONFIG_INVALID,
                    ) from None
                sources[key.name] = "file"
        env_name = next((n for n in (key.env, *key.aliases) if env.get(n)), key.env)
        env_raw = env.get(env_name)
        if env_raw is not None and env_raw != "":
            try:
                values[key.name] = key.parse(env_raw)
            except ValueError as e:
                shown = "(hidden)" if key.secret else _shown(env_raw)
                raise StigmerError(
                    f"Invalid value in environment variable {env_name}={shown}: {e}.",
                    hint=f"Fix or unset {env_name}  ({key.valid})",
                    code=ErrorCode.CONFIG_INVALID,
                ) from None
            sources[key.name] = "env"
    if env.get("TEMPORAL_SERVICE_ADDRESS") and not env.get("STIGMER_TEMPORAL_MANAGED"):
        # Temporal's own variable names an external cluster: a team moving to one sets just that.
        values["temporal.managed"], sources["temporal.managed"] = False, "env"
    settings = _build(values, sources, paths, doc is not None)
    _check(settings, sources)
    notice = _private(paths.config_file, settings) if doc is not None else None
    return dataclasses.replace(settings, notices=(notice,)) if notice else settings


def _effective(settings: Settings) -> dict[str, Value]:
    return {k.name: settings.value(k.name) for k in KEYS}


def _check(settings: Settings, sources: Mapping[str, Source]) -> None:
    broken = check(_effective(settings))
    if broken is None:
        return
    name, why = broken
    key = BY_NAME[name]
    where = {"env": f"environment variable {key.env}", "file": str(settings.file)}.get(
        sources[name], "default"
    )
    raise StigmerError(
        f"Invalid value for {name} ({where}): {settings.value(name)} {why}.",
        hint=f"Fix it with: stigmer config set {name} <value>"
        + (f", or unset {key.env}" if sources[name] == "env" else ""),
        code=ErrorCode.CONFIG_INVALID,
    )


def _private(path: Path, settings: Settings) -> str | None:
    """A config.yaml holding a secret must be readable by its owner only: fix it, and say so."""
    holds_secret = any(
        k.secret and settings.source(k.name) == "file" and settings.value(k.name) for k in KEYS
    )
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if not holds_secret or mode & 0o077 == 0 or os.name == "nt":
            return None
        path.chmod(PRIVATE_FILE)
    except OSError:
        return f"{path} holds a secret and is readable by other users: run  chmod 600 {path}"
    return f"{path} holds a secret and was readable by other users: its mode is now 600."


# -- writing ---------------------------------------------------------------------------------------------
def _default_document() -> Any:
    y = _yaml()
    doc = y.load(HEADER + "{}\n")
    for key in KEYS:
        if key.name in FOLLOW_PROVIDER:
            continue  # left out so that they follow the provider until the user sets them
        _set_in(doc, key.path, key.default)
    return doc


def _yaml_value(value: Value) -> Any:
    return ",".join(value) if isinstance(value, tuple) else value


def _set_in(doc: Any, path: tuple[str, ...], value: Value) -> None:
    from ruamel.yaml.comments import CommentedMap

    node = doc
    for part in path[:-1]:
        if part not in node or node[part] is None:
            node[part] = CommentedMap()
        node = node[part]
    node[path[-1]] = _yaml_value(value)


def _write(path: Path, doc: Any) -> None:
    buf = io.StringIO()
    _yaml().dump(doc, buf)
    atomic_write(path, buf.getvalue().encode("utf-8"), mode=PRIVATE_FILE)


def ensure_file(paths: Paths) -> bool:
    """Create config.yaml with the defaults on first run. True when it was created now."""
    if paths.config_file.exists():
        return False
    paths.ensure_home()
    _write(paths.config_file, _default_document())
    return True


def set_value(paths: Paths, name: str, raw: str, environ: Mapping[str, str] | None = None) -> Value:
    """Validate and write one setting; the file must stay loadable (all rules across keys hold)."""
    key = require_key(name)
    try:
        value = key.parse(raw)
    except ValueError as e:
        raise StigmerError(
            f"Invalid value for {name}: {_shown(raw)} {e}.",
            hint=f"{name}: {key.doc}\nValid: {key.valid}",
            code=ErrorCode.CONFIG_INVALID,
        ) from None
    doc = _read_document(paths.config_file)
    if doc is None:
        doc = _default_document()
    current = load(paths, {}) if paths.config_file.exists() else defaults(paths)  # refuse a bad file
    values = {k.name: (current.value(k.name) if current.source(k.name) == "file" else "") for k in KEYS}
    values = {k: (v if v != "" else BY_NAME[k].default) for k, v in values.items()}
    values[name] = value
    trial = _build(dict(values), {k.name: "file" for k in KEYS}, paths, True)
    broken = check(_effective(trial))
    if broken is not None:
        bad, why = broken
        raise StigmerError(
            f"Cannot set {name} to {'(hidden)' if key.secret else _shown(raw)}: {bad} = "
            f"{'(hidden)' if BY_NAME[bad].secret else trial.value(bad)} {why}.",
            hint=f"Change {bad} first (stigmer config set {bad} <value>), or choose another value.",
            code=ErrorCode.CONFIG_INVALID,
        )
    _set_in(doc, key.path, value)
    paths.ensure_home()
    _write(paths.config_file, doc)
    return value


def require_key(name: str) -> Key:
    key = BY_NAME.get(name)
    if key is None:
        raise StigmerError(
            f"Unknown config key {_shown(name)}.",
            hint="Valid keys:\n" + "\n".join(f"  {k.name}" for k in KEYS),
            code=ErrorCode.CONFIG_UNKNOWN_KEY,
        )
    return key


def display(key: Key, value: Value) -> str:
    """A value as `config get|list` print it (secrets masked)."""
    if key.secret and value:
        return "********"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def plain(key: Key, value: Value) -> Any:
    """A value as `config list --json` gives it: typed (numbers, booleans, lists), secrets masked."""
    if key.secret and value:
        return "********"
    return list(value) if isinstance(value, tuple) else value

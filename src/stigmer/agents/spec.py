"""What an agent is, as users write it in YAML, checked field by field.

    name: poet                      # required: letters, digits, - and _
    instructions: You write short poems.
    model: qwen2.5-coder:7b         # optional: the configured llm.model when absent
    temperature: 0.7                # optional, 0-2
    max_tokens: 512                 # optional, 1-1000000 (default: runner/llm.py default_max_tokens)
    output_schema:                  # optional: a JSON Schema of an object; the answer must match it
      type: object
      properties: {title: {type: string}}
    limits: {tool_calls: 40}        # optional: model_calls, tool_calls, tokens, seconds (agents/limits.py)

A bad file is refused with the field and its line; nothing is stored.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from stigmer.errors import ErrorCode, StigmerError
from stigmer.nesting import MAX_DEPTH, deeper_than

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
MAX_INSTRUCTIONS = 100_000
MAX_FILE = 1024 * 1024
DEFAULT_AGENT = "default"
FIELDS = ("name", "instructions", "model", "temperature", "max_tokens", "tools", "mcp_servers", "workspace",
          "output_schema", "limits")  # fmt: skip
MAX_SCHEMA = 64 * 1024  # an output schema's size as JSON (bytes): it is sent with every model request
MAX_SCHEMA_DEPTH = 20


@dataclass(frozen=True)
class AgentSpec:
    name: str
    instructions: str = ""
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    # What the agent may do (tools, MCP servers, its workspace): parsed by stigmer.agents.tools.
    tools: list[Any] = field(default_factory=list)
    mcp_servers: list[Any] = field(default_factory=list)
    workspace: str | None = None
    # A JSON Schema (type: object) the answer must match: the record's output is then that object.
    output_schema: dict[str, Any] | None = None
    limits: dict[str, int] | None = None  # what one execution may use; unset ones keep the defaults

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v for k, v in asdict(self).items() if v not in (None, [], "") or k in ("name", "instructions")
        }


BUILTIN = AgentSpec(
    name=DEFAULT_AGENT,
    instructions="You are a helpful assistant. Answer clearly and concisely.",
)


def invalid(message: str, hint: str = "") -> StigmerError:
    return StigmerError(
        message,
        hint=hint or "An agent file needs at least `name:`; see `stigmer agent --help` for the fields.",
        code=ErrorCode.INVALID_INPUT,
    )


def parse_yaml(text: str, source: str = "agent file") -> AgentSpec:
    """An AgentSpec from YAML text, or an error naming the field and line."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if len(text) > MAX_FILE:
        raise invalid(f"{source} is larger than {MAX_FILE // 1024} KB.")
    if "&" in text and "*" in text:
        _refuse_aliases(text, source)
    try:
        doc: Any = YAML(typ="rt").load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise invalid(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}).") from None
    except RecursionError:  # ruamel's composer recurses once per level
        raise invalid(f"{source}: nested more than {MAX_DEPTH} levels deep.") from None
    if deeper_than(doc):  # what follows (checks, copies, JSON) recurses too
        raise invalid(f"{source}: nested more than {MAX_DEPTH} levels deep.")
    if not isinstance(doc, dict):
        raise invalid(f"{source}: an agent file is a mapping of fields (name:, instructions:, ...).")

    positions: Any = doc  # ruamel's CommentedMap knows where each key was

    def line(key: str) -> str:
        try:
            return f"{source}:{positions.lc.key(key)[0] + 1}"
        except Exception:  # positions are a nicety
            return source

    return from_dict(dict(doc), where=line)


def _refuse_aliases(text: str, source: str) -> None:
    from ruamel.yaml import YAML
    from ruamel.yaml.events import AliasEvent

    for event in YAML(typ="rt").parse(text):
        if isinstance(event, AliasEvent):
            raise invalid(f"{source}:{event.start_mark.line + 1}: YAML aliases (*) are not allowed.")


def from_dict(raw: dict[str, Any], where: Any = None) -> AgentSpec:
    """An AgentSpec from plain data (an API body, a stored row); `where(field)` names a field's place."""

    def at(key: str) -> str:
        return where(key) if where is not None else "agent"

    unknown = [k for k in raw if k not in FIELDS]
    if unknown:
        raise invalid(
            f"{at(unknown[0])}: unknown field {unknown[0]!r}.", f"Known fields: {', '.join(FIELDS)}."
        )
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise invalid(
            f"{at('name')}: field 'name' must be 1-63 letters, digits, - or _ (starting with a letter or digit), "
            f"not {_shown(name)}."
        )
    instructions = raw.get("instructions", "")
    if instructions is None:
        instructions = ""
    if not isinstance(instructions, str) or len(instructions) > MAX_INSTRUCTIONS:
        raise invalid(
            f"{at('instructions')}: field 'instructions' must be text of at most {MAX_INSTRUCTIONS} characters."
        )
    model = raw.get("model")
    if model is not None:
        from stigmer.llm.names import parse_model_name

        if not isinstance(model, str):
            raise invalid(f"{at('model')}: field 'model' must be a model name like qwen2.5-coder:7b.")
        try:
            parse_model_name(model)
        except StigmerError as e:
            raise invalid(f"{at('model')}: field 'model': {e.message}") from None
    temperature = raw.get("temperature")
    if temperature is not None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            raise invalid(
                f"{at('temperature')}: field 'temperature' must be a number from 0 to 2, not {_shown(temperature)}."
            )
        temperature = float(temperature)
    max_tokens = raw.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or not 1 <= max_tokens <= 1_000_000):
        raise invalid(
            f"{at('max_tokens')}: field 'max_tokens' must be a whole number from 1 to 1000000, not {_shown(max_tokens)}."
        )
    tools = raw.get("tools") or []
    servers = raw.get("mcp_servers") or []
    if not isinstance(tools, list):
        raise invalid(f"{at('tools')}: field 'tools' must be a list.")
    if not isinstance(servers, list):
        raise invalid(f"{at('mcp_servers')}: field 'mcp_servers' must be a list.")
    workspace = raw.get("workspace")
    if workspace is not None and not isinstance(workspace, str):
        raise invalid(f"{at('workspace')}: field 'workspace' must be a folder path.")
    output_schema = raw.get("output_schema")
    if output_schema is not None:
        output_schema = check_output_schema(_plain(output_schema), at("output_schema"))
    limits = raw.get("limits")
    if limits is not None:
        from stigmer.agents import limits as limits_

        limits = limits_.check(_plain(limits), at("limits")) or None
    spec = AgentSpec(
        name=name,
        instructions=instructions,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
        tools=_plain(tools),
        mcp_servers=_plain(servers),
        workspace=workspace,
        output_schema=output_schema,
        limits=limits,
    )
    from stigmer.agents.tools import check_tools

    check_tools(spec, at)
    return spec


def check_output_schema(schema: Any, where: str) -> dict[str, Any]:
    """A JSON Schema of an object, bounded in size and depth, that the agent library can check answers
    against; else an error naming what is wrong."""
    import json

    hint = (
        "output_schema is a JSON Schema of an object, e.g. {type: object, properties: {title: {type: string}}, "
        "required: [title]}."
    )
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise invalid(f"{where}: field 'output_schema' must be a JSON Schema with `type: object`.", hint)
    if deeper_than(schema, MAX_SCHEMA_DEPTH):
        raise invalid(f"{where}: field 'output_schema' nests more than {MAX_SCHEMA_DEPTH} levels deep.", hint)
    try:
        size = len(json.dumps(schema, ensure_ascii=False).encode())
    except (TypeError, ValueError):
        raise invalid(f"{where}: field 'output_schema' holds values JSON cannot carry.", hint) from None
    if size > MAX_SCHEMA:
        raise invalid(f"{where}: field 'output_schema' is larger than {MAX_SCHEMA // 1024} KB as JSON.", hint)
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        path = "/".join(str(p) for p in e.path) or "(top)"
        raise invalid(
            f"{where}: field 'output_schema' is not a valid JSON Schema at {path}: {e.message}", hint
        ) from None
    from pydantic_ai.exceptions import UserError

    try:
        output_type(schema)
    except UserError as e:  # recursive $refs, patterns with lookarounds: the agent library cannot use them
        raise invalid(f"{where}: field 'output_schema' cannot be used: {e}", hint) from None
    return schema


def output_type(schema: dict[str, Any]) -> Any:
    """The agent library's output type for a schema: answers are checked against it (a mismatch is sent
    back to the model to fix, within the output retries); the model answers by calling `final_result`."""
    import copy

    from pydantic_ai import StructuredDict

    return StructuredDict(copy.deepcopy(schema), validate=True)


def _plain(value: Any) -> Any:
    """ruamel's commented containers as plain lists and dicts (JSON-ready)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

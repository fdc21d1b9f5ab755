"""The agent file's `output_schema:` and the default bound on a model call's length (issue 18)."""

from __future__ import annotations

import pytest

from stigmer.agents.spec import from_dict, parse_yaml
from stigmer.errors import StigmerError
from stigmer.runner.llm import DEFAULT_MAX_TOKENS, default_max_tokens

GOOD = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}


def test_default_max_tokens_is_bounded_by_the_context_window() -> None:
    assert default_max_tokens(0) == DEFAULT_MAX_TOKENS == 4096
    assert default_max_tokens(128_000) == 4096
    assert default_max_tokens(4096) == 2048  # half the window: the prompt keeps the other half
    assert default_max_tokens(300) == 256


def test_output_schema_is_kept_and_round_trips() -> None:
    spec = parse_yaml(
        "name: x\noutput_schema:\n  type: object\n  properties:\n    title: {type: string}\n"
        "  required: [title]\n"
    )
    assert spec.output_schema == GOOD
    assert from_dict(spec.to_dict()).output_schema == GOOD
    assert "output_schema" not in from_dict({"name": "y"}).to_dict()


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ("not a schema", "type: object"),
        ({"type": "string"}, "type: object"),
        (
            {"type": "object", "properties": {"a": {"type": 12}}},
            "not a valid JSON Schema at properties/a/type",
        ),
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}}, "cannot be used"),
        ({"type": "object", "description": "x" * 70_000}, "larger than 64 KB"),
    ],
)
def test_bad_output_schemas_are_refused_with_the_reason(schema: object, says: str) -> None:
    with pytest.raises(StigmerError) as e:
        from_dict({"name": "x", "output_schema": schema})
    assert says in e.value.message


def test_a_deep_output_schema_is_refused() -> None:
    deep: dict[str, object] = {"type": "object"}
    node = deep
    for _ in range(30):
        child: dict[str, object] = {"type": "object"}
        node["properties"] = {"a": child}
        node = child
    with pytest.raises(StigmerError) as e:
        from_dict({"name": "x", "output_schema": deep})
    assert "nests more than 20 levels" in e.value.message


def test_limits_in_the_agent_file_and_on_the_command_line() -> None:
    from stigmer.agents.limits import LIMITS, effective, parse_flags

    spec = parse_yaml("name: x\nlimits: {tool_calls: 3, seconds: 60}\n")
    assert spec.limits == {"tool_calls": 3, "seconds": 60}
    assert from_dict(spec.to_dict()).limits == spec.limits
    assert parse_flags(["tool_calls=10", "tokens=5000"]) == {"tool_calls": 10, "tokens": 5000}
    # the run's limit wins over the agent's; unset ones keep the (finite) defaults
    assert effective(spec.limits, {"tool_calls": 10}) == {
        "model_calls": LIMITS["model_calls"][0],
        "tool_calls": 10,
        "tokens": LIMITS["tokens"][0],
        "seconds": 60,
    }
    assert all(0 < default < most for default, most in LIMITS.values())


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        ("lots", "must be a mapping"),
        ({"naps": 1}, "unknown limit 'naps'"),
        ({"tool_calls": 0}, "tool_calls must be a whole number from 1 to 10000"),
        ({"tool_calls": True}, "whole number"),
        ({"tokens": 2.5}, "whole number"),
        ({"seconds": 10**9}, "seconds must be a whole number from 1 to 604800"),
    ],
)
def test_bad_limits_are_refused(limits: object, says: str) -> None:
    with pytest.raises(StigmerError) as e:
        from_dict({"name": "x", "limits": limits})
    assert says in e.value.message


@pytest.mark.parametrize("flag", ["tool_calls", "tool_calls=", "tool_calls=-1", "=3", "tool_calls=ten"])
def test_bad_limit_flags_are_refused(flag: str) -> None:
    from stigmer.agents.limits import parse_flags

    with pytest.raises(StigmerError):
        parse_flags([flag])

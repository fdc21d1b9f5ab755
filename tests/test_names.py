from __future__ import annotations

import pytest

from stigmer.errors import ErrorCode, StigmerError
from stigmer.llm.names import parse_model_name, same_model


@pytest.mark.parametrize(
    "a,b",
    [
        ("qwen2.5-coder:7b", "registry.ollama.ai/library/qwen2.5-coder:7b"),
        ("qwen2.5-coder:7b", "library/qwen2.5-coder:7b"),
        ("Qwen2.5-Coder:7B", "qwen2.5-coder:7b"),
        ("llama3.2", "llama3.2:latest"),
    ],
)
def test_same_model_like_ollama(a: str, b: str) -> None:
    assert same_model(a, b)


def test_different_models() -> None:
    assert not same_model("qwen2.5-coder:7b", "qwen2.5-coder:1.5b")
    assert not same_model("qwen2.5-coder", "qwen2.5-coder-x")  # no substring matching
    assert not same_model("myns/llama3.2", "llama3.2")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " ",
        "a b",
        "-model",
        "model:",
        "model:-tag",
        "ns.dot/model",
        "a/b/c/d",
        "x" * 81,
        "mo$del",
        "../etc",
    ],
)
def test_invalid_names_refused(bad: str) -> None:
    with pytest.raises(StigmerError) as e:
        parse_model_name(bad)
    assert e.value.code is ErrorCode.INVALID_MODEL_NAME and e.value.exit_code == 2


def test_host_with_port_and_hf() -> None:
    n = parse_model_name("localhost:5000/ns/model:tag")
    assert (n.host, n.namespace, n.model, n.tag) == ("localhost:5000", "ns", "model", "tag")
    hf = parse_model_name("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")
    assert hf.is_huggingface and hf.tag == "Q4_K_M" and hf.short.startswith("hf.co/")

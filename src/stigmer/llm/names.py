"""Model names, parsed and compared the way Ollama does.

`[host/][namespace/]model[:tag]`, defaults registry.ollama.ai / library / latest, compared without case.
Hugging Face GGUF repos are `hf.co/ORG/REPO[:QUANT]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stigmer.errors import ErrorCode, StigmerError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
HF_HOSTS = ("hf.co", "huggingface.co")

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
# Hugging Face org and repo names may hold dots and dashes; the tag is a quantisation like Q4_K_M.
_HF_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}")


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def is_huggingface(self) -> bool:
        return self.host.lower() in HF_HOSTS

    @property
    def key(self) -> str:
        """Canonical lower-case form used to compare two names."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".lower()

    @property
    def short(self) -> str:
        """The name as users write it: host and namespace only when not the defaults."""
        if self.is_huggingface:
            return f"hf.co/{self.namespace}/{self.model}" + (
                "" if self.tag == DEFAULT_TAG else f":{self.tag}"
            )
        prefix = ""
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"

    def __str__(self) -> str:
        return self.short


# host (350) / namespace (80) / model (80) : tag (80), as Ollama bounds each part.
MAX_NAME = 350 + 1 + 80 + 1 + 80 + 1 + 80


def shown(raw: str, limit: int = 60) -> str:
    """A name as quoted in messages: never more than `limit` characters of it."""
    text = repr(raw)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _invalid(raw: str, why: str) -> StigmerError:
    return StigmerError(
        f"Invalid model name {shown(raw)}: {why}.",
        hint="Model names look like qwen2.5-coder:7b, namespace/model:tag or hf.co/ORG/REPO:QUANT.",
        code=ErrorCode.INVALID_MODEL_NAME,
    )


def parse_model_name(raw: str) -> ModelName:
    name = raw.strip()
    if not name:
        raise _invalid(raw, "it is empty")
    if len(name) > MAX_NAME:
        raise _invalid(raw, f"it is too long ({len(name)} characters; at most {MAX_NAME})")
    if any(c.isspace() for c in name):
        raise _invalid(raw, "it contains spaces")
    tag = DEFAULT_TAG
    # The tag is after the last ':' that follows the last '/' (a host may carry a port).
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    parts = name.split("/")
    if len(parts) > 3 or any(not p for p in parts):
        raise _invalid(raw, "expected [host/][namespace/]model[:tag]")
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        (model,) = parts
    if host.lower() in HF_HOSTS:
        for label, value in (("organisation", namespace), ("repository", model), ("quantisation", tag)):
            if not _HF_PART.fullmatch(value):
                raise _invalid(raw, f"bad Hugging Face {label} {shown(value)}")
        return ModelName(host, namespace, model, tag)
    if not _HOST.fullmatch(host):
        raise _invalid(raw, f"bad registry host {shown(host)}")
    if not _NAMESPACE.fullmatch(namespace):
        raise _invalid(raw, f"bad namespace {shown(namespace)}")
    if not _PART.fullmatch(model):
        raise _invalid(raw, f"bad model {shown(model)}")
    if not _PART.fullmatch(tag):
        raise _invalid(raw, f"bad tag {shown(tag)}")
    return ModelName(host, namespace, model, tag)


def same_model(a: str, b: str) -> bool:
    try:
        return parse_model_name(a).key == parse_model_name(b).key
    except StigmerError:
        return False

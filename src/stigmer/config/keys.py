"""The settings a user can see and change: one table, used by load, `config get|set|list`, the env
overrides and the README check. A key's short name (`llm.model`) maps to its place in the file
(`backend.local.llm.model`), its environment variable and its validator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

Value = str | int | bool


def _url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return raw.rstrip("/")


def _version(raw: str) -> str:
    v = raw.strip().removeprefix("v")
    if v == "latest":
        return v
    nums = v.split(".")
    if len(nums) != 3 or not all(n.isdigit() for n in nums):
        raise ValueError("must be 'latest' or a release version like 0.33.0")
    return v


def _model(raw: str) -> str:
    from stigmer.llm.names import parse_model_name  # local: names is light, but keeps keys import-free

    parse_model_name(raw)
    return raw.strip()


def _positive_int(raw: str | int) -> int:
    try:
        n = int(raw)
    except (TypeError, ValueError):
        raise ValueError("must be a whole number") from None
    if n < 0:
        raise ValueError("must be 0 (automatic) or a positive number")
    return n


def _bool(raw: str | bool) -> bool:
    if isinstance(raw, bool):
        return raw
    low = str(raw).strip().lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise ValueError("must be true or false")


def _str(raw: str) -> str:
    return str(raw)


@dataclass(frozen=True)
class Key:
    name: str  # short form used on the command line
    path: tuple[str, ...]  # where it lives in config.yaml
    default: Value
    doc: str
    parse: Callable[[str], Value] = _str
    choices: tuple[str, ...] = ()
    secret: bool = False

    @property
    def env(self) -> str:
        return "STIGMER_" + self.name.upper().replace(".", "_")

    def validate(self, raw: str | Value) -> Value:
        if self.choices:
            value = str(raw).strip().lower()
            if value not in self.choices:
                raise ValueError(f"must be one of: {', '.join(self.choices)}")
            return value
        return self.parse(raw)  # type: ignore[arg-type]  # parsers accept str and their own type


PROVIDERS = ("ollama", "llamacpp")
LLM = ("backend", "local", "llm")

KEYS: tuple[Key, ...] = (
    Key(
        "backend.type",
        ("backend", "type"),
        "local",
        "Where agents run: local (this machine) or cloud.",
        choices=("local", "cloud"),
    ),
    Key(
        "llm.provider",
        (*LLM, "provider"),
        "ollama",
        "Local LLM engine: ollama (downloaded runtime) or llamacpp (built-in engine, works offline).",
        choices=PROVIDERS,
    ),
    Key(
        "llm.model",
        (*LLM, "model"),
        "",
        "Model to serve. Empty means the provider's default (ollama: qwen2.5-coder:7b, "
        "llamacpp: smollm2:135m).",
        parse=_model,
    ),
    Key(
        "llm.base_url",
        (*LLM, "base_url"),
        "",
        "Where the local LLM listens. Empty means the provider's default (ollama: "
        "http://127.0.0.1:11434, llamacpp: http://127.0.0.1:11435).",
        parse=_url,
    ),
    Key("llm.api_key", (*LLM, "api_key"), "", "API key for a remote provider (never printed).", secret=True),
    Key(
        "llm.download_url",
        (*LLM, "download_url"),
        "https://github.com/ollama/ollama/releases",
        "Where the Local LLM runtime is downloaded from; a mirror must use GitHub's release layout.",
        parse=_url,
    ),
    Key(
        "llm.runtime_version",
        (*LLM, "runtime_version"),
        "latest",
        "Local LLM runtime version to install: latest, or a pinned version like 0.33.0.",
        parse=_version,
    ),
    Key(
        "llm.registry_url",
        (*LLM, "registry_url"),
        "https://registry.ollama.ai",
        "Model registry the built-in engine pulls from (a mirror works the same).",
        parse=_url,
    ),
    Key(
        "llm.context_size",
        (*LLM, "context_size"),
        0,
        "Built-in engine context window in tokens; 0 picks one for this machine.",
        parse=_positive_int,
    ),
    Key(
        "llm.threads",
        (*LLM, "threads"),
        0,
        "Built-in engine CPU threads; 0 picks one per physical core.",
        parse=_positive_int,
    ),
    Key(
        "llm.offline_fallback",
        (*LLM, "offline_fallback"),
        True,
        "When the runtime cannot be downloaded (no network), serve the best local model with the "
        "built-in engine instead.",
        parse=_bool,
    ),
    Key(
        "llm.fallback_base_url",
        (*LLM, "fallback_base_url"),
        "http://127.0.0.1:11435",
        "Where the built-in engine listens when it stands in for the runtime (offline fallback).",
        parse=_url,
    ),
    Key(
        "temporal.managed",
        ("backend", "local", "temporal", "managed"),
        True,
        "Start and stop a local Temporal dev server with the Stigmer server.",
        parse=_bool,
    ),
    Key(
        "temporal.address",
        ("backend", "local", "temporal", "address"),
        "localhost:7233",
        "Temporal frontend address.",
    ),
    Key("cloud.endpoint", ("backend", "cloud", "endpoint"), "", "Stigmer Cloud endpoint."),
    Key(
        "cloud.token", ("backend", "cloud", "token"), "", "Stigmer Cloud token (never printed).", secret=True
    ),
)

BY_NAME = {k.name: k for k in KEYS}

PROVIDER_DEFAULTS: dict[str, dict[str, str]] = {
    "ollama": {"llm.model": "qwen2.5-coder:7b", "llm.base_url": "http://127.0.0.1:11434"},
    "llamacpp": {"llm.model": "smollm2:135m", "llm.base_url": "http://127.0.0.1:11435"},
}


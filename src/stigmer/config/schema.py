"""The settings model: sections of typed, bounded values. The key table (`config get|set|list`, the
environment variables, the README check) is derived from it, so a setting is declared exactly once.

Each field of a section carries its kind (what values are valid), its documentation and whether it is a
secret. A key's short name is `<section>.<field>` (`llm.model`); where it lives in config.yaml follows the
original CLI's layout (`backend.local.llm.model`); its environment variable is `STIGMER_LLM_MODEL`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, cast

from stigmer.config.kinds import (
    Address,
    AutoBoolean,
    Boolean,
    Choice,
    FilePath,
    HostName,
    Integer,
    Kind,
    Model,
    Patterns,
    Text,
    Url,
    Value,
    Version,
)

LOCAL_PROVIDERS = ("ollama", "llamacpp")
REMOTE_PROVIDERS = ("openai", "anthropic", "openai-compatible")
PROVIDERS = LOCAL_PROVIDERS + REMOTE_PROVIDERS

# Provider defaults for llm.model and llm.base_url, used while the user has not set them (so that a
# switch of provider brings its own port and model along).
PROVIDER_DEFAULTS: dict[str, dict[str, str]] = {
    "ollama": {"model": "qwen2.5-coder:7b", "base_url": "http://127.0.0.1:11434"},
    "llamacpp": {"model": "smollm2:135m", "base_url": "http://127.0.0.1:11435"},
    "openai": {"model": "gpt-4o-mini", "base_url": "https://api.openai.com/v1"},
    "anthropic": {"model": "claude-sonnet-4-5", "base_url": "https://api.anthropic.com"},
    "openai-compatible": {"model": "", "base_url": ""},  # both must be set by the user
}


def setting(
    default: Value, kind: Kind, doc: str, *, secret: bool = False, aliases: tuple[str, ...] = ()
) -> Any:
    """A section field with what the key table needs to know about it. `aliases` are environment
    variables other tools use for the same thing, read when STIGMER_<KEY> is not set."""
    return field(default=default, metadata={"kind": kind, "doc": doc, "secret": secret, "aliases": aliases})


@dataclass(frozen=True)
class BackendSettings:
    type: str = setting(
        "local", Choice(("local", "cloud")), "Where agents run: local (this machine) or cloud."
    )


@dataclass(frozen=True)
class LlmSettings:
    provider: str = setting(
        "ollama",
        Choice(PROVIDERS),
        "LLM provider: ollama (downloaded runtime) or llamacpp (built-in engine, works offline) run "
        "on this machine; openai, anthropic and openai-compatible (any endpoint the OpenAI client "
        "takes, ending in /v1) are remote.",
    )
    model: str = setting(
        "",
        Model(),
        "Model to use. Empty means the provider's default (ollama: the qwen2.5-coder chosen for this machine, "
        "llamacpp: smollm2:135m, openai: gpt-4o-mini, anthropic: claude-sonnet-4-5).",
    )
    base_url: str = setting(
        "",
        Url(path=True, empty=True),
        "Where the LLM listens. Empty means the provider's default (ollama: http://127.0.0.1:11434, "
        "llamacpp: http://127.0.0.1:11435). A local provider takes http://HOST:PORT with no path.",
    )
    api_key: str = setting(
        "", Text("an API key"), "API key for a remote provider (never printed).", secret=True
    )
    download_url: str = setting(
        "https://github.com/ollama/ollama/releases",
        Url(path=True),
        "Where the Local LLM runtime is downloaded from; a mirror must use GitHub's release layout.",
    )
    runtime_version: str = setting(
        "latest", Version(), "Local LLM runtime version to install: latest, or a pinned version like 0.33.0."
    )
    registry_url: str = setting(
        "https://registry.ollama.ai",
        Url(path=True),
        "Model registry the built-in engine pulls from (a mirror works the same).",
    )
    context_size: int = setting(
        0,
        Integer(512, 1_048_576, auto=True),
        "Built-in engine context window in tokens; 0 picks one for this machine.",
    )
    threads: int = setting(
        0, Integer(1, 256, auto=True), "Built-in engine CPU threads; 0 picks one per physical core."
    )
    offline_fallback: bool = setting(
        True,
        Boolean(),
        "When the runtime cannot be downloaded (no network), serve the best local model with the "
        "built-in engine instead.",
    )
    fallback_base_url: str = setting(
        "http://127.0.0.1:11435",
        Url(),
        "Where the built-in engine listens when it stands in for the runtime (offline fallback).",
    )
    origins: tuple[str, ...] = setting(
        (),
        Patterns(),
        "Web origins (besides this machine's) allowed to call the built-in engine from a browser, "
        "comma-separated; like OLLAMA_ORIGINS.",
    )
    update_check: bool = setting(
        True,
        Boolean(),
        "Once a week, `stigmer server` compares the model in use with the registry's (a 2-second look "
        "at its manifest, never blocking a start) and says when an update is available.",
    )

    @property
    def is_local(self) -> bool:
        return self.provider in LOCAL_PROVIDERS


@dataclass(frozen=True)
class TemporalSettings:
    managed: bool = setting(
        True,
        Boolean(),
        "Start and stop a local Temporal dev server with the Stigmer server; false uses an external "
        "Temporal at temporal.address (also when TEMPORAL_SERVICE_ADDRESS is set).",
    )
    address: str = setting(
        "localhost:7233",
        Address(),
        "Temporal frontend address (gRPC). The managed dev server listens on this port, on 127.0.0.1.",
        aliases=("TEMPORAL_SERVICE_ADDRESS",),
    )
    ui_port: int = setting(
        8233,
        Integer(1, 65535, auto=True, zero="off"),
        "Port of the managed Temporal's Web UI; 0 turns the Web UI off.",
    )
    namespace: str = setting("default", Text("a namespace name"), "Temporal namespace for executions.")
    # An external Temporal (a cluster, Temporal Cloud) is reached over TLS, often with a client
    # certificate (mTLS) or an API key; the API and every worker connect with the same settings.
    tls: str | bool = setting(
        "auto",
        AutoBoolean(),
        "Connect to the external Temporal over TLS: auto turns it on when any of temporal.tls_ca, "
        "tls_cert, tls_key, tls_server_name or api_key is set.",
    )
    tls_ca: str = setting(
        "",
        FilePath(),
        "PEM file of the CA(s) that signed the Temporal server's certificate; empty trusts the "
        "system's root CAs.",
    )
    tls_cert: str = setting(
        "", FilePath(), "PEM file of the client certificate for mTLS (with temporal.tls_key)."
    )
    tls_key: str = setting(
        "", FilePath(), "PEM file of the client certificate's private key for mTLS (with temporal.tls_cert)."
    )
    tls_server_name: str = setting(
        "",
        HostName(),
        "Name the server's certificate is checked against (and sent as SNI), when it differs from "
        "the host in temporal.address.",
    )
    api_key: str = setting(
        "",
        Text("an API key"),
        "Temporal Cloud API key (never printed); sent as a bearer token over TLS.",
        secret=True,
        aliases=("TEMPORAL_API_KEY",),
    )

    @property
    def tls_files(self) -> dict[str, str]:
        """The TLS settings that are set, by key name."""
        named = {
            "temporal.tls_ca": self.tls_ca,
            "temporal.tls_cert": self.tls_cert,
            "temporal.tls_key": self.tls_key,
            "temporal.tls_server_name": self.tls_server_name,
        }
        return {name: value for name, value in named.items() if value}

    @property
    def use_tls(self) -> bool:
        if self.tls == "auto":
            return bool(self.tls_files or self.api_key)
        return self.tls is True


@dataclass(frozen=True)
class ServerSettings:
    port: int = setting(7234, Integer(1, 65535), "Port of the Stigmer server's HTTP API (on 127.0.0.1).")
    origins: tuple[str, ...] = setting(
        (),
        Patterns(),
        "Web origins (besides this machine's) allowed to call the API and its OpenAI-compatible endpoint "
        "from a browser (CORS, never with cookies), comma-separated; like OLLAMA_ORIGINS.",
    )
    max_queue: int = setting(
        64,
        Integer(1, 10_000),
        "Requests to the local LLM that may wait their turn at the OpenAI-compatible endpoint; past it, "
        "429 with Retry-After.",
    )
    approval_wait: int = setting(
        60,
        Integer(1, 86_400),
        "Seconds a request to an agent at the OpenAI-compatible endpoint, without streaming, waits for a "
        "tool call's approval before answering 409 with the execution's id (the execution goes on).",
    )


@dataclass(frozen=True)
class ToolsSettings:
    require_sandbox: bool = setting(
        False,
        Boolean(),
        "Refuse to run tools (shell commands, MCP servers) where the operating system cannot confine them "
        "(no Landlock: Linux before 5.13, or landlock not in the lsm= boot list; Windows); false runs them "
        "with a warning (stigmer doctor shows the isolation this machine gives).",
    )


@dataclass(frozen=True)
class CloudSettings:
    endpoint: str = setting("", Url(path=True, empty=True), "Stigmer Cloud endpoint.")
    token: str = setting("", Text("a token"), "Stigmer Cloud token (never printed).", secret=True)


# Section name -> (its class, where it lives in config.yaml).
SECTIONS: dict[str, tuple[type, tuple[str, ...]]] = {
    "backend": (BackendSettings, ("backend",)),
    "llm": (LlmSettings, ("backend", "local", "llm")),
    "temporal": (TemporalSettings, ("backend", "local", "temporal")),
    "server": (ServerSettings, ("backend", "local", "server")),
    "tools": (ToolsSettings, ("backend", "local", "tools")),
    "cloud": (CloudSettings, ("backend", "cloud")),
}


@dataclass(frozen=True)
class Key:
    name: str  # short form used on the command line: llm.model
    section: str
    field: str
    path: tuple[str, ...]  # where it lives in config.yaml
    default: Value
    kind: Kind
    doc: str
    secret: bool
    env: str  # STIGMER_LLM_MODEL
    aliases: tuple[str, ...]  # other tools' variables for the same setting (TEMPORAL_SERVICE_ADDRESS)

    @property
    def valid(self) -> str:
        return self.kind.valid

    def parse(self, raw: object) -> Value:
        """The typed value, or ValueError saying what is valid."""
        return self.kind.parse(raw)


def _keys() -> tuple[Key, ...]:
    keys = []
    for section, (cls, path) in SECTIONS.items():
        for f in dataclasses.fields(cls):
            name = f"{section}.{f.name}"
            keys.append(
                Key(
                    name=name,
                    section=section,
                    field=f.name,
                    path=(*path, f.name),
                    default=cast(Value, f.default),
                    kind=f.metadata["kind"],
                    doc=f.metadata["doc"],
                    secret=f.metadata["secret"],
                    env="STIGMER_" + name.upper().replace(".", "_"),
                    aliases=f.metadata["aliases"],
                )
            )
    return tuple(keys)


KEYS: tuple[Key, ...] = _keys()
BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}

# Left out of a new config.yaml so that they follow llm.provider until the user sets them.
FOLLOW_PROVIDER = ("llm.model", "llm.base_url")


def check(values: dict[str, Value]) -> tuple[str, str] | None:
    """Rules across keys: (key, why) for the first one broken, else None. `values` are effective."""
    from stigmer.config.kinds import split_url

    if values["llm.provider"] in LOCAL_PROVIDERS:
        for name in ("llm.base_url", "llm.fallback_base_url"):
            url = split_url(str(values[name]))
            if url.scheme != "http":
                return name, (
                    f"must start with http:// for the local provider {values['llm.provider']} "
                    "(local servers do not speak https)"
                )
            if url.path.strip("/"):
                return name, f"must not have a path ({url.path}) for a local provider: use http://HOST:PORT"
        if values["llm.provider"] == "llamacpp" and not _loopback(str(values["llm.base_url"])):
            return (
                "llm.base_url",
                "must be a loopback address (the built-in engine only listens on this machine)",
            )
        if not _loopback(str(values["llm.fallback_base_url"])):
            return (
                "llm.fallback_base_url",
                "must be a loopback address (the built-in engine only listens locally)",
            )
        if values["llm.base_url"] == values["llm.fallback_base_url"] and values["llm.provider"] == "ollama":
            return "llm.fallback_base_url", "must differ from llm.base_url (the runtime comes back there)"
    broken = _check_temporal_tls(values)
    if broken is not None:
        return broken
    if values["temporal.managed"]:
        host, _, port = str(values["temporal.address"]).rpartition(":")
        from stigmer.net.addresses import is_loopback_host

        if not is_loopback_host(host):
            return "temporal.address", "must be a loopback address while temporal.managed is true"
        ports = {"temporal.address": int(port), "server.port": int(str(values["server.port"]))}
        if values["temporal.ui_port"]:
            ports["temporal.ui_port"] = int(str(values["temporal.ui_port"]))
        if values["llm.provider"] in LOCAL_PROVIDERS:
            ports["llm.base_url"] = split_url(str(values["llm.base_url"])).port or 80
        seen: dict[int, str] = {}
        for name, number in ports.items():
            if number in seen:
                return name, f"uses port {number}, which {seen[number]} uses too"
            seen[number] = name
    return None


def _check_temporal_tls(values: dict[str, Value]) -> tuple[str, str] | None:
    """TLS and the API key are for an external Temporal, and temporal.tls false means no TLS."""
    tls_set = [
        name
        for name in ("temporal.tls_ca", "temporal.tls_cert", "temporal.tls_key", "temporal.tls_server_name")
        if values[name]
    ]
    if values["temporal.managed"]:
        # The managed dev server listens in plaintext on 127.0.0.1. An API key is ignored there rather
        # than refused: TEMPORAL_API_KEY, exported for Temporal Cloud, must not break a local server.
        wanted = list(tls_set)
        if values["temporal.tls"] is True:
            wanted.insert(0, "temporal.tls")
        if wanted:
            return "temporal.managed", (
                f"must be false while {', '.join(wanted)} {'is' if len(wanted) == 1 else 'are'} set: "
                "TLS and API keys are for an external Temporal (a cluster or Temporal Cloud), and the "
                "managed dev server speaks plaintext on 127.0.0.1"
            )
    if values["temporal.tls"] is False and tls_set:
        return (
            "temporal.tls",
            f"contradicts {', '.join(tls_set)}: set temporal.tls to true or auto, or unset them",
        )
    # A client certificate without its key (or the reverse) is refused by client_options, not here:
    # `config set` takes one key at a time, so the first of the two would always be refused.
    return None


def _loopback(url: str) -> bool:
    from stigmer.config.kinds import split_url
    from stigmer.net.addresses import is_loopback_host

    return is_loopback_host(split_url(url).hostname or "")

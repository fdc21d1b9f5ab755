"""Which LLM an execution talks to, decided on the worker (each machine's own configuration: its local
LLM, or a remote endpoint), and the pydantic-ai model for it.

Nothing secret crosses Temporal: the workflow history holds the provider, model and endpoint; the API
key is looked up here, in the worker's own settings and environment, each time a model is built.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from stigmer.net.http import redact


class LlmTarget(BaseModel):
    provider: str  # ollama | llamacpp | openai | openai-compatible | anthropic
    model: str
    base_url: str  # what the client takes: .../v1 for the OpenAI API, the root for Anthropic
    kind: str  # openai | anthropic (which wire protocol)
    context: int = 0  # the model's context window in tokens, where this worker knows it (0: unknown)

    @property
    def shown(self) -> str:
        return redact(self.base_url)


def resolve(model: str | None) -> LlmTarget:
    """The configured LLM (or the offline fallback now serving), with `model` when the agent names one."""
    from stigmer.config import store
    from stigmer.llm import active
    from stigmer.paths import Paths

    paths = Paths.from_env()
    settings = store.load(paths)
    provider = active.provider(settings, paths)
    endpoint = provider.endpoint(model or provider.model)
    kind = "anthropic" if provider.name == "anthropic" else "openai"
    return LlmTarget(
        provider=provider.name,
        model=endpoint.model,
        base_url=endpoint.base_url,
        kind=kind,
        context=context_window(provider.name, endpoint.model, paths),
    )


# Remote models' context windows by name prefix (tokens), as their providers publish them.
KNOWN_CONTEXTS = (("gpt-4.1", 1_047_576), ("gpt-4o", 128_000), ("gpt-5", 400_000), ("o3", 200_000),
                  ("o4", 200_000), ("claude", 200_000))  # fmt: skip
OLLAMA_DEFAULT_CONTEXT = 4096  # Ollama's num_ctx unless OLLAMA_CONTEXT_LENGTH says otherwise


DEFAULT_MAX_TOKENS = 4096  # an answer's length when the agent file sets no max_tokens


def default_max_tokens(context: int) -> int:
    """The tokens a model call may generate when the agent sets no `max_tokens`: 4096, and at most half
    the context window when this worker knows it (the prompt keeps the other half). Without a bound, a
    small local model asked for something long can generate for minutes, holding the CPU."""
    return min(DEFAULT_MAX_TOKENS, max(context // 2, 256)) if context > 0 else DEFAULT_MAX_TOKENS


def context_window(provider: str, model: str, paths: Any) -> int:
    """What this worker knows of the model's context: the built-in engine's --ctx-size (from its service
    record), Ollama's default, a remote model's published window; 0 when unknown (a context overflow is
    then handled when the model reports it: runner/transcript.py)."""
    import os

    if provider == "llamacpp":
        from stigmer.services.manager import Services

        rec = Services(paths).record("llm")
        argv = rec.command if rec is not None else []  # without the sandbox launcher's part
        if "--ctx-size" in argv[:-1] and argv[argv.index("--ctx-size") + 1].isdigit():
            return int(argv[argv.index("--ctx-size") + 1])
        return 0
    if provider == "ollama":
        raw = os.environ.get("OLLAMA_CONTEXT_LENGTH", "")
        return int(raw) if raw.isdigit() else OLLAMA_DEFAULT_CONTEXT
    return next((size for prefix, size in KNOWN_CONTEXTS if model.startswith(prefix)), 0)


def api_key(target: LlmTarget) -> str:
    """The key for the target's provider, from this worker's settings (never from the workflow)."""
    import os

    from stigmer.config import store
    from stigmer.paths import Paths

    settings = store.load(Paths.from_env())
    if settings.llm.api_key:
        return settings.llm.api_key
    env = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(target.provider)
    return os.environ.get(env, "") if env else ""


_clients: dict[tuple[str, str, str], Any] = {}


def _client(kind: str, base_url: str, key: str) -> Any:
    """One SDK client per endpoint and key for the worker's life: building one costs an SSL context and
    a connection pool (~30 ms each here), and an activity per model request would build one each time.
    Retries are Temporal's: the clients make none of their own."""
    cached = _clients.get((kind, base_url, key))
    if cached is not None:
        return cached
    if kind == "anthropic":
        from anthropic import AsyncAnthropic

        client: Any = AsyncAnthropic(base_url=base_url, api_key=key or "none", max_retries=0)
    else:
        from openai import AsyncOpenAI

        # a local engine needs no key, but the OpenAI client insists on one
        client = AsyncOpenAI(base_url=base_url, api_key=key or "local", max_retries=0)
    _clients[(kind, base_url, key)] = client
    return client


def build(target: LlmTarget, *, key: str | None = None) -> Any:
    """A pydantic-ai model for the target, on the worker's shared client for that endpoint."""
    key = api_key(target) if key is None else key
    client = _client(target.kind, target.base_url, key)
    if target.kind == "anthropic":
        from pydantic_ai.models.anthropic import AnthropicModel
        from pydantic_ai.providers.anthropic import AnthropicProvider

        return AnthropicModel(target.model, provider=AnthropicProvider(anthropic_client=client))
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(target.model, provider=OpenAIProvider(openai_client=client))

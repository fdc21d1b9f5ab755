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
    return LlmTarget(provider=provider.name, model=endpoint.model, base_url=endpoint.base_url, kind=kind)


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


def build(target: LlmTarget, *, key: str | None = None) -> Any:
    """A pydantic-ai model for the target. Retries are Temporal's (the client makes none of its own)."""
    from pydantic_ai.settings import ModelSettings

    key = api_key(target) if key is None else key
    if target.kind == "anthropic":
        from pydantic_ai.models.anthropic import AnthropicModel
        from pydantic_ai.providers.anthropic import AnthropicProvider

        return AnthropicModel(
            target.model,
            provider=AnthropicProvider(base_url=target.base_url, api_key=key or "none"),
            settings=ModelSettings(max_retries=0),
        )
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(
        target.model,
        # a local engine needs no key, but the OpenAI client insists on one
        provider=OpenAIProvider(base_url=target.base_url, api_key=key or "local"),
        settings=ModelSettings(max_retries=0),
    )

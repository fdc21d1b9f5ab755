"""Offline fallback: when the Local LLM runtime cannot be downloaded because the network is unreachable,
serve the best model available locally with the built-in engine instead, and say so plainly.

A checksum failure is not a network failure and never falls back: that stays an error. The fallback
engine listens on llm.fallback_base_url, so the real runtime can come back on llm.base_url and replace it.
"""

from __future__ import annotations

from stigmer.config.store import Settings
from stigmer.llm.provider import Provider, get_provider
from stigmer.paths import Paths
from stigmer.units import human_bytes

ENGINE = "llamacpp"


def applies(settings: Settings) -> bool:
    return settings.llm.provider == "ollama" and settings.llm.offline_fallback


def plan(settings: Settings, paths: Paths, reason: str, configured_model: str) -> Provider | None:
    """The built-in engine serving the best local model, with the facts for the warning block in its
    `extra["fallback"]`; None when no model is here. `configured_model` is the model the runtime was
    to serve: llm.model, or, while it is not set, the one chosen for this machine (the provider's
    model, never the schema's placeholder default)."""
    from stigmer.llm.models.sources import best_local

    model = best_local(paths, configured_model)
    if model is None:
        return None
    info = {
        "reason": reason,
        "configured_provider": settings.llm.provider,
        "configured_model": configured_model,
        "model": model.name,
        "size": human_bytes(model.size),
        "base_url": settings.llm.fallback_base_url,
    }
    return get_provider(
        settings,
        paths,
        name=ENGINE,
        model=model.name,
        base_url=settings.llm.fallback_base_url,
        extra={"fallback": info},
    )

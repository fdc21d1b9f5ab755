"""Offline fallback: when the Local LLM runtime cannot be downloaded because the network is unreachable,
serve the best model available locally with the built-in engine instead, and say so plainly.

A checksum failure is not a network failure and never falls back: that stays an error.
"""

from __future__ import annotations

from typing import Any

from stigmer.config.store import Settings
from stigmer.paths import Paths
from stigmer.units import human_bytes


def applies(settings: Settings) -> bool:
    return settings.provider == "ollama" and bool(settings.get("llm.offline_fallback"))


def plan(settings: Settings, paths: Paths, reason: str) -> tuple[Settings, dict[str, Any]] | None:
    """The built-in engine's settings and the facts for the warning block; None when no model is here."""
    from stigmer.llm.llamacpp.sources import best_local

    model = best_local(paths, settings.model)
    if model is None:
        return None
    fb_settings = settings.with_values(
        {"llm.provider": "llamacpp", "llm.model": model.name, "llm.base_url": ""}
    )
    info = {
        "reason": reason,
        "configured_provider": settings.provider,
        "configured_model": settings.model,
        "model": model.name,
        "size": human_bytes(model.size),
        "base_url": fb_settings.base_url,
    }
    return fb_settings, info


def settings_from_record(settings: Settings, info: dict[str, Any]) -> Settings:
    """Settings that address a running fallback engine, from its pid record."""
    return settings.with_values(
        {
            "llm.provider": str(info.get("provider", "llamacpp")),
            "llm.model": str(info.get("model", "")),
            "llm.base_url": str(info.get("base_url", "")),
        }
    )

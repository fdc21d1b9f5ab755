"""Which provider the llm commands talk to: the configured one, or the offline fallback when that is
what this product is running now."""

from __future__ import annotations

from typing import Any

from stigmer.config.store import Settings
from stigmer.llm.provider import SERVICE, Provider, get_provider
from stigmer.llm.status import LlmStatus
from stigmer.paths import Paths


def _fallback_info(settings: Settings, paths: Paths) -> dict[str, Any] | None:
    from stigmer.services.manager import Services

    rec = Services(paths).record(SERVICE)
    if rec is None or not rec.info.get("fallback") or rec.info.get("provider") == settings.llm.provider:
        return None
    return rec.info


def provider(settings: Settings, paths: Paths) -> Provider:
    info = _fallback_info(settings, paths)
    if info is None:
        return get_provider(settings, paths)
    return get_provider(
        settings,
        paths,
        name=str(info.get("provider")),
        model=str(info.get("model", "")),
        base_url=str(info.get("base_url", "")),
        extra={"fallback": info.get("fallback")},
    )


def status(settings: Settings, paths: Paths) -> LlmStatus:
    p = provider(settings, paths)
    st = p.status()
    fb = p.extra.get("fallback")
    st.fallback = dict(fb) if isinstance(fb, dict) else None
    return st

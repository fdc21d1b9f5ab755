"""Which provider the llm commands talk to: the configured one, or the offline fallback when that is
what this product is running now."""

from __future__ import annotations

from stigmer.config.store import Settings
from stigmer.llm import fallback
from stigmer.llm.provider import LlmStatus, Provider, Reporter, get_provider, silent
from stigmer.paths import Paths
from stigmer.proc import record as records


def _fallback_info(settings: Settings, paths: Paths) -> dict[str, object] | None:
    rec = records.live_record(paths.llm_pid)
    if rec is None or not rec.info.get("fallback") or rec.info.get("provider") == settings.provider:
        return None
    return rec.info


def provider(settings: Settings, paths: Paths, report: Reporter = silent) -> Provider:
    info = _fallback_info(settings, paths)
    if info is not None:
        settings = fallback.settings_from_record(settings, info)
    return get_provider(settings, paths, report)


def status(settings: Settings, paths: Paths) -> LlmStatus:
    info = _fallback_info(settings, paths)
    if info is None:
        return get_provider(settings, paths).status()
    st = get_provider(fallback.settings_from_record(settings, info), paths).status()
    fb = info.get("fallback")
    st.fallback = dict(fb) if isinstance(fb, dict) else None
    return st

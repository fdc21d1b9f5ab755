"""Is there a newer version of the model in use? Checked at most once a week, and updated on request.

A model's version is the sha256 of its registry manifest. The built-in engine records it in the store's
entry at pull time; the Local LLM runtime shows it as the digest of /api/tags. The check fetches the
registry's manifest (the same registry, or mirror, the pulls use) and compares.

The check must never slow a start down: it runs only from `stigmer server` (the CLI, not the daemon),
in a thread given CHECK_TIMEOUT seconds in all (name resolution included), and any failure is ignored.
What it found is remembered in data/model-updates.json:

  {"version": 1, "models": {"<provider> <model key>": {"checked_at": epoch seconds, "failed_at": ...,
   "local": sha256 hex, "remote": sha256 hex, "update_available": bool}}}

A model is checked again CHECK_EVERY after the last successful check (its pull counts as one), after a
failure not before RETRY_AFTER. An update found stays offered, without asking the registry again, until
the local version changes.

`update_model` pulls the new version: for the built-in engine, only the layers whose digests changed are
fetched (llm.models.registry), and the store's entry is replaced in one atomic write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import Reporter
from stigmer.llm.names import parse_model_name, same_model
from stigmer.paths import Paths

log = logging.getLogger(__name__)

STATE = "model-updates.json"  # under data/
CHECK_EVERY = 7 * 24 * 3600.0
RETRY_AFTER = 24 * 3600.0
CHECK_TIMEOUT = 2.0


@dataclass(frozen=True)
class LocalVersion:
    digest: str  # sha256 hex of the manifest this machine has
    since: float  # when it was pulled (epoch seconds): as good as a check at that moment


@dataclass
class UpdateResult:
    model: str
    updated: bool
    message: str
    fetched: list[str] = field(default_factory=list)  # digests of the layers downloaded
    reused: list[str] = field(default_factory=list)  # digests of the layers kept from the old version


def notice(model: str) -> str:
    return f"An update of {model} is available: stigmer server llm update {model}"


# -- state -----------------------------------------------------------------------------------------------
def _state_path(paths: Paths) -> Any:
    return paths.data_dir / STATE


def _key(provider: str, model: str) -> str:
    return f"{provider} {parse_model_name(model).key}"


def load_state(paths: Paths) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(_state_path(paths).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    return {k: v for k, v in (models or {}).items() if isinstance(v, dict)}


def _save(paths: Paths, models: dict[str, dict[str, Any]]) -> None:
    from stigmer.fsutil import atomic_write

    try:
        paths.ensure(paths.data_dir)
        body = json.dumps({"version": 1, "models": models}, indent=2, sort_keys=True).encode()
        atomic_write(_state_path(paths), body)
    except OSError as e:
        log.info("could not write %s: %s", _state_path(paths), e)


def remember(paths: Paths, provider: str, model: str, **entry: Any) -> None:
    models = load_state(paths)
    key = _key(provider, model)
    models[key] = {**models.get(key, {}), **entry}
    _save(paths, models)


def offered(paths: Paths, provider: str, model: str) -> bool:
    """An update of `model` was found and not installed since (no network: for status and doctor)."""
    entry = load_state(paths).get(_key(provider, model), {})
    return bool(entry.get("update_available")) and entry.get("local") != entry.get("remote")


# -- versions --------------------------------------------------------------------------------------------
def _epoch(rfc3339: str) -> float:
    """Epoch seconds of an RFC 3339 time (Ollama writes nanoseconds and a local offset); 0 if unreadable."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", rfc3339.strip())
    if m is None:
        return 0.0
    zone = "+00:00" if m[3] in (None, "Z") else m[3]
    try:
        return datetime.fromisoformat(m[1] + (m[2] or "")[:7] + zone).timestamp()
    except ValueError:
        return 0.0


def local_version(provider: str, model: str, paths: Paths, base_url: str) -> LocalVersion | None:
    """The version of `model` here, when it came from a registry (else there is nothing to compare)."""
    name = parse_model_name(model)
    if name.is_huggingface:
        return None
    if provider == "llamacpp":
        from stigmer.llm.models.sources import store_for

        stored = store_for(paths).get(model)
        if stored is None or stored.source != "registry" or not stored.manifest_digest:
            return None
        return LocalVersion(stored.manifest_digest, _epoch(stored.modified))
    if provider == "ollama":
        from stigmer.net import http

        try:
            data = http.get_json(base_url + "/api/tags", timeout=CHECK_TIMEOUT)
        except (OSError, ValueError):
            return None
        for m in (data or {}).get("models") or []:
            if isinstance(m, dict) and same_model(str(m.get("name", "")), model) and m.get("digest"):
                return LocalVersion(
                    str(m["digest"]).removeprefix("sha256:"), _epoch(str(m.get("modified_at", "")))
                )
    return None


def registry_version(model: str, registry_url: str, *, timeout: float = CHECK_TIMEOUT) -> str:
    """sha256 of the registry's manifest of `model` now (StigmerError when it cannot be had)."""
    from stigmer.llm.models import registry

    name = parse_model_name(model)
    url = registry.manifest_url(name, registry_url)
    raw = registry.fetch_manifest_bytes(name, url, timeout=timeout, purpose="look for a newer version of")
    return hashlib.sha256(raw).hexdigest()


# -- the weekly check ------------------------------------------------------------------------------------
def check_on_start(
    settings: Settings,
    paths: Paths,
    *,
    provider: str,
    model: str,
    base_url: str,
    now: float | None = None,
    timeout: float = CHECK_TIMEOUT,
) -> str | None:
    """The notice to show when an update of `model` is available; None otherwise, and on any failure.
    Returns within about `timeout` seconds whatever the network does."""
    if not settings.llm.update_check or provider not in ("llamacpp", "ollama"):
        return None
    found: list[str | None] = [None]

    def run() -> None:
        try:
            found[0] = _check(settings, paths, provider, model, base_url, now or time.time(), timeout)
        except Exception as e:  # a check that fails is no reason to disturb a start
            log.info("update check of %s failed: %s", model, e)

    worker = threading.Thread(target=run, name="update-check", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)  # the thread may outlive this on a hung name lookup: it is a daemon
    return found[0]


def _check(
    settings: Settings, paths: Paths, provider: str, model: str, base_url: str, now: float, timeout: float
) -> str | None:
    here = local_version(provider, model, paths, base_url)
    if here is None:
        return None
    key = _key(provider, model)
    entry = load_state(paths).get(key, {})
    same = entry.get("local") == here.digest
    if same and entry.get("update_available") and entry.get("remote") != here.digest:
        return notice(model)
    last = max(float(entry.get("checked_at") or 0) if same else 0.0, here.since)
    if now - last < CHECK_EVERY or now - float(entry.get("failed_at") or 0) < RETRY_AFTER:
        return None
    try:
        remote = registry_version(model, settings.llm.registry_url, timeout=timeout)
    except StigmerError as e:
        log.info("update check of %s: %s", model, e.message)
        remember(paths, provider, model, failed_at=now)
        return None
    available = remote != here.digest
    remember(
        paths, provider, model, checked_at=now, failed_at=0, local=here.digest, remote=remote,
        update_available=available,
    )  # fmt: skip
    return notice(model) if available else None


# -- llm update ------------------------------------------------------------------------------------------
def update_model(
    settings: Settings,
    paths: Paths,
    *,
    provider: str,
    model: str,
    base_url: str,
    report: Reporter,
    force: bool = False,
) -> UpdateResult:
    """Fetch the registry's newer version of `model`, if there is one (only the changed layers)."""
    if provider == "llamacpp":
        return _update_engine_model(settings, paths, model, report, force=force)
    if provider == "ollama":
        return _update_runtime_model(settings, paths, model, base_url, report, force=force)
    raise StigmerError(
        f"The {provider} provider's models are managed by its service: there is nothing to update here.",
        hint="Local providers (ollama, llamacpp) update their models: stigmer config set llm.provider ollama",
        code=ErrorCode.UNSUPPORTED,
    )


def _fit(settings: Settings, paths: Paths, provider: str, model: str, force: bool) -> list[str]:
    from stigmer.llm.models.fit_check import before_download

    return before_download(
        model,
        provider=provider,
        settings=settings,
        paths=paths,
        force=force,
        force_command=f"stigmer server llm update {model} --force",
        look_locally=False,  # the version here is the old one: the check is of the registry's
    )


def _update_engine_model(
    settings: Settings, paths: Paths, model: str, report: Reporter, *, force: bool
) -> UpdateResult:
    from stigmer.llm.models.sources import store_for

    store = store_for(paths)
    before = store.get(model)
    if before is None:
        raise StigmerError(
            f"Model {model} is not downloaded, so there is nothing to update.",
            hint=f"Download it with: stigmer server llm pull {model}",
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    name = parse_model_name(model)
    if before.source == "hf":
        from stigmer.llm.models.huggingface import pull_from_hf

        notices = _fit(settings, paths, "llamacpp", model, force)
        after = pull_from_hf(name, store=store, report=report)
        changed = after.sha256 != before.sha256
        return UpdateResult(
            model,
            changed,
            " ".join(
                [*notices, f"Updated {model} from Hugging Face." if changed else f"{model} is up to date."]
            ),
            fetched=[after.sha256] if changed else [],
            reused=[] if changed else [before.sha256],
        )
    if before.source != "registry":
        raise StigmerError(
            f"Model {model} came from {before.origin or before.source}, not from a registry: it has no "
            "newer version to fetch.",
            hint="To replace an imported file, import the new one under the same name: "
            f"stigmer server llm import FILE --name {model}",
            code=ErrorCode.UNSUPPORTED,
        )
    remote = registry_version(model, settings.llm.registry_url, timeout=30.0)
    if remote == before.manifest_digest:
        remember(
            paths,
            "llamacpp",
            model,
            checked_at=time.time(),
            local=remote,
            remote=remote,
            update_available=False,
        )
        return UpdateResult(model, False, f"{model} is up to date.", reused=[before.sha256])
    notices = _fit(settings, paths, "llamacpp", model, force)
    from stigmer.llm.models.registry import pull_from_registry

    paths.ensure(paths.downloads_dir)
    after = pull_from_registry(
        name,
        registry_url=settings.llm.registry_url,
        store=store,
        downloads=paths.downloads_dir,
        report=report,
    )
    fetched = [] if after.sha256 == before.sha256 else [f"sha256:{after.sha256}"]
    reused = [f"sha256:{after.sha256}"] if after.sha256 == before.sha256 else []
    for media, digest in after.layers.items():
        (reused if before.layers.get(media) == digest else fetched).append(digest)
    now = time.time()
    remember(
        paths, "llamacpp", model, checked_at=now, local=after.manifest_digest, remote=after.manifest_digest,
        update_available=False,
    )  # fmt: skip
    message = f"Updated {model}: {len(fetched)} changed layer(s) fetched, {len(reused)} reused."
    return UpdateResult(model, True, " ".join([*notices, message]), fetched=fetched, reused=reused)


def _update_runtime_model(
    settings: Settings, paths: Paths, model: str, base_url: str, report: Reporter, *, force: bool
) -> UpdateResult:
    from stigmer.llm.ollama.provider import OllamaProvider

    runtime = OllamaProvider(settings, paths, model=model, base_url=base_url)
    before = local_version("ollama", model, paths, base_url)
    if before is None and not runtime.is_running():
        from stigmer.llm.provider import not_running_error

        raise not_running_error()
    if before is None:
        raise StigmerError(
            f"Model {model} is not downloaded, so there is nothing to update.",
            hint=f"Download it with: stigmer server llm pull {model}",
            code=ErrorCode.MODEL_NOT_FOUND,
        )
    notices = _fit(settings, paths, "ollama", model, force)
    runtime.pull(model, report)  # the runtime fetches only the layers it does not hold
    after = local_version("ollama", model, paths, base_url)
    digest = after.digest if after else before.digest
    remember(
        paths, "ollama", model, checked_at=time.time(), local=digest, remote=digest, update_available=False
    )
    changed = digest != before.digest
    message = f"Updated {model}." if changed else f"{model} is up to date."
    return UpdateResult(model, changed, " ".join([*notices, message]))

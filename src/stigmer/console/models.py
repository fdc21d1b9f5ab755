"""The Models page's work, done by the LLM core (llm.catalog_ops, the providers, the fit check): the
models there are, a pull run in a thread of the API process with its progress kept for the page to
follow, a removal, what a model needs here."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import Event
from stigmer.paths import Paths

log = logging.getLogger(__name__)

KEEP_FINISHED = 600.0  # seconds a finished pull stays to be read


def listing(settings: Settings, paths: Paths) -> dict[str, Any]:
    """The LLM's status and its models: downloaded ones (a local provider), or what the endpoint lists."""
    from stigmer.llm import active
    from stigmer.llm.names import same_model
    from stigmer.llm.provider import CATALOG

    provider = active.provider(settings, paths)
    status = asdict(active.status(settings, paths))
    models: list[dict[str, Any]] = []
    problem = None
    manages = CATALOG in provider.capabilities
    if manages:
        from stigmer.llm.catalog_ops import catalog

        try:
            models = [
                {**asdict(m), "current": same_model(m.name, provider.model)}
                for m in catalog(provider, "list").list_models()
            ]
        except StigmerError as e:
            problem = e.to_dict()
    else:
        models = [
            {"name": name, "size": None, "modified": "", "current": name == provider.model}
            for name in status.get("available") or []
        ]
    return {"status": status, "models": models, "manages": manages, "problem": problem}


def remove(settings: Settings, paths: Paths, model: str) -> None:
    from stigmer.llm import active
    from stigmer.llm.catalog_ops import catalog
    from stigmer.llm.names import parse_model_name

    parse_model_name(model)
    catalog(active.provider(settings, paths), "remove").remove(model)


def needs(settings: Settings, paths: Paths, model: str | None) -> dict[str, Any]:
    """What `stigmer server llm show MODEL --json` says: memory at its context, whether it fits."""
    from stigmer.llm import active
    from stigmer.llm.models.fit_check import describe
    from stigmer.llm.names import parse_model_name
    from stigmer.llm.provider import LocalRuntime

    provider = active.provider(settings, paths)
    if not isinstance(provider, LocalRuntime):
        raise StigmerError(
            f"The {provider.label} provider runs elsewhere: there is no local model to look at.",
            code=ErrorCode.UNSUPPORTED,
        )
    name = model or provider.model
    parse_model_name(name)
    found: dict[str, Any] = describe(name, provider=provider.name, settings=settings, paths=paths).to_dict()
    return found


@dataclass
class Pull:
    id: str
    model: str
    state: str = "running"  # running | done | failed
    messages: list[str] = field(default_factory=list)
    bars: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> message, done, total
    error: dict[str, Any] | None = None
    version: int = 0
    finished: float | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "state": self.state,
            "messages": self.messages[-20:],
            "bars": list(self.bars.values()),
            "error": self.error,
        }


class Pulls:
    """Pulls started from the console, one at a time per model, followed by their id."""

    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.settings = settings
        self.paths = paths
        self.jobs: dict[str, Pull] = {}
        self.lock = threading.Lock()

    def start(self, model: str, *, force: bool) -> Pull:
        from stigmer.llm.names import parse_model_name

        parse_model_name(model)  # a bad name is refused now, not in the thread
        with self.lock:
            now = time.monotonic()
            self.jobs = {
                k: j for k, j in self.jobs.items() if j.finished is None or now - j.finished < KEEP_FINISHED
            }
            for job in self.jobs.values():
                if job.model == model and job.state == "running":
                    return job
            job = Pull(id=secrets.token_hex(8), model=model)
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job, force), name=f"pull {model}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Pull:
        job = self.jobs.get(job_id)
        if job is None:
            raise StigmerError("No such download.", code=ErrorCode.NOT_FOUND)
        return job

    def _run(self, job: Pull, force: bool) -> None:
        from stigmer.llm import active
        from stigmer.llm.catalog_ops import pull

        def report(event: Event) -> None:
            with self.lock:
                if event.key and event.total:
                    job.bars[event.key] = {"message": event.message, "done": event.done, "total": event.total}
                elif event.message and (not job.messages or job.messages[-1] != event.message):
                    job.messages.append(event.message)
                job.version += 1

        try:
            provider = active.provider(self.settings, self.paths)
            pull(
                provider,
                job.model,
                report,
                force=force,
                command='tick "Download even if it does not fit" and pull again',
                notices=report,
            )
            state, error = "done", None
        except StigmerError as e:
            state, error = "failed", e.to_dict()
        except Exception as e:  # noqa: BLE001 - a bug: said on the page and logged, never a silent stop
            log.exception("pull of %s failed", job.model)
            state, error = "failed", {"code": "internal", "message": f"{type(e).__name__}: {e}", "hint": ""}
        with self.lock:
            job.state, job.error, job.finished = state, error, time.monotonic()
            job.version += 1

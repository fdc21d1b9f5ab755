"""The models half of the OpenAI-compatible endpoint: which models there are, which one a request means,
and the request relayed to the provider in force (the configured one, or the offline fallback serving).

One `Upstream` per API process. It follows the settings as they change (`stigmer config set llm.model`)
and the LLM service as it restarts: both are re-read when config.yaml or the LLM's pid record changes
(two stat calls a request; a reload costs milliseconds and happens in a thread).

The provider's key is the server's, from the provider object; the client's Authorization header is
never sent on (requests are built here, header by header). Requests to a local LLM wait their turn in
a FairQueue (queue.py); remote providers take requests as they come.

Models:
- `local`: the model the provider serves now (the built-in engine: the one it was started with);
- the configured model by its name (the provider's own, e.g. the model the machine chose for Ollama);
- the provider's other models: downloaded ones (local providers), the endpoint's list (remote; kept
  60 s, and a remote that does not answer still lists the configured model).

A downloaded model that the built-in engine does not serve is refused (400 `model_not_served`, saying
how to switch), not switched to: the engine holds one model per process, so serving another means
restarting it, which takes seconds to minutes, breaks every stream in flight (other clients', agents'
executions) and changes the model everyone else gets, all as a side effect of one client's request.
Switching is the server's decision (`stigmer config set llm.model NAME && stigmer server`: it checks the
new model first and falls back to the old one). Ollama loads any downloaded model on demand: those
requests go through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import Response

from stigmer.config.store import Settings
from stigmer.endpoint import anthropic_wire, wire
from stigmer.endpoint.queue import FairQueue
from stigmer.endpoint.relay import Answer, Call, Exchange, open_httpx, open_loopback
from stigmer.endpoint.wire import OpenAIError
from stigmer.errors import StigmerError
from stigmer.llm.names import same_model
from stigmer.llm.provider import SERVICE, LocalRuntime, Provider
from stigmer.net.http import USER_AGENT, is_loopback, redact
from stigmer.paths import Paths

log = logging.getLogger(__name__)

LOCAL = "local"  # the alias of the model served now
OWNER_ALIAS = "stigmer"
REMOTE_LIST_TTL = 60.0  # seconds a remote endpoint's model list is kept
FAILED_LIST_TTL = 15.0  # ... and its failure: a dead endpoint must not slow every /v1/models down
LOCAL_LIST_TTL = 5.0  # downloaded models change with `llm pull` / `llm rm`
LIST_TIMEOUT = 5.0
REMOTE_TIMEOUT = 600.0  # between two pieces of a remote answer (a reasoning model thinks before it speaks)
# The built-in engine runs one request at a time: xllamacpp's CommonParams default n_parallel is 1 and
# engine.start_internal leaves it (/props total_slots: 1). Sending it more only queues them there, FIFO.
BUILTIN_ENGINE_SLOTS = 1
OLLAMA_SLOTS_ENV = "OLLAMA_NUM_PARALLEL"  # Ollama's own setting; its default is 1 (0.20 and later)

Signature = tuple[tuple[int, int, int] | None, ...]


def _stat(path: os.PathLike[str]) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def engine_slots(provider: Provider, environ: os._Environ[str] | dict[str, str] | None = None) -> int:
    """How many requests the local LLM runs at once (the queue lets that many through)."""
    if provider.name == "ollama":
        raw = (os.environ if environ is None else environ).get(OLLAMA_SLOTS_ENV, "").strip()
        return max(1, int(raw)) if raw.isdigit() else 1
    return BUILTIN_ENGINE_SLOTS


def _epoch(stamp: Any) -> int:
    """Seconds since the epoch of an RFC 3339 time (Ollama's have nanoseconds); 0 when unknown."""
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        return int(stamp)
    if not isinstance(stamp, str) or not stamp:
        return 0
    text = stamp.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # at most microseconds for fromisoformat
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = head + "." + rest[: min(digits, 6)] + rest[digits:]
    try:
        return int(datetime.fromisoformat(text).timestamp())
    except ValueError:
        return 0


@dataclass(frozen=True)
class _State:
    signature: Signature
    settings: Settings
    provider: Provider
    served: str  # what `local` means
    running_model: str | None  # the built-in engine's model per its record (None: not running, or not ours)

    @property
    def local(self) -> bool:
        return isinstance(self.provider, LocalRuntime)

    def same(self, a: str, b: str) -> bool:
        """The same model: local names compare as the runtimes do (`x` is `x:latest`), remote ids exactly."""
        return a == b or (self.local and same_model(a, b))


class Upstream:
    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.paths = paths
        self._settings = settings
        self._settings_file = _stat(paths.config_file)  # config.yaml as `settings` were read from it
        self._state: _State | None = None
        self._loading: asyncio.Future[_State] | None = None
        self.queue = FairQueue(slots=BUILTIN_ENGINE_SLOTS, max_waiting=settings.server.max_queue)
        self._lists: dict[tuple[str, str], tuple[float, list[tuple[str, int]] | None]] = {}
        self._http: Any = None  # httpx.AsyncClient, made on first use (remote providers only)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- the settings and the provider in force -------------------------------------------------------

    def _signature(self) -> Signature:
        return (
            _stat(self.paths.config_file),
            _stat(self.paths.pid_file(SERVICE)),
            _stat(self.paths.legacy_llm_pid),
        )

    async def _current(self) -> _State:
        try:
            return await self._reloaded()
        except StigmerError as e:
            raise server_side(e) from None

    async def _reloaded(self) -> _State:
        signature = self._signature()
        state = self._state
        if state is not None and state.signature == signature:
            return state
        if self._loading is None:  # one reload at a time; concurrent requests wait for it
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load, signature, state))
        loading = self._loading
        try:
            state = await asyncio.shield(loading)
        finally:
            if self._loading is loading and loading.done():
                self._loading = None
        self._state = state
        self.queue.configure(slots=engine_slots(state.provider), max_waiting=state.settings.server.max_queue)
        return state

    def _load(self, signature: Signature, before: _State | None) -> _State:
        from stigmer.config import store
        from stigmer.llm import active

        settings = self._settings
        if signature[0] != self._settings_file:
            try:
                settings = store.load(self.paths)
            except StigmerError as e:  # a file being edited, or broken: keep serving with what was read
                log.warning(
                    "config.yaml not reloaded (%s); the endpoint keeps the settings it had", e.message
                )
            else:
                self._settings = settings
            self._settings_file = signature[0]  # a broken file is not read again until it changes
        provider = active.provider(settings, self.paths)
        running = None
        if provider.name == "llamacpp" and isinstance(provider, LocalRuntime):
            rec = provider.managed_record()
            if rec is not None and rec.info.get("model"):
                running = str(rec.info["model"])
        if (
            before is None
            or before.provider.name != provider.name
            or before.provider.base_url != provider.base_url
        ):
            self._lists.clear()
        return _State(signature, settings, provider, running or provider.model, running)

    # -- models ----------------------------------------------------------------------------------------

    async def models(self) -> list[dict[str, Any]]:
        """OpenAI model objects: the configured model, `local`, then the provider's other models."""
        state = await self._current()
        p = state.provider
        listed = await self._listed(state) or []
        created = {name: when for name, when in listed}
        out = [
            wire.model_object(p.model, p.name, created.get(p.model, 0)),
            wire.model_object(LOCAL, OWNER_ALIAS),
        ]
        shown = [p.model, LOCAL]
        for name, when in listed:
            if not any(state.same(name, s) for s in shown):
                out.append(wire.model_object(name, p.name, when))
                shown.append(name)
        return out

    async def _listed(self, state: _State) -> list[tuple[str, int]] | None:
        """(id, created) of the provider's models, cached; None when the provider does not say."""
        p = state.provider
        cache_key = (p.name, p.base_url)
        now = time.monotonic()
        cached = self._lists.get(cache_key)
        if cached is not None and now < cached[0]:
            return cached[1]
        if state.local:
            listed: list[tuple[str, int]] | None = await asyncio.to_thread(self._local_list, p)
            ttl = LOCAL_LIST_TTL
        else:
            listed = await self._remote_list(state)
            ttl = REMOTE_LIST_TTL if listed is not None else FAILED_LIST_TTL
        self._lists[cache_key] = (now + ttl, listed)
        return listed

    @staticmethod
    def _local_list(provider: Provider) -> list[tuple[str, int]] | None:
        list_models = getattr(provider, "list_models", None)
        if list_models is None:
            return None
        try:
            return [(m.name, _epoch(m.modified)) for m in list_models()]
        except (StigmerError, OSError, ValueError) as e:  # Ollama not running, say
            log.info("could not list the %s models: %s", provider.name, e)
            return None

    async def _remote_list(self, state: _State) -> list[tuple[str, int]] | None:
        import httpx

        p = state.provider
        endpoint = p.endpoint()
        key = getattr(endpoint, "api_key", "")
        if p.name == "anthropic":
            url = endpoint.base_url.rstrip("/") + "/v1/models?limit=1000"
            headers = {"x-api-key": key, "anthropic-version": anthropic_wire.VERSION}
        else:
            url = endpoint.base_url.rstrip("/") + "/models"
            headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = await self._client().get(url, headers=headers, timeout=LIST_TIMEOUT)
            response.raise_for_status()
            items = response.json().get("data")
            return [
                (str(m["id"]), _epoch(m.get("created") or m.get("created_at")))
                for m in items
                if isinstance(m, dict) and isinstance(m.get("id"), str)
            ]
        except (httpx.HTTPError, ValueError, TypeError, AttributeError) as e:  # not known: never a 500
            log.info("could not list the models of %s: %s", redact(endpoint.base_url), type(e).__name__)
            return None

    def _client(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(REMOTE_TIMEOUT, connect=10.0),
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._http

    # -- which model a request means -------------------------------------------------------------------

    async def resolve(self, model: str) -> str:
        """The provider's id for a requested model id; OpenAIError 404 `model_not_found` for one it does
        not have, 400 `model_not_served` for a model the built-in engine has but does not serve."""
        return await self._resolve(await self._current(), model)

    async def _resolve(self, state: _State, model: Any) -> str:
        if not isinstance(model, str) or not model.strip():
            raise wire.invalid("`model` is required: a model id from GET /v1/models.", "model")
        p = state.provider
        if model == LOCAL or state.same(model, state.served):
            return state.served
        engine = p.name == "llamacpp"
        if state.same(model, p.model):
            if engine and state.running_model is not None:
                raise _not_served(model, state.served, configured=True)
            return p.model
        listed = await self._listed(state)
        if listed is None:
            if state.local and engine:
                raise wire.model_not_found(model)
            return model  # the provider did not say what it has: let it answer for itself
        found = next((name for name, _ in listed if state.same(model, name)), None)
        if found is None:
            raise wire.model_not_found(model)
        if engine:
            raise _not_served(model, state.served, configured=False)
        return found

    # -- the request -----------------------------------------------------------------------------------

    async def complete(self, body: dict[str, Any], *, caller: str) -> Response:
        """The answer to an OpenAI chat completions request: the provider's, relayed as it comes
        (streamed or not), or an error in OpenAI's shape. `caller` (a key's name, or "admin") is whose
        turn it is in the local LLM's queue."""
        try:
            state = await self._current()
            model = await self._resolve(state, body.get("model"))
            call = self._call(state, body, model)
        except OpenAIError as e:
            return e.response()
        except StigmerError as e:
            return server_side(e).response()
        return Exchange(call, queue=self.queue if state.local else None, caller=caller)

    def _call(self, state: _State, body: dict[str, Any], model: str) -> Call:
        p = state.provider
        if hasattr(p, "require_endpoint"):
            p.require_endpoint()  # a remote provider with no base URL or model: say which setting
        endpoint = p.endpoint(model)
        key = str(getattr(endpoint, "api_key", "") or "")
        if any(c in key for c in "\r\n\0"):
            raise OpenAIError(
                500, "The LLM's API key in the server's settings holds a line break: fix llm.api_key."
            )
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        base = endpoint.base_url.rstrip("/")
        anthropic = p.name == "anthropic"
        if anthropic:
            url = base + "/v1/messages"
            payload = anthropic_wire.request(body, model)
            headers = {"x-api-key": key, "anthropic-version": anthropic_wire.VERSION}
        else:
            url = base + "/chat/completions"
            payload = {**body, "model": model}
            headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers["Content-Type"] = "application/json"
        headers["Accept"] = "text/event-stream" if stream else "application/json"
        parts = urlsplit(url)
        if parts.scheme == "http" and is_loopback(url):
            raw = [
                (b"User-Agent", USER_AGENT.encode()),
                *((k.encode(), v.encode()) for k, v in headers.items()),
            ]

            def opener() -> Coroutine[Any, Any, Answer]:
                return open_loopback(parts, raw, data)

        else:
            client = self._client()

            def opener() -> Coroutine[Any, Any, Answer]:
                return open_httpx(client, url, headers, data)

        return Call(
            open=opener,
            anthropic=anthropic,
            stream=stream,
            include_usage=include_usage,
            model=model,
            noun=f"The {p.noun}",
            where=redact(endpoint.base_url),
            local=state.local,
            secrets=tuple(s for s in (key, parts.password or "") if s),
        )


def server_side(e: StigmerError) -> OpenAIError:
    """A problem of the server's own LLM settings (llm.base_url unset, say): never the client's 400."""
    out = wire.from_stigmer(e)
    if out.status == 400:
        out.status, out.type = 500, "server_error"
    return out


def _not_served(model: str, served: str, *, configured: bool) -> OpenAIError:
    why = (
        f"llm.model is {model!r}, but the built-in engine still serves {served!r} (the server has not "
        "applied the change yet)"
        if configured
        else f"{model!r} is downloaded, but the built-in engine serves one model at a time, {served!r} now"
    )
    return OpenAIError(
        400,
        f"{why}. Use the model 'local' (or {served!r}), or make the server serve it: "
        f"stigmer config set llm.model {model} && stigmer server",
        code="model_not_served",
        param="model",
    )

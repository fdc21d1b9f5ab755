"""The web console's routes, served by the API on its own port: pages rendered on the server (Jinja2,
autoescaped) and a few JSON and event-stream paths for the pages' scripts, under /ui/api/.

Every route is behind the console's door (door.py): a session cookie for everything, and for every
change the session's CSRF token and the console's own origin. The work is the server's own: the
executions, sessions and agents of `Executions`, `server_status`, the LLM core for models.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, request_response

from stigmer.config.store import Settings
from stigmer.console import door as d
from stigmer.console import views
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.server.api.temporal_ui import LINK_TTL
from stigmer.server.executions import Executions
from stigmer.units import human_bytes

HERE = Path(__file__).parent
Handler = Callable[[Request, str], Awaitable[Response]]
is_console_path = d.is_console_path


def routes(
    settings: Settings,
    paths: Paths,
    ex: Callable[[], Executions],
    temporal_link: Callable[[], dict[str, Any]],
) -> list[BaseRoute]:
    """The console's routes, and the bearer-token route that makes its sign-in links (`stigmer ui`).
    `temporal_link()`: a one-time sign-in link to Temporal's UI (what `stigmer server temporal-ui` gets)."""
    return Console(settings, paths, ex, temporal_link).routes()


class Console:
    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        ex: Callable[[], Executions],
        temporal_link: Callable[[], dict[str, Any]],
    ) -> None:
        from stigmer.console.models import Pulls

        self.settings = settings
        self.paths = paths
        self.ex = ex
        self.temporal_link = temporal_link
        self.port = settings.server.port
        self.door = d.Door(d.new_sessions(), self.port)
        self.pulls = Pulls(settings, paths)
        self._templates: Any = None

    @property
    def templates(self) -> Any:
        """Jinja2, loaded at the first page (~50 ms the API's start does not need to pay)."""
        if self._templates is None:
            import jinja2
            from starlette.templating import Jinja2Templates

            env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True
            )
            env.filters["ago"] = _ago
            env.filters["seconds"] = _seconds
            env.filters["pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False)
            env.filters["bytes"] = human_bytes
            self._templates = Jinja2Templates(env=env)
        return self._templates

    # -- wiring ------------------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        from starlette.staticfiles import StaticFiles

        def page(path: str, handler: Handler) -> Route:
            return Route(path, self._secured(self._page(handler)), methods=["GET", "HEAD"])

        def api(path: str, handler: Handler, methods: list[str] | None = None) -> Route:
            return Route(path, self._secured(self._api(handler)), methods=methods or ["GET"])

        static = StaticFiles(directory=HERE / "static")
        return [
            Route("/v1/console/signin", self.make_link, methods=["POST"]),  # the bearer token's side
            page("/", self.overview),
            Route(d.PREFIX, self._secured(request_response(self.to_root))),
            Route(d.SIGNIN_PATH, self._secured(request_response(self.sign_in))),
            page("/ui/chat", self.chat),
            page("/ui/executions", self.executions),
            page("/ui/executions/{id}", self.execution),
            page("/ui/approvals", self.approvals),
            page("/ui/agents", self.agents),
            page("/ui/agents/new", self.new_agent),
            page("/ui/agents/{name}", self.agent),
            page("/ui/models", self.models),
            api("/ui/api/overview", self.api_overview),
            api("/ui/api/executions", self.api_executions),
            api("/ui/api/executions/{id}/events", self.api_events),
            api("/ui/api/executions/{id}/cancel", self.api_cancel, ["POST"]),
            api("/ui/api/executions/{id}/decide", self.api_decide, ["POST"]),
            api("/ui/api/approvals", self.api_approvals),
            api("/ui/api/sessions", self.api_sessions),
            api("/ui/api/sessions/{name}", self.api_session),
            api("/ui/api/sessions/{name}/fork", self.api_fork, ["POST"]),
            api("/ui/api/chat", self.api_chat, ["POST"]),
            api("/ui/api/temporal-ui", self.api_temporal_ui, ["POST"]),
            api("/ui/api/agents", self.api_save_agent, ["POST"]),
            api("/ui/api/agents/{name}", self.api_delete_agent, ["DELETE"]),
            api("/ui/api/models/remove", self.api_remove_model, ["POST"]),
            api("/ui/api/models/pull", self.api_pull, ["POST"]),
            api("/ui/api/models/pulls/{id}", self.api_pull_events),
            api("/ui/api/models/needs", self.api_needs),
            Mount("/ui/static", app=d.Secured(static, port=self.port, static=True), name="static"),
            Route("/ui/{rest:path}", self._secured(self._page(self.not_found))),
        ]

    def _secured(self, app: Any) -> d.Secured:
        return d.Secured(app, port=self.port)

    def _page(self, handler: Handler) -> Any:
        """A page (GET only: every change is made by the pages' scripts, through _api): the sign-in page
        without a session; a StigmerError shown on an error page.

        Why no HTML form posts: under Referrer-Policy no-referrer a browser sends `Origin: null` with a
        form's POST, which the API's guard refuses (and which would prove nothing about where it came
        from); a script's same-origin fetch sends the console's origin or Sec-Fetch-Site."""

        async def endpoint(request: Request) -> Response:
            session = self.door.session(request)
            if session is None:
                return self.render(request, "signin.html", {}, status_code=401, session=None)
            try:
                return await handler(request, session)
            except StigmerError as e:
                status = e.code.http_status
                return self.render(request, "error.html", {"error": e.to_dict()}, status, session=session)

        return request_response(endpoint)

    def _api(self, handler: Handler) -> Any:
        """A JSON (or event-stream) path of the pages' scripts: the session, and for a change, the CSRF
        token and the origin; errors in the API's shape."""

        async def endpoint(request: Request) -> Response:
            session = self.door.session(request)
            if session is None:
                error = StigmerError("Sign in first: run  stigmer ui", code=ErrorCode.UNAUTHORIZED)
                return JSONResponse({"error": error.to_dict()}, status_code=401)
            if request.method in d.WRITES:
                why = self.door.write_refusal(request, session)
                if why is not None:
                    error = StigmerError(f"Refused: {why}.", code=ErrorCode.ACCESS_DENIED)
                    return JSONResponse({"error": error.to_dict()}, status_code=403)
            try:
                return await handler(request, session)
            except StigmerError as e:
                return JSONResponse({"error": e.to_dict()}, status_code=e.code.http_status)

        return request_response(endpoint)

    def render(
        self,
        request: Request,
        template: str,
        context: dict[str, Any],
        status_code: int = 200,
        *,
        session: str | None,
    ) -> Response:
        base = {
            "csrf": self.door.sessions.csrf(session) if session else "",
            "signed_in": session is not None,
            "path": request.url.path,
        }
        response: Response = self.templates.TemplateResponse(
            request, template, {**base, **context}, status_code=status_code
        )
        if session is not None:  # a page seen starts the 12 hours again, in the browser too
            response.headers.append("set-cookie", self.door.sessions.set_cookie(session))
        return response

    # -- signing in --------------------------------------------------------------------------------------
    async def make_link(self, _request: Request) -> JSONResponse:
        url = f"{self.door.origin}{d.SIGNIN_PATH}?t={self.door.sessions.link()}"
        return JSONResponse({"url": url, "expires_in": int(LINK_TTL)})

    async def sign_in(self, request: Request) -> Response:
        token = request.query_params.get("t") or ""
        session = self.door.sessions.redeem(token) if token else None
        if session is None:
            return self.render(request, "signin.html", {"expired": True}, status_code=403, session=None)
        response = RedirectResponse("/", status_code=303)
        response.headers.append("set-cookie", self.door.sessions.set_cookie(session))
        return response

    async def to_root(self, _request: Request) -> Response:
        return RedirectResponse("/", status_code=307)

    async def not_found(self, request: Request, session: str) -> Response:
        error = {"message": f"There is no page {request.url.path[:100]}.", "hint": ""}
        return self.render(request, "error.html", {"error": error}, status_code=404, session=session)

    # -- pages -------------------------------------------------------------------------------------------
    async def overview(self, request: Request, session: str) -> Response:
        return self.render(request, "overview.html", {"tab": "overview"}, session=session)

    async def chat(self, request: Request, session: str) -> Response:
        agents = [a.name for a in self.ex().agents()]
        return self.render(request, "chat.html", {"tab": "chat", "agents": agents}, session=session)

    async def executions(self, request: Request, session: str) -> Response:
        agents = [a.name for a in self.ex().agents()]
        context = {
            "tab": "executions",
            "agents": agents,
            "states": views.STATES,
            "state": request.query_params.get("state") or "",
            "agent": request.query_params.get("agent") or "",
        }
        return self.render(request, "executions.html", context, session=session)

    async def execution(self, request: Request, session: str) -> Response:
        record = self.ex().record(request.path_params["id"])
        context = {"tab": "executions", "x": record, "running": record["state"] not in views.TERMINAL}
        return self.render(request, "execution.html", context, session=session)

    async def approvals(self, request: Request, session: str) -> Response:
        return self.render(request, "approvals.html", {"tab": "approvals"}, session=session)

    async def agents(self, request: Request, session: str) -> Response:
        agents = [a.to_dict() for a in self.ex().agents()]
        return self.render(request, "agents.html", {"tab": "agents", "agents": agents}, session=session)

    async def agent(self, request: Request, session: str) -> Response:
        spec = self.ex().agent(request.path_params["name"]).to_dict()
        context = {"tab": "agents", "name": spec["name"], "text": views.agent_yaml(spec), "new": False}
        return self.render(request, "agent.html", context, session=session)

    async def new_agent(self, request: Request, session: str) -> Response:
        context = {"tab": "agents", "name": "", "text": views.NEW_AGENT, "new": True}
        return self.render(request, "agent.html", context, session=session)

    async def models(self, request: Request, session: str) -> Response:
        from stigmer.console.models import listing

        found = await run_in_threadpool(listing, self.settings, self.paths)
        context = {"tab": "models", **found, "removed": request.query_params.get("removed")}
        return self.render(request, "models.html", context, session=session)

    # -- the pages' scripts ------------------------------------------------------------------------------
    async def api_overview(self, _request: Request, _session: str) -> Response:
        from stigmer.server.status import server_status

        status = await run_in_threadpool(server_status, self.settings, self.paths)
        return JSONResponse(views.overview(status, self.ex()))

    async def api_executions(self, request: Request, _session: str) -> Response:
        q = request.query_params
        state = (q.get("state") or "").upper() or None
        return JSONResponse(self.ex().records(state=state, agent=q.get("agent") or None, limit=100))

    async def api_events(self, request: Request, _session: str) -> Response:
        from sse_starlette.sse import EventSourceResponse

        exec_id = request.path_params["id"]
        last = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        after = int(last) if last.isascii() and last.isdigit() else 0
        self.ex().record(exec_id, messages=False)  # an unknown id is a 404 before the stream starts
        stream = self.ex().stream(exec_id, after)

        async def sse() -> AsyncIterator[dict[str, str]]:
            yield {"comment": "stream open"}
            async for seq, kind, data in stream:
                if kind == "ping":
                    yield {"comment": "ping"}
                else:
                    yield {"id": str(seq), "event": kind, "data": json.dumps(data)}

        return EventSourceResponse(sse(), ping=None)

    async def api_cancel(self, request: Request, _session: str) -> Response:
        return JSONResponse(await self.ex().cancel(request.path_params["id"]))

    async def api_decide(self, request: Request, _session: str) -> Response:
        body = await _json(request)
        verdict = body.get("verdict")
        if verdict not in ("allow", "always", "deny"):
            raise StigmerError("`verdict` must be allow, always or deny.", code=ErrorCode.INVALID_INPUT)
        record = await self.ex().decide(
            request.path_params["id"],
            approve=verdict != "deny",
            call_id=str(body["call_id"]) if body.get("call_id") else None,
            always=verdict == "always",
        )
        return JSONResponse({"state": record["state"], "decided": record.get("decided")})

    async def api_approvals(self, _request: Request, _session: str) -> Response:
        return JSONResponse(views.inbox(self.ex()))

    async def api_sessions(self, request: Request, _session: str) -> Response:
        return JSONResponse(self.ex().sessions(request.query_params.get("agent") or None))

    async def api_session(self, request: Request, _session: str) -> Response:
        return JSONResponse(views.transcript(self.ex(), request.path_params["name"]))

    async def api_fork(self, request: Request, _session: str) -> Response:
        body = await _json(request)
        at = body.get("at")
        if at is not None and (not isinstance(at, int) or isinstance(at, bool)):
            raise StigmerError("`at` must be a turn number.", code=ErrorCode.INVALID_INPUT)
        return JSONResponse(self.ex().fork(request.path_params["name"], at, None), status_code=201)

    async def api_chat(self, request: Request, _session: str) -> Response:
        """A turn: of the session named, or of a new `chat-<date>-<time>` one."""
        body = await _json(request)
        name = body.get("session") or self._new_session_name()
        agent = body.get("agent") or None
        if not isinstance(name, str) or (agent is not None and not isinstance(agent, str)):
            raise StigmerError("`session` and `agent` are names.", code=ErrorCode.INVALID_INPUT)
        message = body.get("message", "")
        record = await self.ex().create(agent, message if isinstance(message, str) else "", session=name)
        return JSONResponse(record, status_code=201)

    def _new_session_name(self) -> str:
        base = "chat-" + time.strftime("%Y%m%d-%H%M%S")
        name, n = base, 1
        while self.ex().db.get_session(name) is not None:
            n += 1
            name = f"{base}-{n}"
        return name

    async def api_save_agent(self, request: Request, _session: str) -> Response:
        """Store an agent from the editor's YAML. A file that does not check out is an answer, not a failed
        request: 200 with `saved: false` and the error, its `line` when it names one (a browser reports
        every 4xx of a script's request as an error in its console, and a typo is not one)."""
        from stigmer.agents.spec import parse_yaml

        body = await _json(request)
        text = body.get("yaml")
        if not isinstance(text, str):
            raise StigmerError("`yaml` must be the text of an agent file.", code=ErrorCode.INVALID_INPUT)
        try:
            spec = parse_yaml(text, views.AGENT_SOURCE)
        except StigmerError as e:
            if e.code is not ErrorCode.INVALID_INPUT:
                raise
            error = {
                **e.to_dict(),
                "message": views.without_source(e.message),
                "line": views.error_line(e.message),
            }
            return JSONResponse({"saved": False, "error": error})
        created = self.ex().db.put_agent(spec.name, spec.to_dict())
        return JSONResponse({"saved": True, "name": spec.name, "created": created})

    async def api_delete_agent(self, request: Request, _session: str) -> Response:
        name = request.path_params["name"]
        if not self.ex().db.delete_agent(name):
            self.ex().agent(name)  # 404 for an unknown name
            raise StigmerError(
                f"{name} is the built-in agent and cannot be removed.",
                hint="Save it with other instructions to change what it does.",
                code=ErrorCode.UNSUPPORTED,
            )
        return JSONResponse({"removed": name})

    async def api_remove_model(self, request: Request, _session: str) -> Response:
        from stigmer.console.models import remove

        model = (await _json(request)).get("model")
        if not isinstance(model, str):
            raise StigmerError("Name the model to remove.", code=ErrorCode.INVALID_INPUT)
        await run_in_threadpool(remove, self.settings, self.paths, model)
        return JSONResponse({"removed": model})

    async def api_temporal_ui(self, _request: Request, _session: str) -> Response:
        return JSONResponse(self.temporal_link())

    async def api_pull(self, request: Request, _session: str) -> Response:
        body = await _json(request)
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise StigmerError("Name the model to pull.", code=ErrorCode.INVALID_INPUT)
        job = self.pulls.start(model.strip(), force=body.get("force") is True)
        return JSONResponse(job.snapshot(), status_code=202)

    async def api_pull_events(self, request: Request, _session: str) -> Response:
        import asyncio

        from sse_starlette.sse import EventSourceResponse

        job = self.pulls.get(request.path_params["id"])

        async def sse() -> AsyncIterator[dict[str, str]]:
            seen = -1
            while True:
                if job.version != seen:
                    seen = job.version
                    yield {"event": "progress", "data": json.dumps(job.snapshot())}
                if job.state != "running":
                    yield {"event": "end", "data": json.dumps(job.snapshot())}
                    return
                await asyncio.sleep(0.25)

        return EventSourceResponse(sse(), ping=15)

    async def api_needs(self, request: Request, _session: str) -> Response:
        from stigmer.console.models import needs

        model = request.query_params.get("model") or None
        return JSONResponse(await run_in_threadpool(needs, self.settings, self.paths, model))


async def _json(request: Request) -> dict[str, Any]:
    from stigmer.server.api.app import body_of

    return await body_of(request)


def _ago(epoch: float | None) -> str:
    return _seconds(time.time() - epoch) + " ago" if epoch else ""


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    s = float(value)
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"

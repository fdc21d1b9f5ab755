"""`stigmer run`, `stigmer agent ...`, `stigmer execution ...`, `stigmer worker`: all through the server's
HTTP API (the CLI never imports temporalio)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stigmer.cli.render import Out, terminal_safe
from stigmer.errors import ErrorCode, StigmerError
from stigmer.executions.answer import rest_of
from stigmer.executions.contract import END_EVENTS
from stigmer.executions.contract import EventKind as E
from stigmer.paths import Paths
from stigmer.server.client import ApiClient

MAX_STDIN = 100_000


def _api(*, start: bool = False, out: Out | None = None) -> ApiClient:
    from stigmer.server import control

    paths = Paths.from_env()
    if start and not control.is_running(paths):
        from stigmer.cli.server_cmd import bring_up

        bring_up(out or Out())
    client: ApiClient = control.api(paths)
    return client


# -- stigmer run ---------------------------------------------------------------------------------------------
def _message(args: argparse.Namespace) -> str:
    if args.message is not None:
        return str(args.message)
    if sys.stdin.isatty():
        raise StigmerError(
            "No message given.",
            hint='Give one:  stigmer run -m "Say hello"   (or pipe it in)',
            code=ErrorCode.USAGE,
        )
    text = sys.stdin.read(MAX_STDIN + 1)
    if len(text) > MAX_STDIN:
        raise StigmerError(
            f"The message on stdin is longer than {MAX_STDIN} characters.", code=ErrorCode.USAGE
        )
    return text


def run(args: argparse.Namespace) -> int:
    out = Out()
    message = _message(args)
    from stigmer.agents.limits import parse_flags

    limits = parse_flags(getattr(args, "limit", None) or [])  # a bad flag is refused before the server starts
    api = _api(start=True, out=out)
    session, continue_ = getattr(args, "session", None), getattr(args, "continue_", False)
    body: dict[str, Any] = {}
    if args.agent is not None or not (session or continue_):
        body["agent"] = args.agent or "default"  # a session's own agent unless one is named
    body["message"] = message
    if limits:
        body["limits"] = limits
    if session is not None:
        body["session"] = session
    elif continue_:
        body["continue"] = True
    record = _submit(api, body, out)
    exec_id = str(record["id"])
    if args.detach:
        out.line(exec_id)
        return 0
    return follow(api, exec_id, out, json_output=args.json, cancel_on_interrupt=True)


class StreamView:
    """Prints an execution's events the way the original CLI did, text streaming as it arrives."""

    def __init__(self, out: Out, *, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet  # --json: nothing but the final record on stdout
        self.in_text = False
        self.final: dict[str, Any] | None = None
        self.answer = ""  # the text shown of the model's current answer (since its last tool call or retry)

    def _print(self, text: str, end: str = "\n") -> None:
        if not self.quiet:
            print(terminal_safe(text), end=end, file=self.out.stdout, flush=True)

    def _end_text(self) -> None:
        if self.in_text:
            self._print("")
            self.in_text = False

    def handle(self, kind: str, data: dict[str, Any]) -> bool:
        """Show one event; True once the execution has ended."""
        marks = self.out.marks
        if kind == E.PENDING:
            self._print(f"{marks['pending']} Execution pending...")
        elif kind == E.STARTED:
            self._print(
                f"{marks['started']} Execution started ({data.get('model', '')} on {data.get('provider', '')})"
            )
        elif kind == E.DELTA:
            self.answer += str(data.get("text", ""))
            if not self.in_text:
                self._print(f"{marks['agent']} Agent: ", end="")
                self.in_text = True
            self._print(str(data.get("text", "")), end="")
        elif kind == E.RETRY:
            self.answer = ""
            self._end_text()
            self._print(
                f"{marks['warn']} The model call is being retried (attempt {data.get('attempt')}); "
                "its answer starts over:"
            )
        elif kind == E.TOOL_CALL:
            self.answer = ""
            self._end_text()
            args = json.dumps(data.get("args") or {}, ensure_ascii=False)
            self._print(f"{marks['tool']} Tool: {data.get('name')}({_short(args, 200)})")
            if data.get("sandbox"):
                self._print(f"   sandbox: {_short(str(data['sandbox']), 500)}")
        elif kind == E.TOOL_RESULT:
            self.answer = ""
            self._print(f"   {marks['arrow']} {_short(str(data.get('content', '')), 300)}")
        elif kind == E.APPROVAL_REQUIRED:
            self._end_text()
            self._print(f"{marks['warn']} Waiting for approval: {_asked(data.get('name'), data.get('args'))}")
        elif kind == E.APPROVAL:
            verdict = "allowed" if data.get("approved") else "denied"
            self._print(
                f"   {data.get('name', 'tool')} {verdict}" + (" (always)" if data.get("always") else "")
            )
        elif kind == E.NOTICE:
            self._end_text()
            self._print(f"{marks['warn']} {data.get('text', '')}")
        elif kind == E.CANCELLING:
            self._end_text()
        elif kind in END_EVENTS:
            self.final = data.get("record") or {}
            self._fill_in()
            self._end_text()
            return True
        return False

    def _fill_in(self) -> None:
        """Never end on less than the record has: the answer the record keeps is compared with the text
        shown; what the stream missed at the end is printed, and an answer that the stream got wrong
        in the middle is printed again whole, after a notice."""
        rec = self.final or {}
        output = rec.get("output")
        if isinstance(output, dict) and not self.quiet and rec.get("state") == "COMPLETED":
            # an agent with an output schema answers with an object (a tool call: nothing streamed as text)
            self._end_text()
            shown = json.dumps(output, indent=2, ensure_ascii=False)
            self._print(f"{self.out.marks['agent']} Agent: {shown}")
            return
        if self.quiet or rec.get("state") != "COMPLETED" or not isinstance(output, str) or not output.strip():
            return
        rest = rest_of(self.answer, output)
        if rest is None:
            self._end_text()
            self.out.warn("Part of the streamed answer was lost on the way; the answer as recorded:")
            self._print(f"{self.out.marks['agent']} Agent: ", end="")
            self.in_text = True
            rest = output
        elif rest and not self.in_text:
            self._print(f"{self.out.marks['agent']} Agent: ", end="")
            self.in_text = True
            rest = rest.lstrip()
        if rest:
            self._print(rest, end="")
            self.answer += rest

    def summary(self) -> None:
        rec = self.final or {}
        marks = self.out.marks
        state = rec.get("state")
        if state == "COMPLETED":
            self._print(f"{marks['completed']} Execution completed")
        elif state == "CANCELLED":
            self._print(f"{marks['failed']} Execution cancelled")
        else:
            self._print(f"{marks['failed']} Execution failed: {rec.get('error') or 'unknown reason'}")
        self._print(self.out.rule)
        if rec.get("session"):
            self._print(f"Session: {rec['session']} (turn {rec.get('turn')})")
        usage = rec.get("usage") or {}
        self._print(f"Duration: {rec.get('duration') or 0:.1f}s")
        if rec.get("model"):
            self._print(f"Model: {rec.get('model')} ({rec.get('provider')})")
        if usage.get("input_tokens") is not None:
            self._print(f"Tokens: {usage.get('input_tokens')} in, {usage.get('output_tokens')} out")
        self._print(f"Attempts: {rec.get('attempts') or 1}")
        self._print(f"Tool calls: {rec.get('tool_calls') or 0}")
        self._print(f"Total messages: {len(rec.get('messages') or [])}")


# How long `run` and `logs -f` wait for a server that went away: the daemon restarts a dead API within
# a few seconds; without a daemon nobody restarts it, but `stigmer server restart` may be under way.
RECONNECT_SECONDS = 60.0
NO_DAEMON_SECONDS = 10.0
STABLE_SECONDS = 5.0  # a stream that stayed open this long counts as the server being back


class ServerLost(StigmerError):
    """The server did not come back in time: `follow` gives up."""


class Reconnect:
    """`follow`'s view of the connection: when the server was lost, the notices, the pause between
    tries and the end of waiting."""

    def __init__(self, out: Out, exec_id: str, view: StreamView) -> None:
        self.out = out
        self.exec_id = exec_id
        self.view = view
        self.since: float | None = None  # when the server was lost (monotonic); None while it answers
        self.opened_at: float | None = None
        self.told_back = False
        self.delay = 0.2

    def opened(self) -> None:
        """The server accepted the stream."""
        self.opened_at = time.monotonic()
        if self.since is not None and not self.told_back:
            self.told_back = True
            self.out.note(f"{self.out.marks['ok']} Reconnected; resuming where the stream stopped")

    def answered(self) -> None:
        """An event or an answer came: the server is back."""
        self.since = None

    def lost(self, why: str) -> None:
        """The stream dropped or the server refused: pause before the next try, or give up."""
        now = time.monotonic()
        if self.opened_at is not None and now - self.opened_at >= STABLE_SECONDS:
            self.since = None  # it was back for a while: this is a new loss
        self.opened_at = None
        if self.since is None:
            self.since, self.told_back, self.delay = now, False, 0.2
            # on a terminal, the notice goes on a line of its own, not after the answer's last word
            cut = "\n" if self.view.in_text and self.out.stdout.isatty() else ""
            self.out.note(
                f"{cut}{self.out.marks['warn']} Lost the Stigmer server ({_short(why.rstrip('.'), 160)}); reconnecting..."
            )
        else:
            daemon = _daemon_runs()
            limit = RECONNECT_SECONDS if daemon else NO_DAEMON_SECONDS
            if now - self.since >= limit:
                raise ServerLost(
                    f"Lost the Stigmer server for {now - self.since:.0f} s while following execution "
                    f"{self.exec_id}" + ("." if daemon else ": the server is stopped (no daemon runs)."),
                    hint="The execution goes on (or resumes) once the server runs: stigmer server status\n"
                    f"Follow it again with: stigmer execution logs -f {self.exec_id}",
                    code=ErrorCode.NOT_RUNNING,
                )
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 2.0)


def _submit(api: ApiClient, body: dict[str, Any], out: Out) -> Any:
    """Start the execution. While the API refuses connections (its supervisor is restarting it), try
    again for up to RECONNECT_SECONDS: a refused connection sent nothing, so nothing is started twice."""
    from stigmer.server.client import NotReachable

    waiting_since: float | None = None
    while True:
        try:
            return api.post("/v1/executions", body)
        except NotReachable as e:
            now = time.monotonic()
            if e.sent or (waiting_since is not None and now - waiting_since >= RECONNECT_SECONDS):
                raise
            if waiting_since is None:
                waiting_since = now
                out.warn("The Stigmer API does not answer (being restarted?); waiting for it...")
            time.sleep(0.5)


def _token_renewed(api: ApiClient) -> bool:
    """The token file holds another token than this command started with (it was repaired): use it."""
    from stigmer.server.token import read_token

    token = read_token(Paths.from_env())
    if not token or token == api.token:
        return False
    api.token = token
    return True


def _daemon_runs() -> bool:
    from stigmer.server.state import daemon_record

    return daemon_record(Paths.from_env()) is not None


def follow(
    api: ApiClient,
    exec_id: str,
    out: Out,
    *,
    json_output: bool = False,
    cancel_on_interrupt: bool,
    view: StreamView | None = None,
) -> int:
    """Show an execution's events until it ends. A stream that drops, or a server that refuses while
    its supervisor restarts it, is followed again from the last event seen (Last-Event-ID), for up to
    RECONNECT_SECONDS; then a clear error (NOT_RUNNING). `view`: how the events are shown (`stigmer
    chat` shows less than `run`)."""
    view = StreamView(out, quiet=json_output) if view is None else view
    link = Reconnect(out, exec_id, view)
    path = f"/v1/executions/{exec_id}/events"
    last = ""
    loss: str | None = None
    cancelled_here = False
    while True:
        try:
            if loss is not None:
                why, loss = loss, None
                link.lost(why)
            for event_id, kind, raw in api.events(path, last_event_id=last or None, on_open=link.opened):
                last = event_id or last
                link.answered()
                data = json.loads(raw) if raw else {}
                if kind == E.APPROVAL_REQUIRED and not json_output and not cancelled_here:
                    view.handle(kind, data)
                    _ask(api, exec_id, data, out, link)
                    continue
                if view.handle(kind, data):
                    break
            else:
                loss = "the event stream ended before the execution did"
                continue
            break
        except KeyboardInterrupt:
            if not cancel_on_interrupt or cancelled_here:
                raise
            cancelled_here = True
            out.note(f"\n{out.marks['warn']} Cancelling execution {exec_id}...")
            _cancel(api, exec_id)
        except StigmerError as e:
            if e.code is ErrorCode.UNAUTHORIZED and _token_renewed(api):
                continue  # `stigmer server` restarted the API with a new token meanwhile: go on with it
            if isinstance(e, ServerLost) or e.code is not ErrorCode.NOT_RUNNING:
                raise
            loss = e.message  # being restarted by its supervisor, or stopped: see Reconnect.lost
    record = view.final or api.get(f"/v1/executions/{exec_id}")
    if json_output:
        out.json(record)
    else:
        view.summary()
    state = record.get("state")
    if state == "COMPLETED":
        return 0
    if state == "CANCELLED":
        return ErrorCode.INTERRUPTED.exit_code if cancelled_here else ErrorCode.EXECUTION_CANCELLED.exit_code
    return ErrorCode.EXECUTION_FAILED.exit_code


def _cancel(api: ApiClient, exec_id: str) -> None:
    try:
        api.post(f"/v1/executions/{exec_id}/cancel")
    except StigmerError as e:
        if e.code is not ErrorCode.NOT_RUNNING:
            raise
        raise StigmerError(
            f"Interrupted, but execution {exec_id} could not be cancelled: the Stigmer server does not answer.",
            hint=f"It goes on once the server runs. Cancel it then: stigmer execution cancel {exec_id}",
            code=ErrorCode.INTERRUPTED,
        ) from None


def _ask(api: ApiClient, exec_id: str, data: dict[str, Any], out: Out, link: Reconnect) -> None:
    """On a terminal, ask at once; elsewhere the execution waits for `stigmer execution approve|deny`.
    The answer is sent again while the server is being restarted; one that came too late (answered
    elsewhere, the execution ended) is said, and the stream goes on."""
    if not (sys.stdin.isatty() and out.stdout.isatty()):
        out.note(f"   Waiting: answer with  stigmer execution approve {exec_id}  (or deny)")
        return
    question = (
        f"Go on past the {_asked('limit', data.get('args'))}? [y/N] "
        if data.get("name") == "limit"
        else f"Allow {_asked(data.get('name'), data.get('args'))}? [y/N/a(lways)] "
    )
    answer = input(terminal_safe(question)).strip().lower()
    approve = answer in ("y", "yes", "a", "always")
    always = answer in ("a", "always") and data.get("name") != "limit"  # each crossing is asked
    verb = "approve" if approve else "deny"
    while True:
        try:
            api.post(f"/v1/executions/{exec_id}/{verb}", {"call_id": data.get("id"), "always": always})
            link.answered()
            return
        except StigmerError as e:
            if isinstance(e, ServerLost):
                raise
            if e.code is not ErrorCode.NOT_RUNNING:
                out.warn(f"Your answer was not taken: {e.message}")
                return
            link.lost(e.message)


def _asked(name: Any, args: Any) -> str:
    """What an approval is asked for: a tool call, or going on past a limit (runner/limits.py)."""
    args = args if isinstance(args, dict) else {}
    if name == "limit" and "reason" in args:
        return f"{args['reason']} (approving grants {str(args.get('approve', '')).removeprefix('grants ')})"
    return f"{name}({_short(json.dumps(args, ensure_ascii=False), 200)})"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- stigmer agent -------------------------------------------------------------------------------------------
def agent_apply(args: argparse.Namespace) -> int:
    from stigmer.agents.spec import MAX_FILE

    if args.file == "-":
        text, source = sys.stdin.read(MAX_FILE + 1), "stdin"
    else:
        from pathlib import Path

        path = Path(args.file).expanduser()
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            raise StigmerError(f"No such file: {path}", code=ErrorCode.NOT_FOUND) from None
        except IsADirectoryError:
            raise StigmerError(
                f"{path} is a folder, not an agent file.", code=ErrorCode.INVALID_INPUT
            ) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StigmerError(f"{path} is not UTF-8 text.", code=ErrorCode.INVALID_INPUT) from None
        source = path.name
    result = _api(start=True).post("/v1/agents", {"yaml": text, "source": source})
    verb = "created" if result.get("created") else "updated"
    Out().success(f"Agent {result['agent']['name']} {verb}")
    return 0


def agent_list(args: argparse.Namespace) -> int:
    agents = _api(start=True).get("/v1/agents")
    out = Out()
    if args.json:
        out.json(agents)
        return 0
    out.line("Agents:")
    out.line(out.rule)
    for a in agents:
        first = (a.get("instructions") or "").strip().splitlines()
        about = terminal_safe(_short(first[0], 60)) if first else ""
        out.line(f"  {a['name']:<20} {a.get('model') or '(configured model)':<24} {about}")
    return 0


def agent_get(args: argparse.Namespace) -> int:
    agent = _api(start=True).get(f"/v1/agents/{args.name}")
    out = Out()
    if args.json:
        out.json(agent)
        return 0
    import io

    from ruamel.yaml import YAML

    buf = io.StringIO()
    YAML().dump(agent, buf)
    out.stdout.write(terminal_safe(buf.getvalue()))
    return 0


def agent_rm(args: argparse.Namespace) -> int:
    import urllib.parse

    _api().request("DELETE", f"/v1/agents/{urllib.parse.quote(args.name, safe='')}")
    Out().success(f"Agent {args.name} removed")
    return 0


# -- stigmer execution ---------------------------------------------------------------------------------------
def execution_list(args: argparse.Namespace) -> int:
    import urllib.parse

    query = urllib.parse.urlencode({k: v for k, v in (("state", args.state), ("agent", args.agent)) if v})
    rows = _api().get(f"/v1/executions?limit={args.limit}" + (f"&{query}" if query else ""))
    out = Out()
    if args.json:
        out.json(rows)
        return 0
    if not rows:
        out.info('No executions yet. Run one: stigmer run -m "Say hello"', err=False)
        return 0
    out.line(f"{'ID':<20} {'STATE':<17} {'AGENT':<14} {'MODEL':<22} {'DURATION':>9}")
    for r in rows:
        duration = f"{r['duration']:.1f}s" if r.get("duration") is not None else "-"
        out.line(
            f"{r['id']:<20} {r['state']:<17} {r['agent'][:14]:<14} {(r.get('model') or '-')[:22]:<22} {duration:>9}"
        )
    return 0


def execution_get(args: argparse.Namespace) -> int:
    record = _api().get(f"/v1/executions/{_id(args.id)}")
    out = Out()
    if args.json:
        out.json(record)
        return 0
    out.line(f"Execution {record['id']}")
    out.line(out.rule)
    shown = ("state", "agent", "model", "provider", "endpoint", "attempts", "tool_calls", "trigger", "error")
    for key in shown:
        if record.get(key) not in (None, ""):
            out.line(terminal_safe(f"  {key.replace('_', ' ').capitalize() + ':':<12} {record[key]}"))
    for warning in record.get("warnings") or []:  # e.g. template fields a webhook's body lacked
        out.line(terminal_safe(f"  {'Warning:':<12} {warning}"))
    if record.get("duration") is not None:
        out.line(f"  {'Duration:':<12} {record['duration']:.1f}s")
    usage = record.get("usage") or {}
    if usage.get("input_tokens") is not None:
        out.line(f"  {'Tokens:':<12} {usage['input_tokens']} in, {usage['output_tokens']} out")
    out.line()
    out.line("Messages:")
    for m in record.get("messages") or []:
        out.line(terminal_safe(f"  [{m['role']}] {m['content']}"))
    for pending in record.get("approvals") or []:
        out.line(terminal_safe(f"  waiting for approval: {_asked(pending['tool'], pending['args'])}"))
    return 0


def execution_cancel(args: argparse.Namespace) -> int:
    record = _api().post(f"/v1/executions/{_id(args.id)}/cancel")
    Out().success(f"Cancellation requested for {record['id']} (state {record['state']})")
    return 0


def execution_logs(args: argparse.Namespace) -> int:
    api = _api()
    out = Out()
    if args.follow:
        return follow(api, _id(args.id), out, cancel_on_interrupt=False)
    record = api.get(f"/v1/executions/{_id(args.id)}")
    view = StreamView(out, quiet=False)
    for kind, data in [(e["kind"], e["data"]) for e in _events_so_far(api, record["id"])]:
        if view.handle(kind, data):
            view.summary()
            break
    return 0


def _events_so_far(api: ApiClient, exec_id: str) -> list[dict[str, Any]]:
    """The events already stored, without waiting for more."""
    out: list[dict[str, Any]] = []
    record = api.get(f"/v1/executions/{exec_id}")
    if record["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
        for _event_id, kind, raw in api.events(f"/v1/executions/{exec_id}/events"):
            out.append({"kind": kind, "data": json.loads(raw) if raw else {}})
    else:
        Out().note("The execution is still running: attach to it with  -f")
    return out


def _decide(args: argparse.Namespace, verb: str) -> int:
    api = _api()
    record = api.post(f"/v1/executions/{_id(args.id)}/{verb}", {"always": args.always})
    Out().success(
        f"{'Approved' if verb == 'approve' else 'Denied'}: {terminal_safe(str(record.get('decided', 'the pending tool call')))}"
    )
    return 0


def execution_approve(args: argparse.Namespace) -> int:
    return _decide(args, "approve")


def execution_deny(args: argparse.Namespace) -> int:
    return _decide(args, "deny")


def _id(text: str) -> str:
    import urllib.parse

    return urllib.parse.quote(text.strip(), safe="")


# -- stigmer worker ------------------------------------------------------------------------------------------
def worker(_args: argparse.Namespace) -> int:
    from stigmer.cli.common import context
    from stigmer.runner.worker import main

    _paths, _settings = context()  # refuse a bad configuration before importing the worker
    return main(stamp=False)

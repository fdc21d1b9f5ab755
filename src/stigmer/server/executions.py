"""Executions, as the API runs them: a record in SQLite (PENDING -> IN_PROGRESS -> COMPLETED | FAILED |
CANCELLED), a Temporal workflow doing the work (workflow id = execution id), and a stream of events.

Trust (see executions/contract.py): the workflow input is only the execution id and a ticket; a worker
claims the execution with that ticket and gets what to run from here. Workers post the events of the
run (deltas, tool calls, approval requests) with the same ticket; the terminal states come only from
Temporal's outcome, which a watcher awaits for each workflow (also after the API restarts), and
decisions only from this API, recorded here atomically before the workflow is woken to read them.

Events are stored with a sequence number and fanned out to every listener, so a client that connects
late, or reconnects with Last-Event-ID, gets what it missed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from stigmer.agents.spec import BUILTIN, DEFAULT_AGENT, AgentSpec, from_dict
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.executions.contract import (
    END_EVENTS,
    TASK_QUEUE,
    WAKE_SIGNAL,
    WORKER_EVENTS,
    WORKFLOW,
    EventKind,
    ExecutionState,
)
from stigmer.executions.messages import ClaimRequest, Decision, ExecutionRef, RunSpec
from stigmer.paths import Paths
from stigmer.server.db import TERMINAL, Database
from stigmer.server.token import same

log = logging.getLogger(__name__)

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, WAITING_APPROVAL = (
    ExecutionState.PENDING.value,
    ExecutionState.IN_PROGRESS.value,
    ExecutionState.COMPLETED.value,
    ExecutionState.FAILED.value,
    ExecutionState.CANCELLED.value,
    ExecutionState.WAITING_APPROVAL.value,
)
MAX_MESSAGE = 1_000_000  # bytes of UTF-8: a message is a turn of a conversation, not a document
START_WAIT = 10.0  # how long a claim waits for the API's own start_workflow call to return its run id


def not_found(exec_id: str) -> StigmerError:
    return StigmerError(
        f"No execution {exec_id[:80]!r}.",
        hint="See recent ones: stigmer execution list",
        code=ErrorCode.NOT_FOUND,
    )


class Executions:
    def __init__(self, db: Database, settings: Settings, paths: Paths) -> None:
        self.db = db
        self.settings = settings
        self.paths = paths
        self._client: Any = None
        self._changed: dict[str, asyncio.Condition] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._starting: dict[str, asyncio.Event] = {}  # start_workflow in flight: its run id is coming
        self._background: set[asyncio.Task[Any]] = set()  # workflows started after the answer (webhooks)

    # -- Temporal -----------------------------------------------------------------------------------------
    async def client(self) -> Any:
        """The Temporal client, connected on first use (Temporal may start after the API)."""
        if self._client is not None:
            return self._client
        from stigmer.server.temporal_client import connect, explain_connect_error

        deadline = time.monotonic() + 30
        while True:
            try:
                self._client = await connect(self.settings, self.paths, store=self.db)
                return self._client
            except StigmerError:
                raise
            except Exception as e:  # noqa: BLE001 - temporalio raises RuntimeError for all of these
                error = explain_connect_error(self.settings, e)
                if not error.code.retryable or time.monotonic() > deadline:
                    raise error from None  # a certificate or a key that is wrong stays wrong
                await asyncio.sleep(0.5)

    async def resume(self) -> None:
        """After a start: watch every execution that had not finished (the API may have restarted), and
        wake those waiting for approval, in case a decision was recorded but its wake-up was lost."""
        for exec_id in self.db.unfinished():
            row = self.db.get_execution(exec_id) or {}
            if row.get("state") == PENDING and not row.get("run_id") and row.get("ticket"):
                # recorded (a webhook answered 202) but the API stopped before its workflow started
                self.later(self.start(exec_id, row["ticket"]))
                continue
            self._watch(exec_id)
            if row.get("state") == WAITING_APPROVAL:
                asyncio.get_running_loop().create_task(self._wake(exec_id))

    def later(self, work: Any) -> None:
        """Run a coroutine after the answer; the task is kept (asyncio keeps only weak references)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- agents -------------------------------------------------------------------------------------------
    def agent(self, name: str) -> AgentSpec:
        stored = self.db.get_agent(name)
        if stored is not None:
            return from_dict(stored)
        if name == DEFAULT_AGENT:
            return BUILTIN
        raise StigmerError(
            f"No agent named {name[:80]!r}.",
            hint="See the agents: stigmer agent list    Add one: stigmer agent apply -f FILE",
            code=ErrorCode.NOT_FOUND,
        )

    def agents(self) -> list[AgentSpec]:
        stored = [from_dict(a) for a in self.db.list_agents()]
        if not any(a.name == DEFAULT_AGENT for a in stored):
            stored.insert(0, BUILTIN)
        return stored

    # -- executions ---------------------------------------------------------------------------------------
    async def create(
        self,
        agent_name: str | None,
        message: str,
        *,
        session: str | None = None,
        continue_last: bool = False,
        history: list[dict[str, Any]] | None = None,
        via: str | None = None,
        trigger: str | None = None,
        warnings: list[str] | None = None,
        limits: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Start an execution: on its own, or as the next turn of a session (made when it is new; only one
        turn of a session runs at a time). `continue_last`: the most recently used session. `history`: the
        conversation before this message, given by the caller (the OpenAI-compatible endpoint), in the
        record's message format; `via`: the scoped key that asked (it may read this execution back)."""
        await self.client()  # Temporal answers before a record is made that it could not run
        exec_id, ticket = self.make(
            agent_name, message, session=session, continue_last=continue_last, history=history, via=via,
            trigger=trigger, warnings=warnings, limits=limits,
        )  # fmt: skip
        error = await self.start(exec_id, ticket)
        if error is not None:
            from stigmer.server.db import disk_full, low_space

            if low_space(self.paths.data_dir):  # Temporal's own database cannot grow
                raise disk_full(self.paths.data_dir / "temporal.db") from None
            raise StigmerError(
                f"The execution could not be started: {error}.",
                code=ErrorCode.NOT_RUNNING,
                hint="stigmer server status",
            ) from None
        return self.record(exec_id)

    def make(
        self,
        agent_name: str | None,
        message: str,
        *,
        session: str | None = None,
        continue_last: bool = False,
        history: list[dict[str, Any]] | None = None,
        via: str | None = None,
        trigger: str | None = None,
        warnings: list[str] | None = None,
        limits: dict[str, int] | None = None,
    ) -> tuple[str, str]:
        """The record of a new execution, PENDING, in one transaction (inside the caller's, when it has one:
        a webhook delivery is recorded with it). Returns its id and ticket; `start` starts its workflow. A
        record whose workflow never started (the API stopped in between) is started by `resume`."""
        if not isinstance(message, str) or not message.strip():
            raise StigmerError(
                "The message is empty.", hint='Give one: stigmer run -m "..."', code=ErrorCode.INVALID_INPUT
            )
        if len(message.encode("utf-8", "surrogatepass")) > MAX_MESSAGE:
            raise StigmerError(
                f"The message is too long ({len(message.encode('utf-8', 'surrogatepass')):,} bytes; at most 1 MB).",
                hint="Put a long text in a file in the agent's workspace and ask the agent to read it.",
                code=ErrorCode.TOO_LARGE,
            )
        if continue_last:
            session = self.db.last_session()
            if session is None:
                raise StigmerError(
                    "There is no conversation to continue yet.",
                    hint='Start one: stigmer run -m "..." --session NAME',
                    code=ErrorCode.NOT_FOUND,
                )
        owner: str | None = None
        if session is not None:
            check_session_name(session)
            stored = self.db.get_session(session)
            owner = stored["agent"] if stored else None
        spec = self.agent(agent_name or owner or DEFAULT_AGENT)
        from stigmer.agents import limits as limits_

        exec_id = "ex-" + secrets.token_hex(8)
        ticket = secrets.token_urlsafe(24)
        run = RunSpec(
            execution_id=exec_id,
            agent=spec.name,
            instructions=spec.instructions,
            message=message,
            model=spec.model,
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
            tools=spec.tools,
            mcp_servers=spec.mcp_servers,
            workspace=spec.workspace,
            output_schema=spec.output_schema,
            limits=limits_.effective(spec.limits, limits_.check(limits or {})),
        )
        model = spec.model or self.settings.llm.model
        extra: dict[str, Any] = {"via": via} if via else {}
        if trigger:  # what started it: "schedule NAME", "hook NAME" (server/triggers.py)
            extra["trigger"] = trigger
        if warnings:
            extra["warnings"] = json.dumps(warnings, ensure_ascii=False)
        # All or nothing: a record is never left PENDING without what its workflow needs (a full disk).
        with self.db.tx():
            if session is not None:
                _, run.turn = self.db.start_turn(
                    exec_id, session, agent_name or None, message, {"model": model, "ticket": ticket}
                )
                run.session = session
            else:
                self.db.create_execution(exec_id, spec.name, message, model)
            if history and session is None:
                extra["history"] = json.dumps(history, ensure_ascii=False)
                run.history = True
            self.db.update_execution(exec_id, spec=run.model_dump_json(), ticket=ticket, **extra)
            self.publish(
                exec_id, EventKind.PENDING, {"agent": spec.name, "session": session, "turn": run.turn}
            )
        # From here a worker that claims it first waits for the run id (claim()).
        self._starting[exec_id] = asyncio.Event()
        return exec_id, ticket

    async def start(self, exec_id: str, ticket: str) -> str | None:
        """Start the workflow of a record `make` wrote, then watch it. None when started; else why not (the
        record is then FAILED, saying so). After an API restart the workflow may have started already (only
        its run id was not written): it is then watched, never started twice."""
        from temporalio.common import WorkflowIDReusePolicy
        from temporalio.exceptions import WorkflowAlreadyStartedError

        started = self._starting.setdefault(exec_id, asyncio.Event())
        try:
            client = await self.client()
            handle = await client.start_workflow(
                WORKFLOW,
                ExecutionRef(execution_id=exec_id, ticket=ticket).model_dump(),
                id=exec_id,
                task_queue=TASK_QUEUE,
                # never a second run of an execution whose first one ended already
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )
            self.db.update_execution(exec_id, run_id=handle.result_run_id)
        except WorkflowAlreadyStartedError:
            log.info("%s had started before the API restarted: watching it", exec_id)
        except Exception as e:  # noqa: BLE001
            with contextlib.suppress(Exception):
                self._finish(exec_id, FAILED, error=f"The workflow could not be started: {e}")
            return str(e) or type(e).__name__
        finally:
            started.set()
            self._starting.pop(exec_id, None)
        self._watch(exec_id)
        return None

    async def cancel(self, exec_id: str) -> dict[str, Any]:
        rec = self.record(exec_id)
        if rec["state"] in TERMINAL:
            return rec
        self.db.update_execution(exec_id, cancel_requested=time.time())
        client = await self.client()
        try:
            await client.get_workflow_handle(exec_id).cancel()
        except Exception as e:  # noqa: BLE001 - already finished: the watcher records the outcome
            log.info("cancel %s: %s", exec_id, e)
        self.publish(exec_id, EventKind.CANCELLING, {})
        return self.record(exec_id)

    async def decide(
        self, exec_id: str, *, approve: bool, call_id: str | None, always: bool
    ) -> dict[str, Any]:
        """Answer a tool call waiting for approval (the oldest one when no call id is given): recorded
        here first, atomically (a call gets one decision: a second answer is refused, naming the first),
        then the workflow is woken to read it."""
        rec = self.record(exec_id)
        if rec["state"] in TERMINAL:
            raise StigmerError(
                f"Execution {exec_id} has ended ({rec['state']}): there is nothing left to approve.",
                hint=f"See it: stigmer execution get {exec_id}",
                code=ErrorCode.CONFLICT,
            )
        pending = self.db.pending_approvals(exec_id)
        chosen: dict[str, Any] | None
        if call_id:
            chosen = self.db.approval(exec_id, call_id)
            if chosen is not None and chosen["decision"]:
                raise _already(exec_id, chosen)
        else:
            chosen = pending[0] if pending else None
        if chosen is None:
            raise StigmerError(
                f"Execution {exec_id} has no tool call waiting for approval (state {rec['state']}).",
                hint=f"See it: stigmer execution get {exec_id}",
                code=ErrorCode.NOT_FOUND,
            )
        same_tool = [p["call_id"] for p in pending if always and p["tool"] == chosen["tool"]]
        calls = [chosen["call_id"], *[c for c in same_tool if c != chosen["call_id"]]]
        decided = self.db.decide_calls(exec_id, calls, "approved" if approve else "denied", always=always)
        if chosen["call_id"] not in decided:  # another answer won the race
            raise _already(exec_id, self.db.approval(exec_id, chosen["call_id"]) or chosen)
        for decided_id in decided:
            self.publish(
                exec_id,
                EventKind.APPROVAL,
                {"id": decided_id, "name": chosen["tool"], "approved": approve, "always": always},
            )
        if not self.db.pending_approvals(exec_id) and self.record(exec_id, messages=False)["state"] == (
            WAITING_APPROVAL
        ):
            self.db.update_execution(exec_id, state=IN_PROGRESS)
        await self._wake(exec_id)
        args = json.dumps(chosen["args"], ensure_ascii=False)[:200]
        return {
            **self.record(exec_id),
            "decided": f"{chosen['tool']}({args})" + (" (always)" if always else ""),
        }

    async def _wake(self, exec_id: str) -> None:
        try:
            client = await self.client()
            await client.get_workflow_handle(exec_id).signal(WAKE_SIGNAL)
        except Exception as e:  # noqa: BLE001 - the workflow reads decisions again when it resumes
            log.warning("could not wake %s: %s", exec_id, e)

    def record(self, exec_id: str, *, messages: bool = True) -> dict[str, Any]:
        row = self.db.get_execution(exec_id)
        if row is None:
            raise not_found(exec_id)
        row["output"] = _structured(row)
        for private in ("spec", "ticket", "run_id", "cancel_requested"):
            row.pop(private, None)
        if row.get("warnings"):
            row["warnings"] = json.loads(row["warnings"])
        if row.get("history"):  # the conversation the caller gave before the message (OpenAI endpoint)
            row["history"] = json.loads(row["history"])
        end = row["finished"] or (time.time() if row["state"] not in TERMINAL else None)
        row["duration"] = round(end - row["created"], 3) if end else None
        row["usage"] = {"input_tokens": row.pop("input_tokens"), "output_tokens": row.pop("output_tokens")}
        if messages:
            row["messages"] = self.db.messages(exec_id)
            row["approvals"] = self.db.pending_approvals(exec_id)
        return row

    def records(self, *, state: str | None, agent: str | None, limit: int) -> list[dict[str, Any]]:
        rows = self.db.list_executions(state=state, agent=agent, limit=limit)
        return [self.record(r["id"], messages=False) for r in rows]

    # -- the worker's side (authenticated by the worker token, then by the execution's ticket) -------------
    def _ticketed(self, exec_id: str, ticket: str) -> dict[str, Any]:
        row = self.db.get_execution(exec_id)
        if row is None or not row.get("ticket") or not same(ticket, row["ticket"]):
            log.warning(
                "refused a worker request for %s: its ticket is not this execution's (a workflow not "
                "started by Stigmer's API?)",
                exec_id[:80],
            )
            raise StigmerError(
                f"Execution {exec_id[:80]!r} was not started by this Stigmer server.",
                code=ErrorCode.ACCESS_DENIED,
            )
        return row

    async def claim(self, exec_id: str, req: ClaimRequest, run_id: str) -> RunSpec:
        """A worker starts running an execution: it shows the ticket from the workflow input and gets
        what to run. Only the workflow run that this API started may claim it."""
        row = self._ticketed(exec_id, req.ticket)
        if row["state"] in TERMINAL:
            raise StigmerError(f"Execution {exec_id} has already ended.", code=ErrorCode.CONFLICT)
        starting = self._starting.get(exec_id)
        if starting is not None and not row.get("run_id"):
            await asyncio.wait_for(starting.wait(), START_WAIT)
            row = self.db.get_execution(exec_id) or row
        if not row.get("run_id"):
            self.db.update_execution(exec_id, run_id=run_id)  # started before an API restart: first wins
        elif run_id != row["run_id"]:
            log.warning(
                "refused a claim of %s from Temporal run %s, not the one Stigmer started", exec_id, run_id
            )
            raise StigmerError(
                f"Execution {exec_id} belongs to another workflow run.", code=ErrorCode.ACCESS_DENIED
            )
        spec = RunSpec.model_validate_json(row["spec"])
        if spec.model and req.default_llm:
            return spec  # the agent names its model: the worker resolves it and says which LLM runs it
        first = row["started"] is None
        fields: dict[str, Any] = {
            "provider": req.provider,
            "model": req.model,
            "endpoint": req.endpoint,
            "worker": req.worker,
        }
        if first:
            fields.update(state=IN_PROGRESS, started=time.time())
        self.db.update_execution(exec_id, **fields)
        if first:
            self.publish(
                exec_id,
                EventKind.STARTED,
                {k: fields[k] for k in ("provider", "model", "endpoint", "worker")},
            )
        return spec

    def transcript(self, exec_id: str, ticket: str) -> list[dict[str, Any]]:
        """The conversation before this turn (completed turns of its session), for the worker's model."""
        row = self._ticketed(exec_id, ticket)
        if row.get("history"):
            return list(json.loads(row["history"]))
        if not row.get("session") or not row.get("turn"):
            return []
        return self.db.transcript(str(row["session"]), int(row["turn"]))

    # -- sessions -----------------------------------------------------------------------------------------
    def session(self, name: str, *, turns: bool = True) -> dict[str, Any]:
        check_session_name(name)
        row = self.db.get_session(name)
        if row is None:
            raise StigmerError(
                f"No session named {name!r}.",
                hint="See them: stigmer session list",
                code=ErrorCode.NOT_FOUND,
            )
        rows = self.db.session_turns(name)
        last = rows[-1] if rows else None
        out = {
            **row,
            "turns": len(rows),
            "last_execution": last["execution_id"] if last else None,
            "last_state": last["state"] if last else None,
        }
        if turns:
            out["turns"] = rows
        return out

    def sessions(self, agent: str | None = None) -> list[dict[str, Any]]:
        return [self.session(r["name"], turns=False) for r in self.db.list_sessions(agent)]

    def new_session(self, name: str, agent: str | None) -> dict[str, Any]:
        check_session_name(name)
        self.agent(agent or DEFAULT_AGENT)  # an agent that is not there: 404 now, not at the first turn
        if not self.db.create_session(name, agent or DEFAULT_AGENT):
            raise StigmerError(f"There is a session named {name!r} already.", code=ErrorCode.CONFLICT)
        return self.session(name, turns=False)

    def remove_session(self, name: str) -> None:
        self.session(name, turns=False)  # 404 for an unknown one
        self.db.delete_session(name)

    def fork(self, name: str, at: int | None, new: str | None) -> dict[str, Any]:
        """A new session with the first `at` turns of `name` (default: all of them); `name` is untouched."""
        count = self.session(name, turns=False)["turns"]
        at = count if at is None else at
        if not 1 <= at <= max(count, 0):
            raise StigmerError(
                f"Session {name!r} has no turn {at}: "
                + (f"choose 1 to {count}." if count else "it has no turns yet."),
                code=ErrorCode.INVALID_INPUT,
            )
        n = 1
        while new is None:
            candidate = f"{name[:56]}-fork-{n}"
            new = candidate if self.db.get_session(candidate) is None else None
            n += 1
        check_session_name(new)
        self.db.fork_session(name, at, new)
        return self.session(new, turns=False)

    def decisions(self, exec_id: str, ticket: str, call_ids: list[str]) -> list[Decision]:
        """What people decided, through this API, for these calls (undecided ones are left out)."""
        self._ticketed(exec_id, ticket)
        out = []
        for call_id in call_ids:
            a = self.db.approval(exec_id, call_id)
            if a is not None and a["decision"] in ("approved", "denied"):
                out.append(
                    Decision(
                        call_id=call_id,
                        tool=a["tool"],
                        approve=a["decision"] == "approved",
                        always=a["always"],
                    )
                )
        return out

    def ingest(
        self, exec_id: str, ticket: str, events: list[dict[str, Any]], batch: str | None = None
    ) -> int:
        """Events from the worker running the execution: stored, fanned out, and reflected in the record.
        Only the kinds a worker may send are taken; a batch sent twice (a resend after a lost answer) is
        taken once."""
        row = self._ticketed(exec_id, ticket)
        if row["state"] in TERMINAL:
            return 0  # a late batch from an attempt that lost: the outcome is already written
        if batch is not None and self.db.has_batch(exec_id, batch[:100]):
            return 0
        accepted: list[tuple[str, dict[str, Any]]] = []
        for event in events[:1000]:
            if not isinstance(event, dict):
                continue
            kind = str(event.get("type", ""))[:32]
            if kind not in WORKER_EVENTS:
                log.warning("refused a %r event for %s from a worker", kind, exec_id)
                continue
            data = {k: v for k, v in event.items() if k != "type"}
            attempt = data.get("attempt")
            if isinstance(attempt, int) and attempt > (row["attempts"] or 0):
                row["attempts"] = attempt
                self.db.update_execution(exec_id, attempts=attempt)
            left_out = data.get("turns_left_out")
            if kind == EventKind.NOTICE and isinstance(left_out, int) and not isinstance(left_out, bool):
                # the model could not be sent the whole conversation: the record says how much it missed
                self.db.update_execution(exec_id, turns_left_out=max(0, min(left_out, 1_000_000)))
            if kind == EventKind.APPROVAL_REQUIRED:
                self.db.ask_approval(
                    exec_id,
                    str(data.get("id", ""))[:200],
                    str(data.get("name", ""))[:200],
                    data.get("args") or {},
                )
                self.db.update_execution(exec_id, state=WAITING_APPROVAL)
            accepted.append((kind, data))
        if accepted:
            self.db.add_events(exec_id, accepted, batch=batch[:100] if batch else None)
            self._notify(exec_id)
        return len(accepted)

    # -- events -------------------------------------------------------------------------------------------
    def publish(self, exec_id: str, kind: str, data: dict[str, Any]) -> int:
        seq = self.db.add_event(exec_id, str(kind), data)
        self._notify(exec_id)
        return seq

    def _notify(self, exec_id: str) -> None:
        cond = self._changed.get(exec_id)
        if cond is not None:
            asyncio.get_running_loop().create_task(_notify(cond))

    async def stream(self, exec_id: str, after: int = 0) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
        """Every event after `after`, stored ones first, then live ones, until the execution ends."""
        if self.db.get_execution(exec_id) is None:
            raise not_found(exec_id)
        cond = self._changed.setdefault(exec_id, asyncio.Condition())
        try:
            while True:
                for seq, kind, data in self.db.events(exec_id, after):
                    after = seq
                    yield seq, kind, data
                    if kind in END_EVENTS:
                        return
                async with cond:
                    try:
                        await asyncio.wait_for(cond.wait(), timeout=15)
                    except TimeoutError:
                        yield 0, "ping", {}  # keeps proxies and idle clients from closing the stream
        finally:
            row = self.db.get_execution(exec_id)
            if row is None or row["state"] in TERMINAL:
                self._changed.pop(exec_id, None)  # no memory kept for executions that ended

    # -- outcome ------------------------------------------------------------------------------------------
    def _watch(self, exec_id: str) -> None:
        if exec_id not in self._watchers:
            self._watchers[exec_id] = asyncio.get_running_loop().create_task(self._await_result(exec_id))

    async def _await_result(self, exec_id: str) -> None:
        """Await the workflow's outcome, then write it. Both retry until they succeed: Temporal may be
        restarting, and the disk may be full (the record is written once there is space again)."""
        try:
            write = await self._outcome(exec_id)
            delay = 1.0
            while True:
                try:
                    write()
                    return
                except Exception as e:  # noqa: BLE001 - a full disk, a locked database: try again
                    log.warning("could not record the outcome of %s (retrying): %s", exec_id, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        finally:
            self._watchers.pop(exec_id, None)

    async def _outcome(self, exec_id: str) -> Callable[[], None]:
        """What to write once the workflow ended (a function, so that writing can be retried alone)."""
        from temporalio.client import WorkflowFailureError
        from temporalio.exceptions import CancelledError
        from temporalio.service import RPCError, RPCStatusCode

        delay = 1.0
        while True:
            try:
                client = await self.client()
                run_id = (self.db.get_execution(exec_id) or {}).get("run_id")
                handle = client.get_workflow_handle(exec_id, run_id=run_id)
                out = await handle.result(follow_runs=False)
                break
            except WorkflowFailureError as e:
                attempts = await _attempts(handle)
                if not isinstance(e.cause, CancelledError):
                    reason = _reason(e)
                    produced = _limit_reached(e)
                    if produced is not None:  # a limit was crossed and going on denied: keep what it made
                        return lambda: self._finish_limited(exec_id, reason, produced, attempts)
                    return lambda: self._finish(exec_id, FAILED, error=reason, **attempts)
                if (self.db.get_execution(exec_id) or {}).get("cancel_requested"):
                    return lambda: self._finish(exec_id, CANCELLED, error="Cancelled.", **attempts)
                log.warning("%s was cancelled through Temporal, not through Stigmer's API", exec_id)
                error = "Cancelled through Temporal, not through Stigmer."
                return lambda: self._finish(exec_id, CANCELLED, error=error, **attempts)
            except RPCError as e:
                if e.status == RPCStatusCode.NOT_FOUND:
                    gone = (
                        "Its workflow is gone from Temporal (its history was removed or Temporal's database "
                        "was replaced), so its outcome cannot be known."
                    )
                    return lambda: self._finish(exec_id, FAILED, error=gone)
                log.warning("waiting for %s: %s", exec_id, e)
            except StigmerError as e:
                log.warning("waiting for %s: %s", exec_id, e.message)
            except Exception as e:  # noqa: BLE001 - Temporal unreachable for a moment: keep watching
                log.warning("waiting for %s: %s", exec_id, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        # The attempts are known from the streamed events; only an answer that streamed nothing needs
        # Temporal's history for them (it costs a round trip before the outcome is published).
        known = (self.db.get_execution(exec_id) or {}).get("attempts") or 0
        attempts = {} if known else await _attempts(handle)
        return lambda: self._complete(exec_id, out if isinstance(out, dict) else {}, attempts)

    def _complete(self, exec_id: str, out: dict[str, Any], attempts: dict[str, int]) -> None:
        self.db.set_messages(exec_id, list(out.get("messages") or []))
        self._finish(
            exec_id,
            COMPLETED,
            **attempts,
            output=str(out.get("text", "")),
            provider=out.get("provider"),
            model=out.get("model"),
            endpoint=out.get("endpoint"),
            input_tokens=out.get("input_tokens"),
            output_tokens=out.get("output_tokens"),
            requests=out.get("requests") or 0,
            tool_calls=out.get("tool_calls") or 0,
        )

    def _finish_limited(
        self, exec_id: str, reason: str, messages: list[dict[str, Any]], attempts: dict[str, int]
    ) -> None:
        if messages:
            self.db.set_messages(exec_id, messages)
        self._finish(exec_id, FAILED, error=reason, error_code="limit_reached", **attempts)

    def _finish(self, exec_id: str, state: str, **fields: Any) -> None:
        row = self.db.get_execution(exec_id) or {}
        self.db.update_execution(exec_id, state=state, finished=time.time(), **fields)
        self.db.close_approvals(exec_id, "closed")  # nothing waits on an execution that ended
        if state != COMPLETED and not self.db.messages(exec_id) and row:
            self.db.set_messages(exec_id, [{"role": "user", "content": row.get("message", "")}])
        record = self.record(exec_id)
        self.publish(exec_id, state.lower(), {"record": record})


def _structured(row: dict[str, Any]) -> Any:
    """The output as the record shows it: the object itself for an agent with an output schema (the row
    keeps its JSON text, which the OpenAI-compatible endpoint and transcripts use as the answer)."""
    output = row.get("output")
    spec = row.get("spec") or ""
    if not isinstance(output, str) or not output.startswith("{") or '"output_schema":{' not in spec:
        return output
    try:
        return json.loads(output)
    except ValueError:
        return output


def _limit_reached(e: BaseException) -> list[dict[str, Any]] | None:
    """The messages an execution produced before a limit stopped it (see runner/limits.py), or None
    when it failed for another reason."""
    from temporalio.exceptions import ApplicationError

    cause = getattr(e, "cause", None)
    if not isinstance(cause, ApplicationError) or cause.type != "limit_reached":
        return None
    details = cause.details[0] if cause.details else {}
    messages = details.get("messages") if isinstance(details, dict) else None
    return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []


SESSION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_session_name(name: str) -> None:
    if not isinstance(name, str) or not SESSION_NAME.fullmatch(name):
        raise StigmerError(
            f"{str(name)[:80]!r} is not a session name: use letters, digits, - and _ (at most 64).",
            code=ErrorCode.INVALID_INPUT,
        )


def _already(exec_id: str, approval: dict[str, Any]) -> StigmerError:
    return StigmerError(
        f"That tool call of {exec_id} was already answered: {approval.get('decision') or 'decided'}"
        + (" (always)" if approval.get("always") else "")
        + ".",
        hint=f"See it: stigmer execution get {exec_id}",
        code=ErrorCode.CONFLICT,
    )


async def _attempts(handle: Any) -> dict[str, int]:
    """How many tries the model calls took, from Temporal's history (each activity's last attempt)."""
    most = 0
    try:
        async for event in handle.fetch_history_events():
            if event.HasField("activity_task_started_event_attributes"):
                most = max(most, int(event.activity_task_started_event_attributes.attempt))
    except Exception as e:  # noqa: BLE001 - a nicety: the outcome is recorded without it
        log.info("history of %s: %s", handle.id, e)
        return {}
    return {"attempts": most} if most else {}


async def _notify(cond: asyncio.Condition) -> None:
    async with cond:
        cond.notify_all()


def _reason(e: BaseException) -> str:
    """The most telling message of a Temporal failure chain: ours when the workflow wrote one."""
    messages = []
    while e is not None:
        text = str(getattr(e, "message", "") or "")
        if text:
            messages.append(text)
        e = e.__cause__  # type: ignore[assignment]
    return next((m for m in messages if m.startswith("The LLM at")), messages[-1] if messages else "failed")

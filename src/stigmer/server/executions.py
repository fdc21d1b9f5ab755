"""Executions, as the API runs them: a record in SQLite (PENDING -> IN_PROGRESS -> COMPLETED | FAILED |
CANCELLED), a Temporal workflow doing the work (workflow id = execution id), and a stream of events.

The worker sends events as they happen (POST .../events); they are stored with a sequence number and
fanned out to every listener, so a client that connects late, or reconnects with Last-Event-ID, gets
what it missed first. The outcome comes from Temporal itself: a watcher awaits each workflow's result
(also after the API restarts) and writes the final record, so a failed activity can never leave a
client waiting on a stream that will not end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from stigmer.agents.spec import BUILTIN, DEFAULT_AGENT, AgentSpec, from_dict
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.server.db import TERMINAL, Database
from stigmer.server.specs import TASK_QUEUE

log = logging.getLogger(__name__)

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "PENDING",
    "IN_PROGRESS",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
)
WAITING_APPROVAL = "WAITING_APPROVAL"
MAX_MESSAGE = 100_000
WORKFLOW = "stigmer.AgentExecution"  # the runner's workflow, started by name: the API imports no agent code


def not_found(exec_id: str) -> StigmerError:
    return StigmerError(
        f"No execution {exec_id[:80]!r}.",
        hint="See recent ones: stigmer execution list",
        code=ErrorCode.NOT_FOUND,
    )


class Executions:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self._client: Any = None
        self._connecting: asyncio.Task[Any] | None = None
        self._changed: dict[str, asyncio.Condition] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}

    # -- Temporal -----------------------------------------------------------------------------------------
    async def client(self) -> Any:
        """The Temporal client, connected on first use (Temporal may start after the API)."""
        if self._client is not None:
            return self._client
        from temporalio.client import Client

        t = self.settings.temporal
        deadline = time.monotonic() + 30
        while True:
            try:
                self._client = await Client.connect(t.address, namespace=t.namespace)
                return self._client
            except Exception as e:  # noqa: BLE001 - temporalio raises RuntimeError for all of these
                if time.monotonic() > deadline:
                    raise StigmerError(
                        f"Temporal at {t.address} cannot be reached: {e}.",
                        hint="See the server's status: stigmer server status",
                        code=ErrorCode.NOT_RUNNING,
                    ) from None
                await asyncio.sleep(0.5)

    async def resume(self) -> None:
        """After a start: watch every execution that had not finished (the API may have restarted)."""
        for exec_id in self.db.unfinished():
            self._watch(exec_id)

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
    async def create(self, agent_name: str, message: str) -> dict[str, Any]:
        if not isinstance(message, str) or not message.strip():
            raise StigmerError(
                "The message is empty.", hint='Give one: stigmer run -m "..."', code=ErrorCode.INVALID_INPUT
            )
        if len(message) > MAX_MESSAGE:
            raise StigmerError(
                f"The message is too long ({len(message)} characters; at most {MAX_MESSAGE}).",
                code=ErrorCode.INVALID_INPUT,
            )
        spec = self.agent(agent_name)
        client = await self.client()
        exec_id = "ex-" + secrets.token_hex(8)
        self.db.create_execution(exec_id, spec.name, message, spec.model or self.settings.llm.model)
        self.publish(exec_id, "pending", {"agent": spec.name})
        payload = {
            "execution_id": exec_id,
            "agent": spec.name,
            "instructions": spec.instructions,
            "message": message,
            "model": spec.model,
            "temperature": spec.temperature,
            "max_tokens": spec.max_tokens,
            "tools": spec.tools,
            "mcp_servers": spec.mcp_servers,
            "workspace": spec.workspace,
        }
        try:
            await client.start_workflow(WORKFLOW, payload, id=exec_id, task_queue=TASK_QUEUE)
        except Exception as e:  # noqa: BLE001
            self._finish(exec_id, FAILED, error=f"The workflow could not be started: {e}")
            raise StigmerError(
                f"The execution could not be started: {e}.",
                code=ErrorCode.NOT_RUNNING,
                hint="stigmer server status",
            ) from None
        self._watch(exec_id)
        return self.record(exec_id)

    async def cancel(self, exec_id: str) -> dict[str, Any]:
        rec = self.record(exec_id)
        if rec["state"] in TERMINAL:
            return rec
        client = await self.client()
        try:
            await client.get_workflow_handle(exec_id).cancel()
        except Exception as e:  # noqa: BLE001 - already finished: the watcher records the outcome
            log.info("cancel %s: %s", exec_id, e)
        self.publish(exec_id, "cancelling", {})
        return self.record(exec_id)

    async def decide(
        self, exec_id: str, *, approve: bool, call_id: str | None, always: bool
    ) -> dict[str, Any]:
        """Answer a tool call waiting for approval (the oldest one when no call id is given)."""
        rec = self.record(exec_id)
        pending = self.db.pending_approvals(exec_id)
        if call_id:
            chosen = next((p for p in pending if p["call_id"] == call_id), None)
        else:
            chosen = pending[0] if pending else None
        if chosen is None:
            raise StigmerError(
                f"Execution {exec_id} has no tool call waiting for approval (state {rec['state']}).",
                hint=f"See it: stigmer execution get {exec_id}",
                code=ErrorCode.NOT_FOUND,
            )
        client = await self.client()
        decision = {
            "call_id": chosen["call_id"],
            "tool": chosen["tool"],
            "approve": approve,
            "always": always,
        }
        await client.get_workflow_handle(exec_id).signal("decide", decision)
        same = [p for p in pending if always and p["tool"] == chosen["tool"]] or [chosen]
        for p in same:
            self.db.decide(exec_id, p["call_id"], "approved" if approve else "denied")
        args = json.dumps(chosen["args"], ensure_ascii=False)[:200]
        return {
            **self.record(exec_id),
            "decided": f"{chosen['tool']}({args})" + (" (always)" if always else ""),
        }

    def record(self, exec_id: str, *, messages: bool = True) -> dict[str, Any]:
        row = self.db.get_execution(exec_id)
        if row is None:
            raise not_found(exec_id)
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

    # -- events -------------------------------------------------------------------------------------------
    def publish(self, exec_id: str, kind: str, data: dict[str, Any]) -> int:
        seq = self.db.add_event(exec_id, kind, data)
        cond = self._changed.get(exec_id)
        if cond is not None:
            asyncio.get_running_loop().create_task(_notify(cond))
        return seq

    def ingest(self, exec_id: str, events: list[dict[str, Any]]) -> None:
        """Events from the worker: stored, fanned out, and reflected in the record."""
        row = self.db.get_execution(exec_id)
        if row is None:
            raise not_found(exec_id)
        if row["state"] in TERMINAL:
            return  # a late batch from an attempt that lost: the outcome is already written
        for event in events[:1000]:
            if not isinstance(event, dict):
                continue
            kind = str(event.get("type", ""))[:32]
            data = {k: v for k, v in event.items() if k != "type"}
            attempt = data.get("attempt")
            if isinstance(attempt, int) and attempt > (row["attempts"] or 0):
                row["attempts"] = attempt
                self.db.update_execution(exec_id, attempts=attempt)
            if kind == "started":
                self.db.update_execution(
                    exec_id,
                    state=IN_PROGRESS,
                    started=row["started"] or time.time(),
                    provider=str(data.get("provider", "")),
                    model=str(data.get("model", "")),
                    endpoint=str(data.get("endpoint", "")),
                    worker=str(data.get("worker", ""))[:200],
                )
            elif kind == "approval_required":
                self.db.ask_approval(
                    exec_id, str(data.get("id", "")), str(data.get("name", "")), data.get("args") or {}
                )
                self.db.update_execution(exec_id, state=WAITING_APPROVAL)
            elif kind == "approval":
                self.db.decide(
                    exec_id, str(data.get("id", "")), "approved" if data.get("approved") else "denied"
                )
                if not self.db.pending_approvals(exec_id):
                    self.db.update_execution(exec_id, state=IN_PROGRESS)
            self.publish(exec_id, kind, data)

    async def stream(self, exec_id: str, after: int = 0) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
        """Every event after `after`, stored ones first, then live ones, until the execution ends."""
        if self.db.get_execution(exec_id) is None:
            raise not_found(exec_id)
        cond = self._changed.setdefault(exec_id, asyncio.Condition())
        while True:
            for seq, kind, data in self.db.events(exec_id, after):
                after = seq
                yield seq, kind, data
                if kind in ("completed", "failed", "cancelled"):
                    return
            async with cond:
                try:
                    await asyncio.wait_for(cond.wait(), timeout=15)
                except TimeoutError:
                    yield 0, "ping", {}  # keeps proxies and idle clients from closing the stream

    # -- outcome ------------------------------------------------------------------------------------------
    def _watch(self, exec_id: str) -> None:
        if exec_id not in self._watchers:
            self._watchers[exec_id] = asyncio.get_running_loop().create_task(self._await_result(exec_id))

    async def _await_result(self, exec_id: str) -> None:
        from temporalio.client import WorkflowFailureError
        from temporalio.exceptions import CancelledError

        try:
            client = await self.client()
            handle = client.get_workflow_handle(exec_id)
            while True:
                try:
                    out = await handle.result()
                    break
                except WorkflowFailureError as e:
                    attempts = await _attempts(handle)
                    if isinstance(e.cause, CancelledError):
                        self._finish(exec_id, CANCELLED, error="Cancelled.", **attempts)
                    else:
                        self._finish(exec_id, FAILED, error=_reason(e), **attempts)
                    return
                except Exception as e:  # noqa: BLE001 - Temporal unreachable for a moment: keep watching
                    log.warning("waiting for %s: %s", exec_id, e)
                    await asyncio.sleep(1)
            # The attempts are known from the streamed events; only an answer that streamed nothing needs
            # Temporal's history for them (it costs a round trip before the outcome is published).
            known = (self.db.get_execution(exec_id) or {}).get("attempts") or 0
            attempts = {} if known else await _attempts(handle)
            self._complete(exec_id, out if isinstance(out, dict) else {}, attempts)
        finally:
            self._watchers.pop(exec_id, None)

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

    def _finish(self, exec_id: str, state: str, **fields: Any) -> None:
        row = self.db.get_execution(exec_id) or {}
        self.db.update_execution(exec_id, state=state, finished=time.time(), **fields)
        if state != COMPLETED and not self.db.messages(exec_id) and row:
            self.db.set_messages(exec_id, [{"role": "user", "content": row.get("message", "")}])
        record = self.record(exec_id)
        self.publish(exec_id, state.lower(), {"record": record})


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

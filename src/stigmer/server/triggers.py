"""Agents that run on their own: schedules (Temporal Schedules) and signed webhooks. Each fire or delivery
becomes an ordinary execution made by the API (Executions.create), whose record says what started it
(`trigger`: "schedule NAME" or "hook NAME").

Trust (see executions/contract.py): a schedule lives in Temporal as a real Schedule whose action starts a
tiny "fire" workflow (runner/fire.py) with only the schedule's name. Its one activity asks the API, with
the worker token, to fire schedule NAME; what to run (agent, message, session) comes from this API's own
database, never from Temporal. A fire is recorded under its Temporal workflow id (unique per scheduled
time), so a retried activity fires once. A fire workflow started by hand in Temporal can at most run a
schedule as it is stored (what `stigmer schedule run` does); one for a name with no schedule runs nothing.

A webhook is authenticated only by the HMAC-SHA256 of its raw body under the hook's secret (GitHub's
X-Hub-Signature-256). The secret is an HMAC key, so it is kept as it is, in the 0600 database, and shown
once when made.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from datetime import timedelta
from typing import Any

from stigmer.agents.spec import NAME
from stigmer.errors import ErrorCode, StigmerError
from stigmer.server.db import Database

log = logging.getLogger(__name__)

SCHEDULE_PREFIX = "stigmer-schedule-"  # the Temporal schedule id of schedule NAME
FIRE_WORKFLOW = "stigmer.ScheduleFire"
FIRE_ID_PREFIX = "stigmer-fire-"
OVERLAPS = ("skip", "buffer", "cancel")
HOOK_PREFIX = "/hooks/"
MAX_HOOK_BODY = 1024 * 1024
MIN_EVERY, MAX_EVERY = 1, 366 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:(\d+)([smhd]))+")


def _invalid(message: str, hint: str = "") -> StigmerError:
    return StigmerError(message, hint=hint, code=ErrorCode.INVALID_INPUT)


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _invalid(
            f"{str(name)[:80]!r} is not a {what} name: use letters, digits, - and _ (at most 63), "
            "starting with a letter or digit."
        )
    return name


# -- schedules: validation ---------------------------------------------------------------------------------
def parse_every(text: Any) -> int:
    """ "30s", "10m", "1h30m", "1d" -> seconds (1 s to 366 d)."""
    if not isinstance(text, str) or not _DURATION.fullmatch(text.strip().lower()):
        raise _invalid(
            f"{str(text)[:40]!r} is not a duration.",
            hint='Use a number and a unit: "30s", "10m", "2h", "1d", "1h30m".',
        )
    total = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", text.strip().lower()))
    if not MIN_EVERY <= total <= MAX_EVERY:
        raise _invalid(f"--every {text} is out of range: from 1s to 366d.")
    return total


_CRON_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)},
    ),
    ("day of week", 0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
)
_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def check_cron(expr: Any) -> str:
    """A standard 5-field cron expression (or a macro such as @daily), checked here so the error names the
    field; Temporal parses it again."""
    if not isinstance(expr, str) or not expr.strip():
        raise _invalid("The cron expression is empty.", hint='For example: --cron "0 9 * * 1-5"')
    text = expr.strip()
    if text.lower() in _CRON_MACROS:
        return text.lower()
    fields = text.split()
    if len(fields) != 5:
        raise _invalid(
            f"{text[:80]!r} is not a cron expression: it needs 5 fields (minute hour day-of-month month "
            f"day-of-week), it has {len(fields)}.",
            hint='For example: --cron "0 9 * * 1-5" (9:00 on weekdays)',
        )
    for value, (what, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for part in value.lower().split(","):
            _check_cron_part(part, what, low, high, names, text)
    return text


def _check_cron_part(part: str, what: str, low: int, high: int, names: dict[str, int], expr: str) -> None:
    def bad(why: str) -> StigmerError:
        return _invalid(
            f"Bad cron expression {expr[:80]!r}: the {what} field {why}.",
            hint=f"The {what} is *, a number from {low} to {high}, a range a-b, a list a,b or a step */n.",
        )

    def number(s: str) -> int:
        if s in names:
            return names[s]
        if not s.isdigit():
            raise bad(f"has {s[:20]!r}, not a number")
        n = int(s)
        if not low <= n <= high:
            raise bad(f"has {n}, outside {low}-{high}")
        return n

    base, slash, step = part.partition("/")
    if slash and (not step.isdigit() or int(step) == 0):
        raise bad(f"has the step {step[:20]!r}, not a positive number")
    if base == "*":
        return
    first, dash, last = base.partition("-")
    if dash:
        if number(first) > number(last):
            raise bad(f"has the range {base[:20]}, which ends before it starts")
    else:
        number(first)


def check_timezone(tz: Any) -> str:
    import zoneinfo

    if not isinstance(tz, str) or not tz or len(tz) > 64:
        raise _invalid("The time zone is empty.", hint="For example: --timezone Europe/Paris")
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _invalid(
            f"{tz[:64]!r} is not a time zone.",
            hint="Use an IANA name such as Europe/Paris, America/New_York or UTC.",
        ) from None
    return tz


def parse_schedule(body: dict[str, Any]) -> dict[str, Any]:
    """A POST /v1/schedules body, each field checked, or a 400 naming it."""
    allowed = {"name", "agent", "message", "session", "every", "cron", "timezone", "overlap"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _invalid(f"Unknown field {unknown[0][:40]!r}: a schedule has {', '.join(sorted(allowed))}.")
    name = check_name(body.get("name"), "schedule")
    agent = check_name(body.get("agent"), "agent")
    message = body.get("message")
    if not isinstance(message, str) or not message.strip():
        raise _invalid(
            "The message is empty.", hint='Give one: stigmer schedule add NAME --agent A --every 1h -m "..."'
        )
    session = body.get("session")
    if session is not None:
        from stigmer.server.executions import check_session_name

        check_session_name(session)
    every, cron = body.get("every"), body.get("cron")
    if (every is None) == (cron is None):
        raise _invalid("A schedule needs one of `every` (a duration) or `cron` (an expression).")
    overlap = body.get("overlap") or "skip"
    if overlap not in OVERLAPS:
        raise _invalid(f"`overlap` is one of {', '.join(OVERLAPS)}, not {str(overlap)[:20]!r}.")
    tz = body.get("timezone")
    return {
        "name": name,
        "agent": agent,
        "message": message,
        "session": session,
        "every": parse_every(every) if every is not None else None,
        "cron": check_cron(cron) if cron is not None else None,
        "timezone": check_timezone(tz) if tz is not None else None,
        "overlap": overlap,
    }


# -- webhooks: signature and template ----------------------------------------------------------------------
def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode("latin-1", "replace"))


_FIELD = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")


def fill(template: str, data: Any) -> tuple[str, list[str]]:
    """The template with {{a.b}} replaced from the JSON body; missing fields are left empty, each named
    in a warning."""
    missing: list[str] = []

    def value(match: re.Match[str]) -> str:
        node: Any = data
        for key in match[1].split("."):
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                missing.append(match[1])
                return ""
        if node is None:
            return ""
        return node if isinstance(node, str) else json.dumps(node, ensure_ascii=False)

    return _FIELD.sub(value, template), missing


# -- the records -------------------------------------------------------------------------------------------
class Triggers:
    """Schedules and hooks: their records here, the schedules also in Temporal."""

    def __init__(self, ex: Any) -> None:
        self.ex = ex  # server/executions.py's Executions
        self.db: Database = ex.db
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock

    # -- schedules -----------------------------------------------------------------------------------------
    def _row(self, name: str) -> dict[str, Any]:
        rows = self.db.query("SELECT * FROM schedules WHERE name = ?", name)
        if not rows:
            raise StigmerError(
                f"No schedule named {name[:80]!r}.",
                hint="See them: stigmer schedule list",
                code=ErrorCode.NOT_FOUND,
            )
        return dict(rows[0])

    async def _handle(self, name: str) -> Any:
        client = await self.ex.client()
        return client.get_schedule_handle(SCHEDULE_PREFIX + name)

    async def add_schedule(self, body: dict[str, Any]) -> dict[str, Any]:
        from temporalio.client import (
            Schedule,
            ScheduleActionStartWorkflow,
            ScheduleAlreadyRunningError,
            ScheduleIntervalSpec,
            ScheduleOverlapPolicy,
            SchedulePolicy,
            ScheduleSpec,
        )

        from stigmer.executions.contract import TASK_QUEUE

        s = parse_schedule(body)
        self.ex.agent(s["agent"])  # an unknown agent is a 404 now, not a failure at the first fire
        if self.db.query("SELECT 1 FROM schedules WHERE name = ?", s["name"]):
            raise StigmerError(
                f"There is already a schedule named {s['name']}.",
                hint=f"Remove it first: stigmer schedule rm {s['name']}",
                code=ErrorCode.CONFLICT,
            )
        overlap = {
            "skip": ScheduleOverlapPolicy.SKIP,
            "buffer": ScheduleOverlapPolicy.BUFFER_ONE,
            "cancel": ScheduleOverlapPolicy.CANCEL_OTHER,
        }[s["overlap"]]
        spec = ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=s["every"]))] if s["every"] else [],
            cron_expressions=[s["cron"]] if s["cron"] else [],
            time_zone_name=s["timezone"],
        )
        schedule = Schedule(
            action=ScheduleActionStartWorkflow(
                FIRE_WORKFLOW, {"schedule": s["name"]}, id=FIRE_ID_PREFIX + s["name"], task_queue=TASK_QUEUE
            ),
            spec=spec,
            # fires missed while the machine slept: the last one within a day runs on waking (skip: one)
            policy=SchedulePolicy(overlap=overlap, catchup_window=timedelta(days=1)),
        )
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO schedules (name, agent, message, session, every, cron, timezone, overlap, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (s["name"], s["agent"], s["message"], s["session"], s["every"], s["cron"], s["timezone"],
                 s["overlap"], time.time()),
            )  # fmt: skip
        client = await self.ex.client()
        try:
            await client.create_schedule(SCHEDULE_PREFIX + s["name"], schedule)
        except ScheduleAlreadyRunningError:  # left by a removal that did not reach Temporal: replace it
            handle = client.get_schedule_handle(SCHEDULE_PREFIX + s["name"])
            await handle.delete()
            await client.create_schedule(SCHEDULE_PREFIX + s["name"], schedule)
        except Exception as e:
            with self.db.tx() as c:
                c.execute("DELETE FROM schedules WHERE name = ?", (s["name"],))
            raise _invalid(f"Temporal refused the schedule: {e}.") from None
        return await self.schedule(s["name"])

    async def schedule(self, name: str) -> dict[str, Any]:
        row = self._row(name)
        out: dict[str, Any] = {
            k: row[k]
            for k in (
                "name",
                "agent",
                "message",
                "session",
                "every",
                "cron",
                "timezone",
                "overlap",
                "created",
            )
        }
        out.update(
            last_fire=row["last_fire"], last_execution=None, last_state=None, last_error=row["last_error"]
        )
        if row["last_execution"]:
            rec = self.db.get_execution(row["last_execution"]) or {}
            out["last_execution"] = row["last_execution"]
            out["last_state"] = rec.get("state")
            if rec.get("state") == "FAILED" and rec.get("error"):
                out["last_error"] = rec["error"]
        out["next"], out["paused"] = [], False
        try:
            desc = await asyncio.wait_for((await self._handle(name)).describe(), 10)
            out["next"] = [t.timestamp() for t in desc.info.next_action_times[:3]]
            out["paused"] = bool(desc.schedule.state.paused)
            out["note"] = desc.schedule.state.note or None
        except Exception as e:  # noqa: BLE001 - the record still shows; say why Temporal did not answer
            out["temporal_error"] = str(e)[:200]
        return out

    async def schedules(self) -> list[dict[str, Any]]:
        names = [r["name"] for r in self.db.query("SELECT name FROM schedules ORDER BY name")]
        return list(await asyncio.gather(*(self.schedule(n) for n in names)))

    async def pause(self, name: str, paused: bool) -> dict[str, Any]:
        self._row(name)
        handle = await self._handle(name)
        if paused:
            await handle.pause(note="paused with stigmer schedule pause")
        else:
            await handle.unpause(note="resumed with stigmer schedule resume")
        return await self.schedule(name)

    async def run_now(self, name: str) -> dict[str, Any]:
        """Fire now, through Temporal like any fire (so the overlap policy applies)."""
        self._row(name)
        await (await self._handle(name)).trigger()
        return await self.schedule(name)

    async def remove_schedule(self, name: str) -> None:
        self._row(name)
        try:
            await (await self._handle(name)).delete()
        except Exception as e:  # noqa: BLE001 - gone from Temporal already: remove the record anyway
            log.info("delete schedule %s: %s", name, e)
        with self.db.tx() as c:
            c.execute("DELETE FROM schedule_fires WHERE schedule = ?", (name,))
            c.execute("DELETE FROM schedules WHERE name = ?", (name,))

    async def fire(self, name: str, fire_id: Any) -> dict[str, Any]:
        """A fire workflow asks (worker token): run schedule NAME once for this fire. Repeats answer with
        the same execution; an agent that is gone makes a FAILED execution saying so."""
        if (
            not isinstance(fire_id, str)
            or not fire_id.startswith(FIRE_ID_PREFIX + name + "-")
            or len(fire_id) > 200
        ):
            raise _invalid(f"{str(fire_id)[:80]!r} is not a fire of schedule {name[:80]!r}.")
        async with self._lock(("schedule", name + "\0" + fire_id)):
            done = self.db.query(
                "SELECT execution_id FROM schedule_fires WHERE schedule = ? AND fire_id = ?", name, fire_id
            )
            if done:
                return {"execution_id": done[0]["execution_id"], "repeat": True}
            row = self._row(name)
            trigger = f"schedule {name}"
            try:
                rec = await self.ex.create(
                    row["agent"], row["message"], session=row["session"], trigger=trigger
                )
                exec_id, error = rec["id"], None
            except StigmerError as e:
                if e.code is not ErrorCode.NOT_FOUND and e.code is not ErrorCode.CONFLICT:
                    raise  # Temporal or the disk: the activity retries
                exec_id, error = self._failed(row["agent"], row["message"], trigger, e), e.message
            now = time.time()
            with self.db.tx() as c:
                c.execute(
                    "INSERT INTO schedule_fires (schedule, fire_id, execution_id, created) VALUES (?, ?, ?, ?)",
                    (name, fire_id, exec_id, now),
                )
                c.execute(
                    "UPDATE schedules SET last_fire = ?, last_execution = ?, last_error = ? WHERE name = ?",
                    (now, exec_id, error, name),
                )
            return {"execution_id": exec_id, "repeat": False, "error": error}

    def _failed(self, agent: str, message: str, trigger: str, e: StigmerError) -> str:
        exec_id = "ex-" + secrets.token_hex(8)
        self.db.create_execution(exec_id, agent, message, None)
        self.db.update_execution(
            exec_id, state="FAILED", finished=time.time(), trigger=trigger,
            error=f"The {trigger} could not start: {e.message}" + (f" {e.hint}" if e.hint else ""),
        )  # fmt: skip
        return exec_id

    def fired_state(self, name: str, exec_id: str) -> str:
        """The state of an execution this schedule started (the fire workflow waits for it to end)."""
        rows = self.db.query(
            "SELECT 1 FROM schedule_fires WHERE schedule = ? AND execution_id = ?", name, exec_id
        )
        rec = self.db.get_execution(exec_id) if rows else None
        if rec is None:
            raise StigmerError(
                f"Schedule {name[:80]} did not start {exec_id[:80]}.", code=ErrorCode.NOT_FOUND
            )
        return str(rec["state"])

    async def cancel_fired(self, name: str, exec_id: str) -> None:
        self.fired_state(name, exec_id)
        await self.ex.cancel(exec_id)

    def summary(self) -> dict[str, Any]:
        rows = self.db.query("SELECT count(*) AS n FROM schedules")
        return {"count": int(rows[0]["n"])}

    # -- hooks ---------------------------------------------------------------------------------------------
    def _hook(self, name: str) -> dict[str, Any]:
        rows = self.db.query("SELECT * FROM hooks WHERE name = ?", name)
        if not rows:
            raise StigmerError(
                f"No hook named {name[:80]!r}.", hint="See them: stigmer hook list", code=ErrorCode.NOT_FOUND
            )
        return dict(rows[0])

    @staticmethod
    def _public(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k != "secret"}

    def add_hook(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        allowed = {"name", "agent", "template", "session"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise _invalid(f"Unknown field {unknown[0][:40]!r}: a hook has {', '.join(sorted(allowed))}.")
        name = check_name(body.get("name"), "hook")
        agent = check_name(body.get("agent"), "agent")
        template = body.get("template")
        if template is not None and (
            not isinstance(template, str) or not template.strip() or len(template) > 10_000
        ):
            raise _invalid(
                "`template` must be a text (at most 10,000 characters) with {{fields}} of the JSON body."
            )
        session = body.get("session")
        if session is not None:
            from stigmer.server.executions import check_session_name

            check_session_name(session)
        self.ex.agent(agent)
        secret = secrets.token_hex(32)
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM hooks WHERE name = ?", (name,)).fetchone():
                raise StigmerError(
                    f"There is already a hook named {name}.",
                    hint=f"Remove it first (stigmer hook rm {name}), or get a new secret: stigmer hook rotate {name}",
                    code=ErrorCode.CONFLICT,
                )
            c.execute(
                "INSERT INTO hooks (name, agent, template, session, secret, created) VALUES (?, ?, ?, ?, ?, ?)",
                (name, agent, template, session, secret, time.time()),
            )
        return self._public(self._hook(name)), secret

    def hooks(self) -> list[dict[str, Any]]:
        return [self._public(dict(r)) for r in self.db.query("SELECT * FROM hooks ORDER BY name")]

    def rotate(self, name: str) -> tuple[dict[str, Any], str]:
        self._hook(name)
        secret = secrets.token_hex(32)
        with self.db.tx() as c:
            c.execute("UPDATE hooks SET secret = ? WHERE name = ?", (secret, name))
        return self._public(self._hook(name)), secret

    def remove_hook(self, name: str) -> None:
        self._hook(name)
        with self.db.tx() as c:
            c.execute("DELETE FROM hook_deliveries WHERE hook = ?", (name,))
            c.execute("DELETE FROM hooks WHERE name = ?", (name,))

    def verify(self, name: str, body: bytes, signature: str | None) -> dict[str, Any] | None:
        """The hook when the signature is its secret's HMAC of the body; None otherwise (also for a name
        that is no hook: the answer does not tell which)."""
        rows = self.db.query("SELECT * FROM hooks WHERE name = ?", name) if NAME.fullmatch(name) else []
        secret = rows[0]["secret"] if rows else secrets.token_hex(32)  # same work either way
        ok = signature_ok(secret, body, signature)
        return dict(rows[0]) if rows and ok else None

    async def deliver(self, hook: dict[str, Any], body: bytes, delivery: str | None) -> dict[str, Any]:
        """Run the hook's agent once for this delivery (a repeated delivery id answers with the same id).

        The answer comes once the delivery is recorded, not once Temporal started its workflow (~100 ms
        on a busy machine): the dedupe check, the execution's record and the delivery's row are one
        transaction, so a delivery either ran (or will: `Executions.resume` starts a recorded one whose
        workflow did not start before an API restart) or left nothing, and a repeat finds its id."""
        name = hook["name"]
        key = delivery[:200] if delivery else "body-" + hashlib.sha256(body).hexdigest()
        message, warnings = self._message(hook, body)
        await self.ex.client()  # Temporal answers, so a delivery is not accepted that could not run
        with self.db.tx() as c:  # the lock of the database: no other delivery interleaves
            if delivery:
                done = c.execute(
                    "SELECT execution_id FROM hook_deliveries WHERE hook = ? AND delivery = ?", (name, key)
                ).fetchone()
                if done:
                    return {"execution_id": done["execution_id"], "repeat": True}
            exec_id, ticket = self.ex.make(
                hook["agent"], message, session=hook["session"], trigger=f"hook {name}",
                warnings=warnings or None,
            )  # fmt: skip
            if delivery:
                c.execute(
                    "INSERT INTO hook_deliveries (hook, delivery, execution_id, created) VALUES (?, ?, ?, ?)",
                    (name, key, exec_id, time.time()),
                )
            c.execute("UPDATE hooks SET last_delivery = ? WHERE name = ?", (time.time(), name))
        # A start that fails leaves the record FAILED, saying why (the sender has its id already).
        self.ex.later(self.ex.start(exec_id, ticket))
        return {"execution_id": exec_id, "repeat": False, "warnings": warnings}

    @staticmethod
    def _message(hook: dict[str, Any], body: bytes) -> tuple[str, list[str]]:
        """The agent's message made from the hook's template and the body, and what was left out."""
        warnings: list[str] = []
        if hook["template"]:
            try:
                data = json.loads(body or b"null")
            except ValueError:
                data = None
                warnings.append("The body is not JSON: every template field was left empty.")
            message, missing = fill(hook["template"], data)
            if missing and data is not None:
                warnings.append(
                    "Fields missing from the body, left empty: " + ", ".join(dict.fromkeys(missing))
                )
        else:
            message = body.decode("utf-8", "replace")
        if not message.strip():
            message = "(empty webhook body)"
            warnings.append("The message was empty.")
        return message, warnings

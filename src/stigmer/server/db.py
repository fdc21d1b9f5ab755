"""The server's own records in SQLite (data/stigmer.db): agents, executions, their messages and the
events streamed while they ran. Only the API process writes it.

The schema is versioned (PRAGMA user_version); each migration runs once, in order, in a transaction.
WAL mode lets readers (`stigmer execution list` through the API, a backup) go on while the API writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stigmer.errors import ErrorCode, StigmerError

MIGRATIONS: list[str] = [
    # 1: agents, executions, messages, events
    """
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE executions (
        id TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        state TEXT NOT NULL,
        message TEXT NOT NULL,
        model TEXT,
        provider TEXT,
        endpoint TEXT,
        worker TEXT,
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        error TEXT,
        output TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER,
        requests INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        tool_calls INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX executions_by_created ON executions (created DESC);
    CREATE TABLE messages (
        execution_id TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        data TEXT,
        PRIMARY KEY (execution_id, seq)
    );
    CREATE TABLE events (
        execution_id TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (execution_id, seq)
    );
    """,
    # 2: approvals asked by tools, answered by a person (stigmer execution approve|deny)
    """
    CREATE TABLE approvals (
        execution_id TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
        call_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        args TEXT NOT NULL,
        asked REAL NOT NULL,
        decision TEXT,
        decided REAL,
        PRIMARY KEY (execution_id, call_id)
    );
    """,
    # 3: what to run (the agent as it was when the execution was created) and who may run it: the ticket
    # the workflow input carries, the Temporal run the API started; cancels asked through the API;
    # "always" answers
    """
    ALTER TABLE executions ADD COLUMN spec TEXT;
    ALTER TABLE executions ADD COLUMN ticket TEXT;
    ALTER TABLE executions ADD COLUMN run_id TEXT;
    ALTER TABLE executions ADD COLUMN cancel_requested REAL;
    ALTER TABLE approvals ADD COLUMN always INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE events ADD COLUMN batch TEXT;
    CREATE INDEX events_by_batch ON events (execution_id, batch) WHERE batch IS NOT NULL;
    """,
    # 4: sessions: an agent and its turns, each turn an execution (a fork shares the turns it copies)
    """
    CREATE TABLE sessions (
        name TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        forked_from TEXT,
        forked_at INTEGER
    );
    CREATE TABLE session_turns (
        session TEXT NOT NULL REFERENCES sessions (name) ON DELETE CASCADE,
        turn INTEGER NOT NULL,
        execution_id TEXT NOT NULL REFERENCES executions (id),
        PRIMARY KEY (session, turn)
    );
    ALTER TABLE executions ADD COLUMN session TEXT;
    ALTER TABLE executions ADD COLUMN turn INTEGER;
    ALTER TABLE executions ADD COLUMN turns_left_out INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: the payload codec's claim check: payloads too large for Temporal's history, sealed (encrypted)
    # bytes under their sha256 (executions/payload_store.py)
    """
    CREATE TABLE payloads (
        ref TEXT PRIMARY KEY,
        data BLOB NOT NULL,
        created REAL NOT NULL
    );
    """,
    # 6: scoped API keys for the OpenAI-compatible endpoint (endpoint/keys.py: only each key's sha256 is
    # kept, `agents` a JSON list); and two columns of the executions that endpoint starts
    """
    CREATE TABLE api_keys (
        name TEXT PRIMARY KEY,
        id TEXT UNIQUE NOT NULL,
        hash TEXT NOT NULL,
        agents TEXT NOT NULL,
        all_agents INTEGER NOT NULL DEFAULT 0,
        models INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        expires REAL,
        last_used REAL
    );
    ALTER TABLE executions ADD COLUMN history TEXT;
    ALTER TABLE executions ADD COLUMN via TEXT;
    """,
    # 7: agents that run on their own (server/triggers.py): schedules (also in Temporal) and the fires they
    # made; webhooks (the secret is an HMAC key, kept as it is) and their deliveries; what started an
    # execution ("schedule NAME", "hook NAME") and the warnings made when it was (a JSON list)
    """
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        message TEXT NOT NULL,
        session TEXT,
        every INTEGER,
        cron TEXT,
        timezone TEXT,
        overlap TEXT NOT NULL,
        created REAL NOT NULL,
        last_fire REAL,
        last_execution TEXT,
        last_error TEXT
    );
    CREATE TABLE schedule_fires (
        schedule TEXT NOT NULL,
        fire_id TEXT NOT NULL,
        execution_id TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (schedule, fire_id)
    );
    CREATE TABLE hooks (
        name TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        template TEXT,
        session TEXT,
        secret TEXT NOT NULL,
        created REAL NOT NULL,
        last_delivery REAL
    );
    CREATE TABLE hook_deliveries (
        hook TEXT NOT NULL,
        delivery TEXT NOT NULL,
        execution_id TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (hook, delivery)
    );
    ALTER TABLE executions ADD COLUMN trigger TEXT;
    ALTER TABLE executions ADD COLUMN warnings TEXT;
    """,
    # 8: why an execution failed, as a stable code (limit_reached: a limit was crossed and going on denied)
    """
    ALTER TABLE executions ADD COLUMN error_code TEXT;
    """,
]

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF) that are about the disk or the file
SQLITE_PERM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CORRUPT = 3, 8, 10, 11
SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 13, 14, 26
LOW_SPACE = 8 * 1024 * 1024  # an I/O error with less than this free on the disk is the disk being full


def disk_full(path: Path) -> StigmerError:
    return StigmerError(
        f"The disk holding {path} is full: the Stigmer server cannot record what happens.",
        hint=f"Free some space there (df -h {path.parent}), then try again: nothing needs restarting.",
        code=ErrorCode.DISK_FULL,
    )


def storage_error(e: BaseException, path: Path) -> StigmerError | None:
    """A sqlite3 or OS error of the database's file as a StigmerError naming it: a full disk (DISK_FULL),
    a damaged file (STORE_CORRUPT), one that cannot be opened or written (FILESYSTEM). None for the
    others (a mistake in our SQL stays a bug with its traceback)."""
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return disk_full(path)
        return StigmerError(
            f"The Stigmer database {path} cannot be used: {e.strerror or e}.",
            hint=f"Check that {path.parent} is yours and writable: ls -ld {path.parent}",
            code=ErrorCode.FILESYSTEM,
        )
    if not isinstance(e, sqlite3.Error):
        return None
    primary = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
    if primary == SQLITE_FULL or (primary == SQLITE_IOERR and low_space(path.parent)):
        return disk_full(path)
    if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return StigmerError(
            f"The Stigmer database {path} is damaged ({e}).",
            hint="Move it aside, and the server starts with a new, empty one (the agents applied and the "
            "execution history stay in the old file):\n"
            f"  stigmer server stop && mv {path} {path}.damaged && rm -f {path}-wal {path}-shm && stigmer server",
            code=ErrorCode.STORE_CORRUPT,
        )
    if primary in (SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_READONLY, SQLITE_PERM):
        return StigmerError(
            f"The Stigmer database {path} cannot be read or written ({e}).",
            hint=f"Check the file and its folder (ls -l {path.parent}) and the disk (dmesg).",
            code=ErrorCode.FILESYSTEM,
        )
    return None


def low_space(folder: Path) -> bool:
    """Less than LOW_SPACE free on the disk of `folder`: an I/O error there is the disk being full (also
    for Temporal's database, data/temporal.db)."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


@contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Errors of the database's disk or file as StigmerError (see storage_error), the rest unchanged."""
    try:
        yield
    except (sqlite3.Error, OSError) as e:
        error = storage_error(e, path)
        if error is None:
            raise
        raise error from e


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0  # transactions open on the thread holding the lock (tx() nests)
        with storage_errors(path):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        try:
            with storage_errors(path):
                self._conn.row_factory = sqlite3.Row
                path.chmod(0o600)
                with self._lock:
                    self._conn.execute("PRAGMA journal_mode=WAL")
                    self._conn.execute("PRAGMA foreign_keys=ON")
                    self._conn.execute("PRAGMA synchronous=NORMAL")
                self.migrate()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. A full disk (or any error) rolls it back and leaves the connection
        ready for the next one: nothing is left half-open to block later writes once there is space.
        Nested (the same thread, inside another tx): part of the outer one, so several writes can be made
        all-or-nothing (a webhook delivery and the execution it makes)."""
        with self._lock, storage_errors(self.path):
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite has rolled back by itself after some errors (SQLITE_FULL): ROLLBACK would fail
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock, storage_errors(self.path):
            return list(self._conn.execute(sql, args))

    def migrate(self) -> int:
        with self._lock:
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                with self.tx() as c:
                    for statement in script.split(";"):
                        if statement.strip():
                            c.execute(statement)
                    c.execute(f"PRAGMA user_version = {number}")
            return len(MIGRATIONS)

    # -- agents ------------------------------------------------------------------------------------------
    def put_agent(self, name: str, spec: dict[str, Any]) -> bool:
        """Store or replace; True when it is new."""
        now = time.time()
        with self.tx() as c:
            existed = c.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone() is not None
            c.execute(
                "INSERT INTO agents (name, spec, created, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated = excluded.updated",
                (name, json.dumps(spec), now, now),
            )
        return not existed

    def get_agent(self, name: str) -> dict[str, Any] | None:
        rows = self.query("SELECT spec FROM agents WHERE name = ?", name)
        return json.loads(rows[0]["spec"]) if rows else None

    def list_agents(self) -> list[dict[str, Any]]:
        return [json.loads(r["spec"]) for r in self.query("SELECT spec FROM agents ORDER BY name")]

    def delete_agent(self, name: str) -> bool:
        with self.tx() as c:
            return c.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount > 0

    # -- executions --------------------------------------------------------------------------------------
    def create_execution(self, exec_id: str, agent: str, message: str, model: str | None) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO executions (id, agent, state, message, model, created) VALUES (?, ?, 'PENDING', ?, ?, ?)",
                (exec_id, agent, message, model, time.time()),
            )

    def update_execution(self, exec_id: str, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as c:
            c.execute(f"UPDATE executions SET {cols} WHERE id = ?", (*fields.values(), exec_id))  # noqa: S608 - names are ours

    def get_execution(self, exec_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM executions WHERE id = ?", exec_id)
        return dict(rows[0]) if rows else None

    def list_executions(
        self, *, state: str | None = None, agent: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        where, args = [], []
        if state:
            where.append("state = ?")
            args.append(state)
        if agent:
            where.append("agent = ?")
            args.append(agent)
        sql = "SELECT * FROM executions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC LIMIT ?"
        return [dict(r) for r in self.query(sql, *args, limit)]

    def unfinished(self) -> list[str]:
        marks = ",".join("?" * len(TERMINAL))
        return [
            r["id"] for r in self.query(f"SELECT id FROM executions WHERE state NOT IN ({marks})", *TERMINAL)
        ]  # noqa: S608

    def set_messages(self, exec_id: str, messages: list[dict[str, Any]]) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM messages WHERE execution_id = ?", (exec_id,))
            for i, m in enumerate(messages):
                c.execute(
                    "INSERT INTO messages (execution_id, seq, role, content, data) VALUES (?, ?, ?, ?, ?)",
                    (
                        exec_id,
                        i,
                        m["role"],
                        m.get("content", ""),
                        json.dumps(m.get("data")) if m.get("data") else None,
                    ),
                )

    def messages(self, exec_id: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT role, content, data FROM messages WHERE execution_id = ? ORDER BY seq", exec_id
        )
        out = []
        for r in rows:
            m: dict[str, Any] = {"role": r["role"], "content": r["content"]}
            if r["data"]:
                m["data"] = json.loads(r["data"])
            out.append(m)
        return out

    # -- events ------------------------------------------------------------------------------------------
    def add_event(self, exec_id: str, kind: str, data: dict[str, Any], *, batch: str | None = None) -> int:
        """Store an event; `batch` marks the first event of a worker's batch, so a resent batch is known."""
        with self.tx() as c:
            row = c.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE execution_id = ?", (exec_id,)
            ).fetchone()
            seq = int(row[0]) + 1
            c.execute(
                "INSERT INTO events (execution_id, seq, kind, data, created, batch) VALUES (?, ?, ?, ?, ?, ?)",
                (exec_id, seq, kind, json.dumps(data), time.time(), batch),
            )
        return seq

    def add_events(
        self, exec_id: str, events: list[tuple[str, dict[str, Any]]], *, batch: str | None
    ) -> None:
        """A worker's batch in one transaction: all of it is stored, or none (a resend then stores it)."""
        with self.tx() as c:
            row = c.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE execution_id = ?", (exec_id,)
            ).fetchone()
            seq = int(row[0])
            now = time.time()
            for i, (kind, data) in enumerate(events):
                seq += 1
                c.execute(
                    "INSERT INTO events (execution_id, seq, kind, data, created, batch) VALUES (?, ?, ?, ?, ?, ?)",
                    (exec_id, seq, kind, json.dumps(data), now, batch if i == 0 else None),
                )

    def has_batch(self, exec_id: str, batch: str) -> bool:
        return bool(
            self.query("SELECT 1 FROM events WHERE execution_id = ? AND batch = ? LIMIT 1", exec_id, batch)
        )

    def events(self, exec_id: str, after: int = 0) -> list[tuple[int, str, dict[str, Any]]]:
        rows = self.query(
            "SELECT seq, kind, data FROM events WHERE execution_id = ? AND seq > ? ORDER BY seq",
            exec_id,
            after,
        )
        return [(int(r["seq"]), str(r["kind"]), json.loads(r["data"])) for r in rows]

    # -- approvals ---------------------------------------------------------------------------------------
    def ask_approval(self, exec_id: str, call_id: str, tool: str, args: dict[str, Any]) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO approvals (execution_id, call_id, tool, args, asked) VALUES (?, ?, ?, ?, ?)",
                (exec_id, call_id, tool, json.dumps(args), time.time()),
            )

    def pending_approvals(self, exec_id: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT call_id, tool, args, asked FROM approvals WHERE execution_id = ? AND decision IS NULL ORDER BY asked",
            exec_id,
        )
        return [
            {"call_id": r["call_id"], "tool": r["tool"], "args": json.loads(r["args"]), "asked": r["asked"]}
            for r in rows
        ]

    def open_approvals(self, limit: int = 200) -> list[dict[str, Any]]:
        """Every tool call waiting for an answer, across executions that have not ended, oldest first."""
        marks = ",".join("?" * len(TERMINAL))
        rows = self.query(
            "SELECT a.execution_id, a.call_id, a.tool, a.args, a.asked, e.agent, e.session, e.turn "
            "FROM approvals a JOIN executions e ON e.id = a.execution_id "
            f"WHERE a.decision IS NULL AND e.state NOT IN ({marks}) ORDER BY a.asked LIMIT ?",  # noqa: S608
            *TERMINAL,
            limit,
        )
        return [{**dict(r), "args": json.loads(r["args"])} for r in rows]

    def decide(self, exec_id: str, call_id: str, decision: str) -> bool:
        with self.tx() as c:
            return (
                c.execute(
                    "UPDATE approvals SET decision = ?, decided = ? WHERE execution_id = ? AND call_id = ? AND decision IS NULL",
                    (decision, time.time(), exec_id, call_id),
                ).rowcount
                > 0
            )

    def decide_calls(self, exec_id: str, call_ids: list[str], decision: str, *, always: bool) -> list[str]:
        """Record one decision for the calls still undecided, in one transaction; the ones it decided.
        A call decided before keeps its first decision (one decision per call)."""
        decided = []
        with self.tx() as c:
            for call_id in call_ids:
                if c.execute(
                    "UPDATE approvals SET decision = ?, decided = ?, always = ? "
                    "WHERE execution_id = ? AND call_id = ? AND decision IS NULL",
                    (decision, time.time(), int(always), exec_id, call_id),
                ).rowcount:
                    decided.append(call_id)
        return decided

    def approval(self, exec_id: str, call_id: str) -> dict[str, Any] | None:
        rows = self.query(
            "SELECT call_id, tool, args, decision, always FROM approvals WHERE execution_id = ? AND call_id = ?",
            exec_id,
            call_id,
        )
        if not rows:
            return None
        r = rows[0]
        return {
            "call_id": r["call_id"],
            "tool": r["tool"],
            "args": json.loads(r["args"]),
            "decision": r["decision"],
            "always": bool(r["always"]),
        }

    def close_approvals(self, exec_id: str, decision: str) -> None:
        """An execution that ended waits for nothing: its open approvals are closed with `decision`."""
        with self.tx() as c:
            c.execute(
                "UPDATE approvals SET decision = ?, decided = ? WHERE execution_id = ? AND decision IS NULL",
                (decision, time.time(), exec_id),
            )

    # -- sessions ----------------------------------------------------------------------------------------
    def start_turn(
        self, exec_id: str, session: str, agent: str | None, message: str, fields: dict[str, Any]
    ) -> tuple[str, int]:
        """Create the execution of a session's next turn, in one transaction: the session is made if it
        is new; a turn still running (pending, in progress, waiting for approval) makes this one BUSY.
        Returns the session's agent and the new turn's number."""
        now = time.time()
        with self.tx() as c:
            row = c.execute("SELECT agent FROM sessions WHERE name = ?", (session,)).fetchone()
            if row is None:
                owner = agent or "default"
                c.execute(
                    "INSERT INTO sessions (name, agent, created, updated) VALUES (?, ?, ?, ?)",
                    (session, owner, now, now),
                )
            else:
                owner = str(row["agent"])
                if agent and agent != owner:
                    raise StigmerError(
                        f"Session {session!r} is a conversation with the agent {owner!r}, not {agent!r}.",
                        hint="Continue it without naming an agent, or start another: --session NEW-NAME",
                        code=ErrorCode.INVALID_INPUT,
                    )
            running = _running_turn(c, session)
            if running is not None:
                raise StigmerError(
                    f"Session {session!r} has a turn still running: {running['id']} ({running['state']}).",
                    hint=f"Wait for it (stigmer execution logs -f {running['id']}) or cancel it "
                    f"(stigmer execution cancel {running['id']}).",
                    code=ErrorCode.BUSY,
                )
            last = c.execute("SELECT COALESCE(MAX(turn), 0) FROM session_turns WHERE session = ?", (session,))
            turn = int(last.fetchone()[0]) + 1
            cols = {"id": exec_id, "agent": owner, "state": "PENDING", "message": message, "created": now,
                    "session": session, "turn": turn, **fields}  # fmt: skip
            c.execute(
                f"INSERT INTO executions ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",  # noqa: S608
                tuple(cols.values()),
            )
            c.execute(
                "INSERT INTO session_turns (session, turn, execution_id) VALUES (?, ?, ?)",
                (session, turn, exec_id),
            )
            c.execute("UPDATE sessions SET updated = ? WHERE name = ?", (now, session))
        return owner, turn

    def create_session(self, name: str, agent: str) -> bool:
        """An empty session; False when the name is taken."""
        now = time.time()
        with self.tx() as c:
            return (
                c.execute(
                    "INSERT OR IGNORE INTO sessions (name, agent, created, updated) VALUES (?, ?, ?, ?)",
                    (name, agent, now, now),
                ).rowcount
                > 0
            )

    def last_session(self) -> str | None:
        rows = self.query("SELECT name FROM sessions ORDER BY updated DESC LIMIT 1")
        return str(rows[0]["name"]) if rows else None

    def get_session(self, name: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM sessions WHERE name = ?", name)
        return dict(rows[0]) if rows else None

    def list_sessions(self, agent: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM sessions" + (" WHERE agent = ?" if agent else "") + " ORDER BY updated DESC"
        return [dict(r) for r in self.query(sql, *([agent] if agent else []))]

    def session_turns(self, name: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT t.turn, t.execution_id, e.state, e.message, e.output, e.created, e.error "
            "FROM session_turns t JOIN executions e ON e.id = t.execution_id WHERE t.session = ? ORDER BY t.turn",
            name,
        )
        return [dict(r) for r in rows]

    def delete_session(self, name: str) -> None:
        """Remove a session (its executions stay, as records); not while a turn runs (BUSY)."""
        with self.tx() as c:
            running = _running_turn(c, name)
            if running is not None:
                raise StigmerError(
                    f"Session {name!r} has a turn still running ({running['id']}): it cannot be removed now.",
                    hint=f"Cancel it first: stigmer execution cancel {running['id']}",
                    code=ErrorCode.BUSY,
                )
            c.execute("DELETE FROM sessions WHERE name = ?", (name,))

    def fork_session(self, name: str, at: int, new: str) -> None:
        """A new session with the first `at` turns of `name` (the same executions: nothing is copied)."""
        now = time.time()
        with self.tx() as c:
            src = c.execute("SELECT agent FROM sessions WHERE name = ?", (name,)).fetchone()
            if c.execute("SELECT 1 FROM sessions WHERE name = ?", (new,)).fetchone() is not None:
                raise StigmerError(
                    f"There is a session named {new!r} already.", hint="Choose another: --name NEW",
                    code=ErrorCode.CONFLICT,
                )  # fmt: skip
            c.execute(
                "INSERT INTO sessions (name, agent, created, updated, forked_from, forked_at) VALUES (?, ?, ?, ?, ?, ?)",
                (new, src["agent"], now, now, name, at),
            )
            c.execute(
                "INSERT INTO session_turns (session, turn, execution_id) "
                "SELECT ?, turn, execution_id FROM session_turns WHERE session = ? AND turn <= ?",
                (new, name, at),
            )

    def transcript(self, session: str, before: int) -> list[dict[str, Any]]:
        """The messages of the session's completed turns before turn `before`, in order (without their
        system messages): what the model is told the conversation was. One query, however long."""
        rows = self.query(
            "SELECT t.turn, t.execution_id, m.role, m.content, m.data FROM session_turns t "
            "JOIN executions e ON e.id = t.execution_id JOIN messages m ON m.execution_id = t.execution_id "
            "WHERE t.session = ? AND t.turn < ? AND e.state = 'COMPLETED' AND m.role != 'system' "
            "ORDER BY t.turn, m.seq",
            session,
            before,
        )
        out: list[dict[str, Any]] = []
        for r in rows:
            m: dict[str, Any] = {"role": r["role"], "content": r["content"]}
            if r["data"]:
                try:
                    m["data"] = json.loads(r["data"])
                except ValueError as e:  # a damaged row: an error for this session only
                    turn = int(r["turn"])
                    raise StigmerError(
                        f"Turn {turn} of session {session!r} ({r['execution_id']}) is damaged in the database: {e}.",
                        hint=f"Continue from before it: stigmer session fork {session} --at {turn - 1}"
                        if turn > 1
                        else f"Start the conversation again: stigmer session rm {session}",
                        code=ErrorCode.CONFLICT,
                    ) from None
            out.append(m)
        return out

    # -- payloads: the claim check's sealed bytes, by sha256 ------------------------------------------
    def put_payload(self, ref: str, data: bytes) -> None:
        """Keep sealed bytes under their sha256 (checked here: a ref never holds other bytes; storing
        the same bytes again changes nothing)."""
        import hashlib

        if hashlib.sha256(data).hexdigest() != ref:
            raise ValueError(f"the bytes given for payload {ref[:80]} have another sha256")
        with self.tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO payloads (ref, data, created) VALUES (?, ?, ?)",
                (ref, data, time.time()),
            )

    def get_payload(self, ref: str) -> bytes | None:
        rows = self.query("SELECT data FROM payloads WHERE ref = ?", ref)
        return bytes(rows[0]["data"]) if rows else None


def _running_turn(c: sqlite3.Connection, session: str) -> sqlite3.Row | None:
    """The session's turn that has not ended (pending, in progress, waiting for approval), if any."""
    marks = ",".join("?" * len(TERMINAL))
    row: sqlite3.Row | None = c.execute(
        f"SELECT e.id, e.state FROM session_turns t JOIN executions e ON e.id = t.execution_id "  # noqa: S608
        f"WHERE t.session = ? AND e.state NOT IN ({marks}) ORDER BY t.turn DESC LIMIT 1",
        (session, *TERMINAL),
    ).fetchone()
    return row

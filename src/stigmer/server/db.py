"""The server's own records in SQLite (data/stigmer.db): agents, executions, their messages and the
events streamed while they ran. Only the API process writes it.

The schema is versioned (PRAGMA user_version); each migration runs once, in order, in a transaction.
WAL mode lets readers (`stigmer execution list` through the API, a backup) go on while the API writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
]

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


class Database:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        path.chmod(0o600)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
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
    def add_event(self, exec_id: str, kind: str, data: dict[str, Any]) -> int:
        with self.tx() as c:
            row = c.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE execution_id = ?", (exec_id,)
            ).fetchone()
            seq = int(row[0]) + 1
            c.execute(
                "INSERT INTO events (execution_id, seq, kind, data, created) VALUES (?, ?, ?, ?, ?)",
                (exec_id, seq, kind, json.dumps(data), time.time()),
            )
        return seq

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

    def decide(self, exec_id: str, call_id: str, decision: str) -> bool:
        with self.tx() as c:
            return (
                c.execute(
                    "UPDATE approvals SET decision = ?, decided = ? WHERE execution_id = ? AND call_id = ? AND decision IS NULL",
                    (decision, time.time(), exec_id, call_id),
                ).rowcount
                > 0
            )

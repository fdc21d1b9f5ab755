"""Scoped API keys for the OpenAI-compatible endpoint (`stigmer key create|list|rm`).

A key is `sk-stigmer-<id>_<secret>`: the id (8 hex digits) is public and only finds the key's row; the
secret (secrets.token_urlsafe(32)) is never stored. The row keeps the sha256 of the whole key, and a key
given is checked by its id's row and a constant-time comparison of the hashes. What a key reaches is its
scopes: the agents it names (`agent/NAME`) or every agent, and with `models` the models themselves. The
admin paths (status, agents, executions, sessions, keys) stay the API token's alone (server/api/auth.py).

A key removed or expired fails at its next request: nothing is cached. Its `last_used` is written at most
once a minute, so a stream of requests does not write the database on every one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from stigmer.agents.spec import DEFAULT_AGENT
from stigmer.agents.spec import NAME as NAME_RULE
from stigmer.errors import ErrorCode, StigmerError

if TYPE_CHECKING:
    from stigmer.server.db import Database

log = logging.getLogger(__name__)

PREFIX = "sk-stigmer-"
AGENT_MODEL = "agent/"  # the model id of an agent: agent/NAME
# The whole key, strictly: an id of 8 lowercase hex digits, then the 43 characters of token_urlsafe(32).
KEY_FORMAT = re.compile(r"sk-stigmer-([0-9a-f]{8})_[A-Za-z0-9_-]{43}")
MAX_AGENTS = 1000  # agents one key may name
LAST_USED_EVERY = 60.0  # seconds: last_used is written at most this often per key
MAX_EXPIRES = 10 * 365 * 86400.0  # ten years: a longer one is a typo
_UNITS = {"m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"([0-9]{1,9})([mhdw])")
# Compared against when no key has the id given, so an unknown id costs the same comparison as a known one.
_NO_HASH = hashlib.sha256(b"no such key").hexdigest()


def parse_duration(text: str) -> float:
    """Seconds in "90m", "12h", "30d" or "1w": more than 0, at most ten years."""
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise StigmerError(
            f"{str(text)[:40]!r} is not a duration.",
            hint="Give a number and a unit: 90m (minutes), 12h (hours), 30d (days) or 1w (weeks).",
            code=ErrorCode.INVALID_INPUT,
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    check_expires_in(seconds, shown=text.strip())
    return seconds


def check_expires_in(seconds: float, *, shown: str | None = None) -> None:
    what = shown or f"{seconds:g} seconds"
    if not seconds > 0:
        raise StigmerError(
            f"A key cannot expire in {what}: give a time in the future.",
            hint="For example --expires 30d, or leave --expires out for a key that does not expire.",
            code=ErrorCode.INVALID_INPUT,
        )
    if seconds > MAX_EXPIRES:
        raise StigmerError(
            f"A key cannot expire in {what}: ten years (3650d) is the most.",
            hint="Leave --expires out for a key that does not expire.",
            code=ErrorCode.INVALID_INPUT,
        )


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Key:
    name: str
    agents: tuple[str, ...]
    all_agents: bool
    models: bool
    created: float
    expires: float | None
    last_used: float | None

    def missing_scope(self, model: str) -> str | None:
        """None when this key may use `model`; otherwise the scope it lacks, as `key list` shows scopes:
        `agents:NAME` for the agent `agent/NAME`, `models` for any other model id."""
        if model.startswith(AGENT_MODEL):
            agent = model[len(AGENT_MODEL) :]
            return None if self.all_agents or agent in self.agents else f"agents:{agent}"
        return None if self.models else "models"

    @property
    def scopes(self) -> list[str]:
        agents = ["agents:*"] if self.all_agents else [f"agents:{a}" for a in self.agents]
        return [*agents, *(["models"] if self.models else [])]

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) >= self.expires

    def to_dict(self) -> dict[str, Any]:
        """What `key list` shows: never the key, its secret or its hash."""
        return {
            "name": self.name,
            "scopes": self.scopes,
            "agents": list(self.agents),
            "all_agents": self.all_agents,
            "models": self.models,
            "created": self.created,
            "expires": self.expires,
            "expired": self.expired(),
            "last_used": self.last_used,
        }


def _key(row: Any) -> Key:
    return Key(
        name=str(row["name"]),
        agents=tuple(str(a) for a in json.loads(row["agents"])),
        all_agents=bool(row["all_agents"]),
        models=bool(row["models"]),
        created=float(row["created"]),
        expires=None if row["expires"] is None else float(row["expires"]),
        last_used=None if row["last_used"] is None else float(row["last_used"]),
    )


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise StigmerError(
            f"{str(name)[:80]!r} is not {what}: use 1-63 letters, digits, - and _, starting with a letter "
            "or a digit.",
            code=ErrorCode.INVALID_INPUT,
        )
    return name


def _not_found(name: str) -> StigmerError:
    return StigmerError(
        f"No key named {name[:80]!r}.", hint="See the keys: stigmer key list", code=ErrorCode.NOT_FOUND
    )


class Keys:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        name: str,
        *,
        agents: list[str] | None,
        all_agents: bool,
        models: bool,
        expires_in: float | None,
    ) -> tuple[Key, str]:
        """A new key and its text (`sk-stigmer-...`), which exists only in this answer."""
        _check_name(name, "a key name")
        named = list(dict.fromkeys(_check_name(a, "an agent name") for a in agents or []))
        if named and all_agents:
            raise StigmerError(
                "A key reaches either the agents it names or all of them, not both.",
                hint="Give --agents A,B or --all-agents.",
                code=ErrorCode.INVALID_INPUT,
            )
        if len(named) > MAX_AGENTS:
            raise StigmerError(
                f"A key can name at most {MAX_AGENTS} agents; {len(named)} were given.",
                hint="Give it --all-agents instead.",
                code=ErrorCode.INVALID_INPUT,
            )
        if not (named or all_agents or models):
            raise StigmerError(
                f"Key {name!r} would reach nothing: give it at least one scope.",
                hint=f"stigmer key create {name} --agents A,B    (or --all-agents, and/or --models)",
                code=ErrorCode.INVALID_INPUT,
            )
        if expires_in is not None:
            check_expires_in(expires_in)
        for agent in named:
            # The built-in agent is not stored until someone changes it, yet it exists.
            if agent != DEFAULT_AGENT and self.db.get_agent(agent) is None:
                raise StigmerError(
                    f"No agent named {agent!r}: a key can only name agents there are.",
                    hint="See the agents: stigmer agent list    Add one: stigmer agent apply -f FILE",
                    code=ErrorCode.NOT_FOUND,
                )
        now = time.time()
        key = Key(
            name=name,
            agents=tuple(named),
            all_agents=bool(all_agents),
            models=bool(models),
            created=now,
            expires=None if expires_in is None else now + expires_in,
            last_used=None,
        )
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM api_keys WHERE name = ?", (name,)).fetchone() is not None:
                raise StigmerError(
                    f"There is a key named {name!r} already.",
                    hint=f"Choose another name, or remove that key first: stigmer key rm {name}",
                    code=ErrorCode.CONFLICT,
                )
            key_id = secrets.token_hex(4)
            while c.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone() is not None:
                key_id = secrets.token_hex(4)  # 1 in 4 billion: draw again
            text = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
            c.execute(
                "INSERT INTO api_keys (name, id, hash, agents, all_agents, models, created, expires, last_used) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (name, key_id, digest(text), json.dumps(list(key.agents)), int(key.all_agents),
                 int(key.models), key.created, key.expires),
            )  # fmt: skip
        log.info("key %s created (scopes: %s)", name, ", ".join(key.scopes))
        return key, text

    def list(self) -> list[Key]:
        return [_key(r) for r in self.db.query("SELECT * FROM api_keys ORDER BY name")]

    def remove(self, name: str) -> None:
        """Remove a key: the next request with it is refused (401)."""
        with self.db.tx() as c:
            gone = c.execute("DELETE FROM api_keys WHERE name = ?", (name,)).rowcount > 0
        if not gone:
            raise _not_found(name)
        log.info("key %s removed", name)

    def verify(self, given: str) -> Key | None:
        """The key `given` is, if it is one: well formed, known, its hash the same (compared in constant
        time) and not expired. None for anything else."""
        match = KEY_FORMAT.fullmatch(given) if isinstance(given, str) and given.isascii() else None
        if match is None:
            return None
        rows = self.db.query("SELECT * FROM api_keys WHERE id = ?", match.group(1))
        expected = str(rows[0]["hash"]) if rows else _NO_HASH
        if not hmac.compare_digest(digest(given), expected) or not rows:
            return None
        key = _key(rows[0])
        now = time.time()
        if key.expired(now):
            return None
        if key.last_used is None or now - key.last_used >= LAST_USED_EVERY:
            key = self._touch(key, now)
        return key

    def _touch(self, key: Key, now: float) -> Key:
        """Record when the key was last used. A database that cannot be written (a full disk) does not
        turn a valid key away: only the time shown by `key list` is late."""
        try:
            with self.db.tx() as c:
                c.execute("UPDATE api_keys SET last_used = ? WHERE name = ?", (now, key.name))
        except StigmerError as e:
            log.warning("key %s: last use not recorded: %s", key.name, e.message)
            return key
        return replace(key, last_used=now)

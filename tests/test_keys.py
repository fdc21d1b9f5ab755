"""Scoped keys of the OpenAI-compatible endpoint (issue 16): the core (endpoint/keys.py) against a real
SQLite database, the admin routes (/v1/keys) through the real app, and `stigmer key create|list|rm`
against that app served on a real socket.

- a key is printed once; only its sha256 is stored; verify compares hashes in constant time
- malformed, unknown, wrong-secret, expired and removed keys verify to None, at once
- last_used is written at most once a minute per key
- a key reaches only its scopes, and never the admin paths (401 there: they take only the API token)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stigmer.endpoint.keys import Key, Keys, parse_duration
from stigmer.errors import ErrorCode, StigmerError
from stigmer.paths import Paths
from stigmer.server.db import MIGRATIONS, Database
from tests.doubles.archives import free_port

KEY_TEXT = re.compile(r"sk-stigmer-[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "data" / "stigmer.db")
    database.put_agent("poet", {"name": "poet", "instructions": "Short poems."})
    database.put_agent("writer", {"name": "writer", "instructions": "Prose."})
    yield database
    database.close()


@pytest.fixture
def keys(db: Database) -> Keys:
    return Keys(db)


def _make(keys: Keys, name: str = "ci", **scopes: Any) -> tuple[Key, str]:
    args: dict[str, Any] = {"agents": None, "all_agents": False, "models": False, "expires_in": None}
    args.update(scopes)
    return keys.create(name, **args)


def _row(db: Database, name: str) -> dict[str, Any]:
    rows = db.query("SELECT * FROM api_keys WHERE name = ?", name)
    assert rows, name
    return dict(rows[0])


def _error(call: Any) -> StigmerError:
    with pytest.raises(StigmerError) as caught:
        call()
    return caught.value


# -- the database -----------------------------------------------------------------------------------------
def test_migration_6_adds_the_keys_table_and_the_executions_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    for script in MIGRATIONS[:5]:  # a database as the previous release left it
        old.executescript(script)
    old.execute("PRAGMA user_version = 5")
    old.commit()
    old.close()
    db = Database(path)
    try:
        assert db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS) >= 6  # later ones run too
        columns = {r["name"] for r in db.query("PRAGMA table_info(executions)")}
        assert {"history", "via"} <= columns
        key_columns = [r["name"] for r in db.query("PRAGMA table_info(api_keys)")]
        assert key_columns == [
            "name", "id", "hash", "agents", "all_agents", "models", "created", "expires", "last_used",
        ]  # fmt: skip
    finally:
        db.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- create and verify ------------------------------------------------------------------------------------
def test_a_key_is_stored_only_as_its_hash_and_verifies_to_its_scopes(keys: Keys, db: Database) -> None:
    key, text = _make(keys, agents=["poet", "writer", "poet"], models=True, expires_in=3600)
    assert KEY_TEXT.fullmatch(text), text
    assert key.agents == ("poet", "writer") and key.models and not key.all_agents  # duplicates dropped
    assert key.expires is not None and 3590 < key.expires - key.created <= 3600
    row = _row(db, "ci")
    assert row["hash"] == hashlib.sha256(text.encode()).hexdigest()
    assert row["id"] == text[len("sk-stigmer-") :][:8]
    secret = text.split("_", 1)[1]
    raw = b"".join(p.read_bytes() for p in db.path.parent.iterdir())  # the database, its WAL
    assert secret.encode() not in raw and text.encode() not in raw  # not in the file, in any column
    found = keys.verify(text)
    assert found is not None and found.name == "ci" and found.agents == ("poet", "writer")
    assert found.models and found.expires == key.expires


def test_two_keys_never_share_their_text_or_id(keys: Keys) -> None:
    texts = [_make(keys, f"k{i}", models=True)[1] for i in range(20)]
    assert len(set(texts)) == 20 and len({t[11:19] for t in texts}) == 20
    assert all(keys.verify(t).name == f"k{i}" for i, t in enumerate(texts))  # type: ignore[union-attr]


def test_the_hashes_are_compared_in_constant_time(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    _key, text = _make(keys, models=True)
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # keys.py looks it up at each call
    assert keys.verify(text) is not None
    assert calls == [(hashlib.sha256(text.encode()).hexdigest(),) * 2]
    wrong = text[:-1] + ("A" if text[-1] != "A" else "B")  # the right id, another secret
    assert keys.verify(wrong) is None and len(calls) == 2
    unknown = "sk-stigmer-00000000_" + text.split("_", 1)[1]  # an id no key has: compared all the same
    if unknown[11:19] != text[11:19]:
        assert keys.verify(unknown) is None and len(calls) == 3


@pytest.mark.parametrize(
    "given",
    [
        "",
        "sk-stigmer-",
        "Bearer sk-stigmer-",
        "sk-stigmer-zzzzzzzz_" + "a" * 43,  # an id that is not hex
        "sk-stigmer-ABCDEF12_" + "a" * 43,  # upper-case hex: never made
        "sk-stigmer-abcdef1_" + "a" * 43,  # a short id
        "sk-stigmer-abcdef12" + "a" * 43,  # no separator
        "sk-stigmer-abcdef12_" + "a" * 42,  # a short secret
        "sk-stigmer-abcdef12_" + "a" * 44,  # a long one
        "sk-stigmer-abcdef12_" + "a" * 42 + "é",  # not ASCII
        "sk-stigmer-abcdef12_" + "a" * 42 + "=",
        "x" * 100_000,
    ],
)
def test_anything_malformed_verifies_to_none_without_a_query(
    keys: Keys, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    _make(keys, models=True)
    monkeypatch.setattr(keys.db, "query", lambda *_a: pytest.fail("a malformed key reached the database"))
    assert keys.verify(given) is None


def test_a_valid_key_with_extra_text_around_it_does_not_verify(keys: Keys) -> None:
    _key, text = _make(keys, models=True)
    for given in (f" {text}", f"{text}\n", f"{text}x", text.upper(), f"Bearer {text}"):
        assert keys.verify(given) is None, given
    assert keys.verify(None) is None  # type: ignore[arg-type]


def test_an_expired_key_is_refused(keys: Keys, db: Database) -> None:
    _key, text = _make(keys, agents=["poet"], expires_in=60)
    assert keys.verify(text) is not None
    with db.tx() as c:
        c.execute("UPDATE api_keys SET expires = ? WHERE name = 'ci'", (time.time() - 0.01,))
    assert keys.verify(text) is None
    listed = keys.list()[0]
    assert listed.expired() and listed.to_dict()["expired"] is True


def test_a_removed_key_fails_at_once_and_its_name_is_free_again(keys: Keys) -> None:
    _key, text = _make(keys, models=True)
    assert keys.verify(text) is not None
    keys.remove("ci")
    assert keys.verify(text) is None and keys.list() == []
    error = _error(lambda: keys.remove("ci"))
    assert error.code is ErrorCode.NOT_FOUND and "stigmer key list" in error.hint
    _again, new_text = _make(keys, models=True)
    assert keys.verify(text) is None and keys.verify(new_text) is not None  # the old text stays dead


def test_last_used_is_written_at_most_once_a_minute(
    keys: Keys, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    _key, text = _make(keys, models=True)
    assert keys.list()[0].last_used is None
    before = time.time()
    first = keys.verify(text)
    assert first is not None and first.last_used is not None and first.last_used >= before
    assert _row(db, "ci")["last_used"] == first.last_used
    with db.tx() as c:  # used 30 s ago: another use now is not written
        c.execute("UPDATE api_keys SET last_used = ?", (time.time() - 30,))
    recent = _row(db, "ci")["last_used"]
    writes: list[int] = []
    real_tx = db.tx

    def counting_tx() -> Any:
        writes.append(1)
        return real_tx()

    monkeypatch.setattr(db, "tx", counting_tx)
    for _ in range(50):
        assert keys.verify(text) is not None
    assert writes == [] and _row(db, "ci")["last_used"] == recent
    monkeypatch.setattr(db, "tx", real_tx)
    with db.tx() as c:  # a minute later: written again
        c.execute("UPDATE api_keys SET last_used = ?", (time.time() - 61,))
    again = keys.verify(text)
    assert again is not None and again.last_used is not None and again.last_used >= before
    assert _row(db, "ci")["last_used"] == again.last_used


def test_a_database_that_cannot_be_written_does_not_turn_a_valid_key_away(
    keys: Keys, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    _key, text = _make(keys, models=True)

    def full() -> Any:
        raise StigmerError("The disk is full.", code=ErrorCode.DISK_FULL)

    monkeypatch.setattr(db, "tx", full)
    found = keys.verify(text)
    assert found is not None and found.last_used is None


# -- what create refuses ----------------------------------------------------------------------------------
def test_a_name_taken_is_a_conflict_naming_key_rm(keys: Keys) -> None:
    _make(keys, models=True)
    error = _error(lambda: _make(keys, all_agents=True))
    assert error.code is ErrorCode.CONFLICT and "stigmer key rm ci" in error.hint
    assert [k.all_agents for k in keys.list()] == [False]  # the first one is unchanged


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 64, "é", 5, None])
def test_a_bad_key_name_is_invalid_input(keys: Keys, name: Any) -> None:
    assert _error(lambda: _make(keys, name, models=True)).code is ErrorCode.INVALID_INPUT


def test_a_key_needs_a_scope_and_not_both_kinds_of_agents(keys: Keys) -> None:
    none = _error(lambda: _make(keys))
    assert none.code is ErrorCode.INVALID_INPUT and "at least one scope" in none.message
    assert "--agents" in none.hint and "--models" in none.hint
    assert _error(lambda: _make(keys, agents=[])).code is ErrorCode.INVALID_INPUT
    both = _error(lambda: _make(keys, agents=["poet"], all_agents=True))
    assert both.code is ErrorCode.INVALID_INPUT
    assert _error(lambda: _make(keys, agents=["bad name"])).code is ErrorCode.INVALID_INPUT
    assert keys.list() == []


def test_an_agent_that_does_not_exist_is_refused_by_name(keys: Keys) -> None:
    error = _error(lambda: _make(keys, agents=["poet", "nosuch"]))
    assert error.code is ErrorCode.NOT_FOUND and "'nosuch'" in error.message
    assert "stigmer agent list" in error.hint and keys.list() == []
    key, _text = _make(keys, agents=["default"])  # the built-in agent exists without being stored
    assert key.agents == ("default",)


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), 11 * 365 * 86400])
def test_an_expiry_out_of_bounds_is_refused(keys: Keys, seconds: float) -> None:
    assert _error(lambda: _make(keys, models=True, expires_in=seconds)).code is ErrorCode.INVALID_INPUT


# -- scopes -----------------------------------------------------------------------------------------------
def test_a_key_reaches_only_its_scopes() -> None:
    now = time.time()
    agents_only = Key("a", ("poet",), False, False, now, None, None)
    assert agents_only.missing_scope("agent/poet") is None
    assert agents_only.missing_scope("agent/writer") == "agents:writer"
    assert agents_only.missing_scope("agent/poetry") == "agents:poetry"
    assert agents_only.missing_scope("qwen2.5-coder:7b") == "models"
    assert agents_only.missing_scope("agents/poet") == "models"  # only agent/NAME is an agent
    every = Key("b", (), True, False, now, None, None)
    assert every.missing_scope("agent/anything") is None and every.missing_scope("m") == "models"
    models = Key("c", (), False, True, now, None, None)
    assert models.missing_scope("qwen2.5-coder:7b") is None
    assert models.missing_scope("agent/poet") == "agents:poet"
    assert every.scopes == ["agents:*"] and agents_only.scopes == ["agents:poet"]
    assert Key("d", ("poet", "writer"), False, True, now, None, None).scopes == [
        "agents:poet", "agents:writer", "models",
    ]  # fmt: skip


def test_a_listed_key_holds_neither_its_text_nor_its_hash(keys: Keys, db: Database) -> None:
    _key, text = _make(keys, agents=["poet"], models=True, expires_in=86400)
    keys.verify(text)
    listed = [k.to_dict() for k in keys.list()]
    assert set(listed[0]) == {
        "name", "scopes", "agents", "all_agents", "models", "created", "expires", "expired", "last_used",
    }  # fmt: skip
    shown = json.dumps(listed)
    assert text[11:] not in shown and text.split("_", 1)[1] not in shown
    assert _row(db, "ci")["hash"] not in shown


# -- durations --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90m", 5400), ("12h", 43200), ("30d", 2592000), ("1w", 604800), (" 2D ", 172800), ("3650d", 315360000)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "30", "d", "0d", "-1d", "1.5h", "1y", "30s", "3651d", "522w", "1d2h", "999999999d", "３０d"]
)
def test_bad_durations_are_invalid_input(text: str) -> None:
    error = _error(lambda: parse_duration(text))
    assert error.code is ErrorCode.INVALID_INPUT and error.hint


# -- the admin routes, through the real app ---------------------------------------------------------------
ADMIN = {"Authorization": "Bearer api-token"}


@pytest.fixture
def api(isolated_home: Paths) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from stigmer.config import store
    from stigmer.server.api.app import create_app
    from stigmer.server.keys import ensure_keys

    ensure_keys(isolated_home)
    isolated_home.data_dir.mkdir(parents=True, exist_ok=True)
    settings = store.load(isolated_home)
    app = create_app(settings, isolated_home, token="api-token", worker_token="worker-token")
    with TestClient(app, base_url=f"http://127.0.0.1:{settings.server.port}") as client:
        assert client.post("/v1/agents", json={"name": "poet"}, headers=ADMIN).status_code == 201
        yield client


def test_keys_are_made_listed_and_removed_through_the_api(api: Any) -> None:
    made = api.post(
        "/v1/keys",
        json={"name": "ci", "agents": ["poet"], "models": True, "expires": "30d"},
        headers=ADMIN,
    )
    assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
    body = made.json()
    assert KEY_TEXT.fullmatch(body["secret"])
    assert body["key"]["scopes"] == ["agents:poet", "models"] and body["key"]["expired"] is False
    assert 29.9 * 86400 < body["key"]["expires"] - body["key"]["created"] <= 30 * 86400
    listed = api.get("/v1/keys", headers=ADMIN)
    assert listed.status_code == 200 and [k["name"] for k in listed.json()] == ["ci"]
    assert body["secret"][11:] not in listed.text
    assert api.delete("/v1/keys/ci", headers=ADMIN).json() == {"removed": "ci"}
    assert api.get("/v1/keys", headers=ADMIN).json() == []
    gone = api.delete("/v1/keys/ci", headers=ADMIN)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def test_a_scoped_key_never_opens_the_admin_paths(api: Any) -> None:
    secret = api.post("/v1/keys", json={"name": "all", "all_agents": True, "models": True}, headers=ADMIN)
    secret = secret.json()["secret"]
    scoped = {"Authorization": f"Bearer {secret}"}
    for method, path in [
        ("GET", "/v1/keys"), ("POST", "/v1/keys"), ("DELETE", "/v1/keys/all"), ("GET", "/v1/status"),
        ("GET", "/v1/agents"), ("GET", "/v1/agents/poet"), ("GET", "/v1/executions"),
        ("POST", "/v1/executions"), ("GET", "/v1/sessions"), ("GET", "/v1/runner/hello"),
    ]:  # fmt: skip
        answer = api.request(method, path, headers=scoped, json={} if method == "POST" else None)
        assert answer.status_code == 401, (method, path, answer.text)
    assert [k["name"] for k in api.get("/v1/keys", headers=ADMIN).json()] == ["all"]  # not removed
    assert api.get("/v1/keys").status_code == 401  # and no credential at all: the same


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"agents": ["poet"]}, "`name`"),
        ({"name": 5, "models": True}, "`name`"),
        ({"name": "k", "agents": "poet"}, "`agents` must be a list"),
        ({"name": "k", "agents": [1]}, "`agents` must be a list"),
        ({"name": "k", "all_agents": "yes"}, "`all_agents` must be true or false"),
        ({"name": "k", "models": 1}, "`models` must be true or false"),
        ({"name": "k", "models": True, "expires": 30}, "`expires` must be a duration"),
        ({"name": "k", "models": True, "expires": "30x"}, "not a duration"),
        ({"name": "k", "models": True, "expires": "0d"}, "in the future"),
        ({"name": "k", "models": True, "model": True}, "Unknown field 'model'"),
        ({"name": "k"}, "at least one scope"),
        ({"name": "k", "agents": ["poet"], "all_agents": True}, "not both"),
        ({"name": "bad name", "models": True}, "is not a key name"),
    ],
)
def test_bad_key_bodies_are_400_naming_the_field(api: Any, body: dict[str, Any], words: str) -> None:
    answer = api.post("/v1/keys", json=body, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_input" and words in error["message"], error
    assert api.get("/v1/keys", headers=ADMIN).json() == []


def test_an_unknown_agent_is_404_and_a_taken_name_409(api: Any) -> None:
    unknown = api.post("/v1/keys", json={"name": "k", "agents": ["nosuch"]}, headers=ADMIN)
    assert unknown.status_code == 404 and "'nosuch'" in unknown.json()["error"]["message"]
    assert api.post("/v1/keys", json={"name": "k", "models": True}, headers=ADMIN).status_code == 201
    taken = api.post("/v1/keys", json={"name": "k", "all_agents": True}, headers=ADMIN)
    assert taken.status_code == 409 and "stigmer key rm k" in taken.json()["error"]["hint"]


# -- the CLI, against the real app on a socket ------------------------------------------------------------
@pytest.fixture
def served(isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The API (create_app, uvicorn) on a free port in this process, and STIGMER_HOME pointing the CLI at
    it: the server's record names its address and api.token holds its token; the daemon counts as alive."""
    import uvicorn

    from stigmer.config import store
    from stigmer.server import control
    from stigmer.server import state as st
    from stigmer.server.api.app import create_app
    from stigmer.server.client import ApiClient
    from stigmer.server.keys import ensure_keys
    from stigmer.server.token import ensure_token

    port = free_port()
    monkeypatch.setenv("STIGMER_SERVER_PORT", str(port))
    ensure_keys(isolated_home)
    isolated_home.data_dir.mkdir(parents=True, exist_ok=True)
    token = ensure_token(isolated_home)
    app = create_app(store.load(isolated_home), isolated_home, token=token, worker_token="worker-token")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    st.write(isolated_home, st.DaemonState(pid=1, started=time.time(), api_url=url, phase=st.PHASE_READY))
    monkeypatch.setattr(control, "is_running", lambda _paths: True)
    ApiClient(url, token).post("/v1/agents", {"name": "poet"})
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from stigmer.cli import main as cli_main

    code = cli_main.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_key_commands_against_the_server(
    served: str, isolated_home: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _err = _cli(capsys, "key", "create", "ci", "--agents", "poet", "--models", "--expires", "30d")
    assert code == 0, out
    secrets = KEY_TEXT.findall(out)
    assert len(set(secrets)) == 1, out
    secret = secrets[0]
    assert "only time it is shown" in out and "agents:poet, models" in out and "expires in 30d" in out
    assert f"export OPENAI_BASE_URL={served}/v1" in out and f"export OPENAI_API_KEY={secret}" in out
    db = Database(isolated_home.data_dir / "stigmer.db")  # the printed text is the key the server keeps
    try:
        assert Keys(db).verify(secret) is not None

        code, out, _err = _cli(capsys, "key", "list")
        assert code == 0 and secret[11:] not in out
        header, row = out.splitlines()
        assert header.split() == ["NAME", "SCOPES", "CREATED", "LAST", "USED", "EXPIRES"]
        assert row.split() == ["ci", "agents:poet,", "models", "just", "now", "just", "now", "in", "30d"]

        code, out, _err = _cli(capsys, "key", "list", "--json")
        listed = json.loads(out)
        assert code == 0 and [k["name"] for k in listed] == ["ci"] and secret[11:] not in out

        code, out, err = _cli(capsys, "key", "create", "other", "--agents", "nosuch")
        assert code == 6 and "nosuch" in err and "stigmer agent list" in err

        code, out, err = _cli(capsys, "key", "create", "ci", "--all-agents")
        assert code == 7 and "stigmer key rm ci" in err

        code, out, _err = _cli(capsys, "key", "create", "bot", "--all-agents", "--json")
        made = json.loads(out)
        assert code == 0 and made["key"]["scopes"] == ["agents:*"] and made["base_url"] == f"{served}/v1"
        assert (
            KEY_TEXT.fullmatch(made["secret"])
            and made["key"]["expires"] is None
            and made["key"]["expired"] is False
        )

        code, out, _err = _cli(capsys, "key", "rm", "ci")
        assert code == 0 and "Key ci removed" in out
        assert Keys(db).verify(secret) is None  # at once
        assert Keys(db).verify(made["secret"]) is not None

        code, _out, err = _cli(capsys, "key", "rm", "ci")
        assert code == 6 and "No key named 'ci'" in err
    finally:
        db.close()


def test_key_create_refuses_both_agent_flags_and_an_empty_list(
    served: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as both:
        _cli(capsys, "key", "create", "x", "--agents", "poet", "--all-agents")
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    code, _out, err = _cli(capsys, "key", "create", "x", "--agents", " , ")
    assert code == 2 and "--agents needs at least one agent name" in err
    code, _out, err = _cli(capsys, "key", "create", "x")
    assert code == 2 and "at least one scope" in err
    code, out, _err = _cli(capsys, "key", "list")
    assert code == 0 and "No keys yet" in out

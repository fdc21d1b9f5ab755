"""`stigmer key ...`: the scoped keys of the OpenAI-compatible endpoint, through the server's HTTP API.
The keys themselves (their names, scopes, hashes, expiry) live in the server (endpoint/keys.py); this
module parses and prints. A key's text is printed once, by `create`: the server keeps only its hash."""

from __future__ import annotations

import argparse
import time
import urllib.parse
from typing import Any

from stigmer.cli.render import Out, terminal_safe
from stigmer.cli.run_cmd import _api
from stigmer.cli.session_cmd import ago
from stigmer.errors import ErrorCode, StigmerError


def _path(name: str) -> str:
    return f"/v1/keys/{urllib.parse.quote(name, safe='')}"


def _agents(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise StigmerError(
            "--agents needs at least one agent name.",
            hint="For example: --agents poet,writer    (or --all-agents)",
            code=ErrorCode.USAGE,
        )
    return names


def until(when: Any, now: float | None = None) -> str:
    """When a key expires: "never", "expired", "in 5m", "in 3h", "in 29d"."""
    if when is None:
        return "never"
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        return "-"
    s = when - (time.time() if now is None else now)
    if s <= 0:
        return "expired"
    # rounded to the nearest: a key made for 30d shows "in 30d", not "in 29d", the moment it is made
    if s < 3600 - 30:
        return f"in {max(1, round(s / 60))}m"
    if s < 86400 - 1800:
        return f"in {round(s / 3600)}h"
    return f"in {round(s / 86400)}d"


def _scopes(key: dict[str, Any]) -> str:
    scopes = key.get("scopes")
    return ", ".join(str(s) for s in scopes) if isinstance(scopes, list) and scopes else "-"


# -- stigmer key create --------------------------------------------------------------------------------------
def key_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "name": args.name,
        "all_agents": bool(args.all_agents),
        "models": bool(args.models),
        "expires": args.expires,
    }
    if args.agents is not None:
        body["agents"] = _agents(args.agents)
    api = _api()
    made = api.post("/v1/keys", body)
    base_url = f"{api.base_url}/v1"
    out = Out()
    if args.json:
        out.json({**made, "base_url": base_url})
        return 0
    key, secret = made.get("key") or {}, str(made.get("secret") or "")
    expires = "does not expire" if key.get("expires") is None else f"expires {until(key.get('expires'))}"
    out.success(terminal_safe(f"Key {key.get('name', args.name)} created: {_scopes(key)}; {expires}"))
    out.line()
    out.line(f"  {terminal_safe(secret)}")
    out.line()
    out.line("This is the only time it is shown: the server keeps only its hash. Copy it now.")
    out.line("Use it with any OpenAI client:")
    out.line(f"  export OPENAI_BASE_URL={base_url}")
    out.line(f"  export OPENAI_API_KEY={terminal_safe(secret)}")
    out.line(terminal_safe(f"Remove it (at once) with: stigmer key rm {key.get('name', args.name)}"))
    return 0


# -- stigmer key list ----------------------------------------------------------------------------------------
def key_list(args: argparse.Namespace) -> int:
    rows = _api().get("/v1/keys")
    out = Out()
    if args.json:
        out.json(rows)
        return 0
    if not rows:
        out.info("No keys yet. Make one: stigmer key create NAME --agents A,B", err=False)
        return 0
    out.line(f"{'NAME':<20} {'SCOPES':<32} {'CREATED':<10} {'LAST USED':<10} {'EXPIRES'}")
    for r in rows:
        name = terminal_safe(str(r.get("name", "")))
        scopes = terminal_safe(_scopes(r))
        used = ago(r["last_used"]) if r.get("last_used") is not None else "never"
        out.line(f"{name:<20} {scopes:<32} {ago(r.get('created')):<10} {used:<10} {until(r.get('expires'))}")
    return 0


# -- stigmer key rm ------------------------------------------------------------------------------------------
def key_rm(args: argparse.Namespace) -> int:
    result = _api().request("DELETE", _path(args.name))
    removed = result.get("removed", args.name) if isinstance(result, dict) else args.name
    Out().success(terminal_safe(f"Key {removed} removed: it no longer works"))
    return 0

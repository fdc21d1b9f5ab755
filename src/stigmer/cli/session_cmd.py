"""`stigmer session ...`: conversations, through the server's HTTP API. The sessions themselves (their
names, turns, forks, the one-turn-at-a-time rule) live in the server; this module parses and prints."""

from __future__ import annotations

import argparse
import time
import urllib.parse
from datetime import datetime
from typing import Any

from stigmer.cli.render import Out, terminal_safe
from stigmer.cli.run_cmd import _api


def _path(name: str) -> str:
    return f"/v1/sessions/{urllib.parse.quote(name, safe='')}"


def _epoch(when: Any) -> float | None:
    """A time from the API: seconds since the epoch, or an RFC 3339 text."""
    if isinstance(when, bool):
        return None
    if isinstance(when, (int, float)):
        return float(when)
    if isinstance(when, str) and when:
        try:
            return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def ago(when: Any, now: float | None = None) -> str:
    """How long ago: "just now", "5m ago", "3h ago", "2d ago"; "-" when unknown."""
    t = _epoch(when)
    if t is None:
        return "-"
    s = max(0, int((time.time() if now is None else now) - t))
    if s < 10:
        return "just now"
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def _stamp(when: Any) -> str:
    t = _epoch(when)
    if t is None:
        return "-"
    return f"{datetime.fromtimestamp(t).strftime('%Y-%m-%d %H:%M:%S')} ({ago(t)})"


def _count(turns: Any) -> int:
    """`turns` is a number in a summary and the list of turns in a session."""
    return len(turns) if isinstance(turns, list) else int(turns or 0)


def _block(label: str, text: str) -> list[str]:
    """`label` then the text, its further lines indented under the first; shown, never obeyed."""
    lines = terminal_safe(text).splitlines() or [""]
    pad = " " * (len(label) + 1)
    return [f"  {label} {lines[0]}", *(f"  {pad}{line}" for line in lines[1:])]


# -- stigmer session list ------------------------------------------------------------------------------------
def session_list(args: argparse.Namespace) -> int:
    query = f"?{urllib.parse.urlencode({'agent': args.agent})}" if args.agent else ""
    rows = _api().get(f"/v1/sessions{query}")
    out = Out()
    if args.json:
        out.json(rows)
        return 0
    if not rows:
        which = f" of agent {terminal_safe(args.agent)}" if args.agent else ""
        out.info(f'No sessions{which} yet. Start one: stigmer run --session NAME -m "Hello"', err=False)
        return 0
    out.line(f"{'NAME':<24} {'AGENT':<16} {'TURNS':>5}  {'LAST USED':<10} {'LAST STATE'}")
    for r in rows:
        name = terminal_safe(str(r.get("name", "")))
        agent = terminal_safe(str(r.get("agent", "")))[:16]
        state = terminal_safe(str(r.get("last_state") or "-"))
        out.line(f"{name:<24} {agent:<16} {_count(r.get('turns')):>5}  {ago(r.get('updated')):<10} {state}")
    return 0


# -- stigmer session get -------------------------------------------------------------------------------------
def session_get(args: argparse.Namespace) -> int:
    session = _api().get(_path(args.name))
    out = Out()
    if args.json:
        out.json(session)
        return 0
    turns = session.get("turns") if isinstance(session.get("turns"), list) else []
    out.line(terminal_safe(f"Session {session.get('name', args.name)}"))
    out.line(out.rule)
    out.line(terminal_safe(f"  {'Agent:':<9} {session.get('agent', '')}"))
    out.line(f"  {'Turns:':<9} {len(turns)}")
    out.line(f"  {'Created:':<9} {_stamp(session.get('created'))}")
    out.line(f"  {'Updated:':<9} {_stamp(session.get('updated'))}")
    if session.get("forked_from"):
        at = f" at turn {session['forked_at']}" if session.get("forked_at") is not None else ""
        out.line(terminal_safe(f"  {'Forked:':<9} from {session['forked_from']}{at}"))
    for t in turns:
        out.line()
        out.line(terminal_safe(f"Turn {t.get('turn')}  {t.get('execution_id', '-')}  {t.get('state', '-')}"))
        for line in _block("You:  ", str(t.get("message") or "")):
            out.line(line)
        if t.get("output"):
            answer = str(t["output"])
        elif t.get("error"):
            answer = f"(failed: {t['error']})"
        else:
            answer = "(no answer)" if t.get("state") in ("COMPLETED", "FAILED", "CANCELLED") else "(not yet)"
        for line in _block("Agent:", answer):
            out.line(line)
    return 0


# -- stigmer session rm / fork -------------------------------------------------------------------------------
def session_rm(args: argparse.Namespace) -> int:
    result = _api().request("DELETE", _path(args.name))
    removed = result.get("removed", args.name) if isinstance(result, dict) else args.name
    Out().success(terminal_safe(f"Session {removed} removed"))
    return 0


def session_fork(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.at is not None:
        body["at"] = args.at
    if args.new_name is not None:
        body["name"] = args.new_name
    new = _api().post(f"{_path(args.name)}/fork", body)
    out = Out()
    if args.json:
        out.json(new)
        return 0
    at = f" at turn {new['forked_at']}" if new.get("forked_at") is not None else ""
    out.success(terminal_safe(f"Session {new.get('name')} forked from {args.name}{at}"))
    out.line(terminal_safe(f'Continue it: stigmer run --session {new.get("name")} -m "..."'))
    return 0

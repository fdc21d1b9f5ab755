"""`stigmer schedule ...` and `stigmer hook ...`: agents that run on a schedule or on a webhook, through
the server's HTTP API (server/triggers.py keeps them). This module parses and prints. A hook's secret is
printed once, by `add` and `rotate`."""

from __future__ import annotations

import argparse
import datetime as dt
import urllib.parse
from typing import Any

from stigmer.cli.render import Out, terminal_safe


def _api(*, start: bool = False) -> Any:
    from stigmer.cli.run_cmd import _api as api

    return api(start=start)


def ago(t: Any) -> str:
    from stigmer.cli.session_cmd import ago as since

    return since(t)


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def when(t: Any) -> str:
    """A fire time in local time: "2026-12-07 09:00:00 CET"."""
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "-"
    return dt.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def every_text(seconds: Any) -> str:
    if not isinstance(seconds, int) or seconds <= 0:
        return "-"
    parts, left = [], seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "every " + "".join(parts)


def _spec(s: dict[str, Any]) -> str:
    text = f"cron {s['cron']}" if s.get("cron") else every_text(s.get("every"))
    return text + (f" ({s['timezone']})" if s.get("timezone") else "")


# -- stigmer schedule ----------------------------------------------------------------------------------------
def schedule_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "agent": args.agent, "message": args.message}
    if args.every is not None:
        body["every"] = args.every
    if args.cron is not None:
        body["cron"] = args.cron
    for key in ("session", "timezone", "overlap"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    made = _api(start=True).post("/v1/schedules", body)
    out = Out()
    if args.json:
        out.json(made)
        return 0
    out.success(terminal_safe(f"Schedule {made['name']} added: agent {made['agent']}, {_spec(made)}"))
    out.line("Next fires:")
    for t in made.get("next") or []:
        out.line(f"  {when(t)}")
    out.line(
        terminal_safe(f"See it: stigmer schedule list    Fire it now: stigmer schedule run {made['name']}")
    )
    return 0


def schedule_list(args: argparse.Namespace) -> int:
    rows = _api().get("/v1/schedules")
    out = Out()
    if args.json:
        out.json(rows)
        return 0
    if not rows:
        out.info(
            'No schedules yet. Add one: stigmer schedule add NAME --agent A --every 1h -m "..."', err=False
        )
        return 0
    out.line(f"{'NAME':<16} {'AGENT':<14} {'WHEN':<26} {'NEXT':<25} {'LAST':<10} {'LAST EXECUTION'}")
    for s in rows:
        nxt = "paused" if s.get("paused") else when((s.get("next") or [None])[0])
        last = f"{s['last_execution']} {s.get('last_state') or ''}" if s.get("last_execution") else "-"
        out.line(
            terminal_safe(
                f"{s['name']:<16} {s['agent']:<14} {_spec(s):<26} {nxt:<25} {ago(s.get('last_fire')):<10} {last}"
            )
        )
        if s.get("last_error"):
            out.line(terminal_safe(f"  ✗ last fire failed: {s['last_error']}"))
        if s.get("temporal_error"):
            out.line(terminal_safe(f"  ✗ Temporal did not answer about it: {s['temporal_error']}"))
    return 0


def schedule_verb(args: argparse.Namespace) -> int:
    verb = args.schedule_command
    result = _api().post(f"/v1/schedules/{_q(args.name)}/{verb}", {})
    out = Out()
    if getattr(args, "json", False):
        out.json(result)
        return 0
    done = {"pause": "paused", "resume": "resumed", "run": "fired now"}[verb]
    out.success(terminal_safe(f"Schedule {args.name} {done}."))
    if verb == "run":
        out.line(
            terminal_safe("Its execution shows in: stigmer schedule list    (or stigmer execution list)")
        )
    return 0


def schedule_rm(args: argparse.Namespace) -> int:
    _api().request("DELETE", f"/v1/schedules/{_q(args.name)}")
    Out().success(terminal_safe(f"Schedule {args.name} removed (also from Temporal)."))
    return 0


# -- stigmer hook --------------------------------------------------------------------------------------------
def _secret_block(out: Out, made: dict[str, Any]) -> None:
    hook, secret = made.get("hook") or {}, str(made.get("secret") or "")
    out.line(f"  URL:    {terminal_safe(str(hook.get('url', '')))}")
    out.line(f"  Secret: {terminal_safe(secret)}")
    out.line()
    out.line("The secret is shown only now. Senders sign each body with it (HMAC-SHA256, header")
    out.line("X-Hub-Signature-256: sha256=<hex>, as GitHub does: paste it as the webhook's secret, content")
    out.line("type application/json). The URL is on this machine only: expose it with a tunnel of your own.")


def hook_add(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "agent": args.agent}
    if args.template is not None:
        body["template"] = args.template
    if args.session is not None:
        body["session"] = args.session
    made = _api(start=True).post("/v1/hooks", body)
    out = Out()
    if args.json:
        out.json(made)
        return 0
    out.success(
        terminal_safe(f"Hook {made['hook']['name']} added: a signed POST runs agent {made['hook']['agent']}")
    )
    _secret_block(out, made)
    return 0


def hook_list(args: argparse.Namespace) -> int:
    rows = _api().get("/v1/hooks")
    out = Out()
    if args.json:
        out.json(rows)
        return 0
    if not rows:
        out.info("No hooks yet. Add one: stigmer hook add NAME --agent A", err=False)
        return 0
    out.line(f"{'NAME':<16} {'AGENT':<14} {'LAST DELIVERY':<14} {'URL'}")
    for h in rows:
        last = ago(h["last_delivery"]) if h.get("last_delivery") else "never"
        out.line(terminal_safe(f"{h['name']:<16} {h['agent']:<14} {last:<14} {h['url']}"))
        if h.get("template"):
            out.line(terminal_safe(f"  template: {h['template'][:100]}"))
    return 0


def hook_rotate(args: argparse.Namespace) -> int:
    made = _api().post(f"/v1/hooks/{_q(args.name)}/rotate", {})
    out = Out()
    if args.json:
        out.json(made)
        return 0
    out.success(terminal_safe(f"Hook {args.name} has a new secret: the old one no longer works."))
    _secret_block(out, made)
    return 0


def hook_rm(args: argparse.Namespace) -> int:
    _api().request("DELETE", f"/v1/hooks/{_q(args.name)}")
    Out().success(terminal_safe(f"Hook {args.name} removed: its URL answers 401 from now on."))
    return 0


def add_parsers(sub: Any) -> None:
    """The `schedule` and `hook` commands (main.py calls this)."""
    sch = sub.add_parser(
        "schedule",
        help="run an agent on a schedule (every 10m, or cron), as Temporal schedules",
        description="Each fire is an ordinary execution whose record says trigger: schedule NAME. The "
        "schedules are real Temporal schedules (temporal schedule list shows them); fires missed while "
        "the machine slept follow the catch-up policy (the last one within a day runs).",
    )
    ssub = sch.add_subparsers(dest="schedule_command", metavar="SUBCOMMAND", required=True)
    sa = ssub.add_parser("add", help="add a schedule and print its next 3 fires")
    sa.add_argument("name", help="the schedule's name: letters, digits, - and _")
    sa.add_argument("--agent", required=True, help="the agent to run")
    how = sa.add_mutually_exclusive_group(required=True)
    how.add_argument("--every", metavar="DURATION", help="an interval: 30s, 10m, 2h, 1d, 1h30m")
    how.add_argument("--cron", metavar="EXPR", help='a 5-field cron expression, e.g. "0 9 * * 1-5"')
    sa.add_argument("-m", "--message", required=True, help="the message each fire sends the agent")
    sa.add_argument("--session", help="run each fire as the next turn of this session")
    sa.add_argument(
        "--overlap",
        choices=["skip", "buffer", "cancel"],
        help="when a fire comes while the last run still runs: skip it (default), buffer one, cancel the old",
    )
    sa.add_argument("--timezone", metavar="TZ", help="the cron's time zone, e.g. Europe/Paris (default: UTC)")
    sa.add_argument("--json", action="store_true", help="machine-readable output")
    sa.set_defaults(handler="trigger_cmd:schedule_add")
    sl = ssub.add_parser("list", help="the schedules: next and last fire, the last execution and its state")
    sl.add_argument("--json", action="store_true", help="machine-readable output")
    sl.set_defaults(handler="trigger_cmd:schedule_list")
    for verb, text in (("pause", "stop firing until resumed"), ("resume", "fire again"), ("run", "fire now")):
        sv = ssub.add_parser(verb, help=text)
        sv.add_argument("name")
        sv.add_argument("--json", action="store_true", help="machine-readable output")
        sv.set_defaults(handler="trigger_cmd:schedule_verb")
    sr = ssub.add_parser("rm", help="remove a schedule (also from Temporal)")
    sr.add_argument("name")
    sr.set_defaults(handler="trigger_cmd:schedule_rm")

    hk = sub.add_parser(
        "hook",
        help="run an agent on a signed webhook (GitHub's X-Hub-Signature-256)",
        description="A POST to the hook's URL, signed with its secret (HMAC-SHA256 of the body), runs the "
        "agent with a message made from --template and the JSON body (or the body as text).",
    )
    hsub = hk.add_subparsers(dest="hook_command", metavar="SUBCOMMAND", required=True)
    ha = hsub.add_parser("add", help="add a hook and print its URL and secret (once)")
    ha.add_argument("name", help="the hook's name: letters, digits, - and _")
    ha.add_argument("--agent", required=True, help="the agent to run")
    ha.add_argument(
        "--template",
        help='the message, with fields of the JSON body: "PR {{number}}: {{pull_request.title}}"',
    )
    ha.add_argument("--session", help="run each delivery as the next turn of this session")
    ha.add_argument("--json", action="store_true", help="machine-readable output")
    ha.set_defaults(handler="trigger_cmd:hook_add")
    hl = hsub.add_parser("list", help="the hooks and their URLs (never their secrets)")
    hl.add_argument("--json", action="store_true", help="machine-readable output")
    hl.set_defaults(handler="trigger_cmd:hook_list")
    hr = hsub.add_parser("rotate", help="give a hook a new secret, printed once (the old one stops working)")
    hr.add_argument("name")
    hr.add_argument("--json", action="store_true", help="machine-readable output")
    hr.set_defaults(handler="trigger_cmd:hook_rotate")
    hm = hsub.add_parser("rm", help="remove a hook")
    hm.add_argument("name")
    hm.set_defaults(handler="trigger_cmd:hook_rm")

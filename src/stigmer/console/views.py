"""What the console's pages show, as plain data built from the server's own records and status (the same
ones the CLI reads through the API): no HTML here, and nothing that the pages could not also get from
`stigmer ... --json`."""

from __future__ import annotations

import re
import time
from typing import Any

from stigmer.server.executions import Executions

STATES = ("PENDING", "IN_PROGRESS", "WAITING_APPROVAL", "COMPLETED", "FAILED", "CANCELLED")
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
MAX_TURNS_SHOWN = 100  # the newest turns of a long session; older ones stay in `stigmer session get`
AGENT_SOURCE = "agent"  # how the YAML editor's text is named in parse errors ("agent:3: ...")


def overview(status: dict[str, Any], ex: Executions) -> dict[str, Any]:
    """`stigmer server status`, the recent executions and the approvals waiting, for the Overview."""
    services = [
        {
            "name": name,
            "state": svc.get("state"),
            "pid": svc.get("pid"),
            "address": svc.get("address"),
            "uptime": svc.get("uptime"),
            "restarts": svc.get("restarts", 0),
            "last_failure": svc.get("last_failure"),
        }
        for name, svc in (status.get("services") or {}).items()
    ]
    return {
        "running": status.get("running"),
        "unsupervised": status.get("unsupervised"),
        "phase": status.get("phase"),
        "pid": status.get("pid"),
        "uptime": status.get("uptime"),
        "services": services,
        "llm": status.get("llm"),
        "temporal": status.get("temporal"),
        "temporal_ui": (status.get("web_ui") or {}).get("temporal"),
        "executions": ex.records(state=None, agent=None, limit=8),
        "approvals": len(ex.db.open_approvals()),
    }


def inbox(ex: Executions) -> list[dict[str, Any]]:
    """Every tool call waiting for a person, across executions, oldest first, with how long it waited."""
    now = time.time()
    return [{**a, "waited": round(now - float(a["asked"]), 1)} for a in ex.db.open_approvals()]


def transcript(ex: Executions, name: str) -> dict[str, Any]:
    """A session and its turns, each with the messages of its execution (the user's, the answers, the
    tool calls and their results), for the chat page."""
    session = ex.session(name)
    turns = session.pop("turns")
    shown = []
    for turn in turns[-MAX_TURNS_SHOWN:]:
        record = ex.record(str(turn["execution_id"]))
        shown.append(
            {
                "turn": turn["turn"],
                "execution_id": turn["execution_id"],
                "state": record["state"],
                "message": record["message"],
                "messages": [m for m in record.get("messages") or [] if m.get("role") != "system"],
                "output": record.get("output"),
                "error": record.get("error"),
                "approvals": record.get("approvals") or [],
                "duration": record.get("duration"),
                "usage": record.get("usage"),
            }
        )
    return {**session, "turns": shown, "turn_count": len(turns)}


def error_line(message: str, source: str = AGENT_SOURCE) -> int | None:
    """The line an agent file's error names ("agent:3: field ..."), if it names one."""
    match = re.match(re.escape(source) + r":(\d+)\b", message)
    return int(match.group(1)) if match else None


def without_source(message: str, source: str = AGENT_SOURCE) -> str:
    """An agent file's error without its "agent:3: " prefix (the editor shows the line itself)."""
    return re.sub("^" + re.escape(source) + r"(:\d+)?: ", "", message)


def agent_yaml(spec: dict[str, Any]) -> str:
    """An agent as the YAML a person would write (the field order of the README)."""
    import io

    from ruamel.yaml import YAML

    from stigmer.agents.spec import FIELDS

    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 100
    buffer = io.StringIO()
    yaml.dump({k: spec[k] for k in FIELDS if k in spec}, buffer)
    return buffer.getvalue()


NEW_AGENT = """\
name: my-agent
instructions: You are a helpful assistant. Answer clearly and concisely.
# model: qwen2.5-coder:7b      # optional: the configured llm.model otherwise
# temperature: 0.7             # optional, 0-2
# tools:
#   - workspace
"""

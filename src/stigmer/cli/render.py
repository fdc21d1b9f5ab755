"""The one place that prints: ✓ ✗ ℹ ⚠ lines, blocks, --json, and progress.

stdout carries results (the Ready block, a status, a listing, --json documents), so they pipe cleanly;
progress, notices, warnings and errors go to stderr. Colour only on a terminal and never with NO_COLOR.
Live bars only on a terminal; in a pipe or a log, progress is a plain line at each 10%. A terminal that
cannot show ✓ (PYTHONIOENCODING=ascii, an old console) gets ASCII markers. rich is imported only when a
live bar is drawn.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, TextIO

from stigmer.units import human_bytes

if TYPE_CHECKING:
    from stigmer.events import Event
    from stigmer.llm.provider import ModelInfo
    from stigmer.llm.status import LlmStatus

_COLORS = {"green": "32", "red": "31", "cyan": "36", "yellow": "33", "bold": "1", "dim": "2"}
MARKERS = {
    "ok": "✓", "bad": "✗", "info": "ℹ", "warn": "⚠", "rule": "─",
    "pending": "⏳", "started": "▶️", "agent": "🤖", "completed": "✅", "failed": "❌", "tool": "🔧", "arrow": "→",
}  # fmt: skip
ASCII_MARKERS = {
    "ok": "[ok]", "bad": "[x]", "info": "[i]", "warn": "[!]", "rule": "-",
    "pending": "[..]", "started": "[>]", "agent": "[agent]", "completed": "[done]", "failed": "[failed]",
    "tool": "[tool]", "arrow": "->",
}  # fmt: skip


# Text that comes from a model, a tool or a stored record is shown, never obeyed. ESC starts sequences
# that retitle the window, clear the screen, move the cursor over earlier lines or make some terminals
# type an answer back; the other C0 and C1 controls and the bidi overrides (U+202A-E, U+2066-9) hide or
# reorder what is shown. Each is shown escaped (\x1b, \u202e): nothing runs and nothing is silently lost.
# Newlines and tabs stay; a carriage return is dropped, so CRLF text reads as lines and a bare CR cannot
# write over what was printed. Each character is handled alone, so a sequence split across two streamed
# pieces is made safe as well.
_UNSAFE: dict[int, str | None] = {
    c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A, 0x0D)
}
_UNSAFE |= {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_UNSAFE[0x0D] = None


def terminal_safe(text: str) -> str:
    """`text` with every control character and bidi override escaped (see _UNSAFE), for the terminal."""
    return text.translate(_UNSAFE)


def use_color(stream: TextIO) -> bool:
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


def can_show(stream: TextIO, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class Out:
    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.color = use_color(self.stdout)
        self.err_color = use_color(self.stderr)
        fancy = can_show(self.stdout, "".join(MARKERS.values())) and can_show(
            self.stderr, "".join(MARKERS.values())
        )
        self.marks = MARKERS if fancy else ASCII_MARKERS

    @property
    def rule(self) -> str:
        return self.marks["rule"] * 37

    def _paint(self, text: str, color: str, *, err: bool = False) -> str:
        on = self.err_color if err else self.color
        return f"\033[{_COLORS[color]}m{text}\033[0m" if on else text

    def _mark(self, name: str, color: str, *, err: bool) -> str:
        return self._paint(self.marks[name], color, err=err)

    def line(self, text: str = "") -> None:
        """A line of the result (stdout)."""
        print(text, file=self.stdout, flush=True)

    def note(self, text: str = "") -> None:
        """A line about what is happening, not the result (stderr)."""
        print(text, file=self.stderr, flush=True)

    def success(self, text: str) -> None:
        self.line(f"{self._mark('ok', 'green', err=False)} {text}")

    def info(self, text: str, *, err: bool = True) -> None:
        print(
            f"{self._mark('info', 'cyan', err=err)} {text}",
            file=self.stderr if err else self.stdout,
            flush=True,
        )

    def warn(self, text: str) -> None:
        self.note(f"{self._mark('warn', 'yellow', err=True)} {text}")

    def error(self, message: str, hint: str = "") -> None:
        # An error may quote what a server, a model or a file said: shown, never obeyed.
        print(f"{self._mark('bad', 'red', err=True)} Error: {terminal_safe(message)}", file=self.stderr)
        if hint:
            print(f"\n{terminal_safe(hint)}", file=self.stderr)
        self.stderr.flush()

    def json_error(self, error: dict[str, str]) -> None:
        print(json.dumps({"error": error}, indent=2, sort_keys=True), file=self.stderr, flush=True)

    def json(self, data: Any) -> None:
        self.line(json.dumps(_plain(data), indent=2, sort_keys=True))

    def ok(self) -> str:
        return self._mark("ok", "green", err=False)

    def bad(self) -> str:
        return self._mark("bad", "red", err=False)

    # -- blocks ------------------------------------------------------------------------------------
    def llm_block(self, st: LlmStatus) -> None:
        self.line("LLM Configuration:")
        if st.remote:
            state = f"{self.ok()} Connected" if st.running else f"{self.bad()} Not Reachable"
        else:
            state = f"{self.ok()} Running" if st.running else f"{self.bad()} Not Running"
        self.line(f"  Provider: {st.label} {state}")
        if st.running and not st.remote:
            pid = str(st.pid) if st.pid else "- (started outside Stigmer)"
            self.line(f"  PID:      {pid}")
        model = st.model
        if st.remote:
            if st.running and not st.model_available and st.available:
                model += " (not in the endpoint's model list)"
        elif not st.model_available and not st.running:
            model += " (will be downloaded on first use)"
        elif not st.model_available:
            model += " (not downloaded yet)"
        self.line(f"  Model:    {model}")
        if st.running or st.remote:
            self.line(f"  Endpoint: {st.base_url}")
        if st.running:
            self.line(f"  Available: {', '.join(st.available) if st.available else '(none)'}")
        for note in st.notes:
            self.line(f"  Note:     {note}")
        if st.fallback:
            self.line()
            self.fallback_block(st.fallback)

    def server_stopped(self) -> None:
        self.line("Stigmer Server Status:")
        self.line(self.rule)
        self.line(f"  Status: {self.bad()} Stopped")
        self.line()
        self.line("To start: stigmer server")

    def server_block(self, data: dict[str, Any]) -> None:
        """The original CLI's status layout, filled with every service's real state."""
        from stigmer.llm.status import LlmStatus

        self.line("Stigmer Server Status:")
        self.line(self.rule)
        running = bool(data.get("running"))
        if data.get("unsupervised"):
            warn = self._mark("warn", "yellow", err=False)
            self.line(f"  Status: {warn} Services running, not supervised (the daemon is not running)")
        else:
            self.line(f"  Status: {self.ok() + ' Running' if running else self.bad() + ' Stopped'}")
        if data.get("pid"):
            self.line(f"  PID:    {data['pid']}")
        self.line(f"  Port:   {data.get('port', '')}")
        self.line(f"  Data:   {_home_short(str(data.get('data', '')))}")
        if data.get("uptime") is not None:
            self.line(f"  Uptime: {duration(float(data['uptime']))}")
        services = data.get("services") or {}
        if services:
            self.line()
            self.line("Services:")
            width = max(len(n) for n in services)
            for name, svc in services.items():
                self.line(f"  {name:<{width}}  {self._service_line(svc)}")
                if svc.get("last_failure") and (svc.get("restarts") or svc.get("state") == "failed"):
                    self.line(f"  {'':<{width}}    last failure: {svc['last_failure']}")
            if data.get("unsupervised"):
                self.line()
                self.line(
                    "  Nothing restarts them if they fail. The next `stigmer server` adopts them as they"
                )
                self.line("  are (no second copies, no restart); `stigmer server stop` stops them.")
        llm = data.get("llm")
        if isinstance(llm, dict):
            self.line()
            self.llm_block(LlmStatus.from_dict(llm))
        web = (data.get("web_ui") or {}).get("temporal")
        if web:
            self.line()
            self.line("Web UI:")
            self.line(f"  Temporal:  {web}  (sign in: stigmer server temporal-ui)")
        schedules = data.get("schedules")
        if isinstance(schedules, dict) and schedules.get("count"):
            from stigmer.cli.trigger_cmd import when

            self.line()
            paused = f", {schedules['paused']} paused" if schedules.get("paused") else ""
            nxt = (
                f"next: {schedules.get('next_name')} at {when(schedules['next'])}"
                if schedules.get("next")
                else "none due"
            )
            self.line(f"Schedules: {schedules['count']}{paused}; {nxt}  (stigmer schedule list)")

    def _service_line(self, svc: dict[str, Any]) -> str:
        state = str(svc.get("state", ""))
        mark = {
            "running": f"{self.ok()} Running",
            "external": f"{self._mark('info', 'cyan', err=False)} External",
            "failed": f"{self.bad()} Failed",
            "stopped": f"{self.bad()} Stopped",
        }.get(state, f"{self.marks['warn']} {state.capitalize()}")
        parts = [f"{mark:<12}"]
        parts.append(f"PID {svc['pid']}" if svc.get("pid") else "PID -")
        if svc.get("address"):
            parts.append(str(svc["address"]))
        if svc.get("uptime") is not None:
            parts.append(f"up {duration(float(svc['uptime']))}")
        if state != "external":
            parts.append(f"restarts {svc.get('restarts', 0)}")
        return "   ".join(parts)

    def fallback_block(self, fb: dict[str, Any]) -> None:
        mark = self._mark("warn", "yellow", err=False)
        self.line(
            f"{mark} Offline fallback: the built-in engine is serving instead of the configured Local LLM."
        )
        self.line(f"  Why:      {fb.get('reason', '')}")
        self.line(
            f"  Serving:  {fb.get('model', '')} ({fb.get('size', '')}), a small model, "
            "fine for trying things out, weaker than"
        )
        self.line(f"            the configured {fb.get('configured_model', '')}")
        self.line("  To get the configured model once the network is back, run again: stigmer server")
        self.line("  Or pull it for the built-in engine from the model registry (if only the runtime's")
        self.line("  download is blocked):")
        self.line("    stigmer config set llm.provider llamacpp")
        self.line(f"    stigmer server llm pull {fb.get('configured_model', '')}")

    def model_list(self, models: list[ModelInfo], current: str, same: Any) -> None:
        self.line("Available Models:")
        self.line(self.rule)
        if not models:
            self.line("  (none yet)")
        for m in models:
            mark = " (current)" if same(m.name, current) else ""
            size = human_bytes(m.size) if m.size else "-"
            self.line(f"  {m.name}{mark}    {size}    {_when(m.modified)}")
        self.line()
        self.line("To pull a new model:")
        self.line("  stigmer server llm pull <model-name>")


def duration(seconds: float) -> str:
    """1h 2m, 3m 4s, 5s."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m {s % 60}s"
    return f"{s}s"


def _home_short(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if home and path.startswith(home + os.sep) else path


def _when(rfc3339: str) -> str:
    return rfc3339[:19].replace("T", " ") if rfc3339 else "-"


def _plain(data: Any) -> Any:
    if is_dataclass(data) and not isinstance(data, type):
        return asdict(data)
    if isinstance(data, list):
        return [_plain(x) for x in data]
    return data


class Progress:
    """Turns core Events into output: live bars on a terminal, a line per 10% elsewhere."""

    def __init__(self, out: Out) -> None:
        self.out = out
        self.live = out.stderr.isatty()
        self._last_message: str | None = None
        self._tenths: dict[str, int] = {}
        self._bars: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __call__(self, ev: Event) -> None:
        if ev.key is None or ev.total is None:
            self._message(f"{ev.phase}: {ev.message}")
            return
        if self.live:
            self._bar(ev)
        else:
            self._tenth(ev)

    def _message(self, text: str) -> None:
        if text == self._last_message:
            return
        self._last_message = text
        if self._bars is not None:
            self._bars.console.print(f"   {text}", highlight=False)
        else:
            self.out.note(f"   {text}")

    def _tenth(self, ev: Event) -> None:
        assert ev.key is not None and ev.total is not None
        done = ev.done or 0
        tenth = min(10, done * 10 // ev.total) if ev.total else 10
        if self._tenths.get(ev.key, -1) >= tenth:
            return
        self._tenths[ev.key] = tenth
        self.out.note(
            f"   {ev.phase}: {ev.message}: {tenth * 10}% ({human_bytes(done)} / {human_bytes(ev.total)})"
        )

    def _bar(self, ev: Event) -> None:
        if self._bars is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import (
                Progress as Bars,
            )

            console = Console(file=self.out.stderr, no_color=not self.out.err_color)
            self._bars = Bars(
                TextColumn("   {task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._bars.start()
        assert ev.key is not None
        task = self._tasks.get(ev.key)
        if task is None:
            task = self._tasks[ev.key] = self._bars.add_task(ev.message, total=ev.total)
        self._bars.update(task, completed=ev.done or 0, total=ev.total)

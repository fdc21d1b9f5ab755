"""The one place that prints: ✓ ✗ ℹ ⚠ lines, blocks, --json, and progress.

Colour only on a terminal and never with NO_COLOR. Live bars and spinners only on a terminal; in a
pipe or a log, progress is a plain line at each 10%. rich is imported only when a live bar is drawn.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, TextIO

from stigmer.units import human_bytes

if TYPE_CHECKING:
    from stigmer.llm.provider import Event, LlmStatus, ModelInfo

RULE = "─" * 37
_COLORS = {"green": "32", "red": "31", "cyan": "36", "yellow": "33", "bold": "1", "dim": "2"}


def use_color(stream: TextIO) -> bool:
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


class Out:
    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.color = use_color(self.stdout)
        self.err_color = use_color(self.stderr)

    def _paint(self, text: str, color: str, *, err: bool = False) -> str:
        on = self.err_color if err else self.color
        return f"\033[{_COLORS[color]}m{text}\033[0m" if on else text

    def line(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)

    def success(self, text: str) -> None:
        self.line(f"{self._paint('✓', 'green')} {text}")

    def info(self, text: str) -> None:
        self.line(f"{self._paint('ℹ', 'cyan')} {text}")

    def warn(self, text: str) -> None:
        self.line(f"{self._paint('⚠', 'yellow')} {text}")

    def error(self, message: str, hint: str = "") -> None:
        print(f"{self._paint('✗', 'red', err=True)} Error: {message}", file=self.stderr)
        if hint:
            print(f"\n{hint}", file=self.stderr)
        self.stderr.flush()

    def json(self, data: Any) -> None:
        self.line(json.dumps(_plain(data), indent=2, sort_keys=True))

    def ok(self) -> str:
        return self._paint("✓", "green")

    def bad(self) -> str:
        return self._paint("✗", "red")

    # -- blocks ------------------------------------------------------------------------------------
    def llm_block(self, st: LlmStatus) -> None:
        self.line("LLM Configuration:")
        state = f"{self.ok()} Running" if st.running else f"{self.bad()} Not Running"
        self.line(f"  Provider: {st.label} {state}")
        if st.running:
            pid = str(st.pid) if st.pid else "- (started outside Stigmer)"
            self.line(f"  PID:      {pid}")
        model = st.model
        if not st.model_available and not st.running:
            model += " (will be downloaded on first use)"
        elif not st.model_available:
            model += " (not downloaded yet)"
        self.line(f"  Model:    {model}")
        if st.running:
            self.line(f"  Endpoint: {st.base_url}")
            self.line(f"  Available: {', '.join(st.available) if st.available else '(none)'}")
        if st.fallback:
            self.line()
            self.fallback_block(st.fallback)

    def fallback_block(self, fb: dict[str, Any]) -> None:
        self.warn("Offline fallback: the built-in engine is serving instead of the configured Local LLM.")
        self.line(f"  Why:      {fb.get('reason', '')}")
        self.line(
            f"  Serving:  {fb.get('model', '')} ({fb.get('size', '')}) — a small model, "
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
        self.line(RULE)
        if not models:
            self.line("  (none yet)")
        for m in models:
            mark = " (current)" if same(m.name, current) else ""
            size = human_bytes(m.size) if m.size else "-"
            self.line(f"  {m.name}{mark}    {size}    {_when(m.modified)}")
        self.line()
        self.line("To pull a new model:")
        self.line("  stigmer server llm pull <model-name>")


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
        self.live = out.stdout.isatty()
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
            self.out.line(f"   {text}")

    def _tenth(self, ev: Event) -> None:
        assert ev.key is not None and ev.total is not None
        done = ev.done or 0
        tenth = min(10, done * 10 // ev.total) if ev.total else 10
        if self._tenths.get(ev.key, -1) >= tenth:
            return
        self._tenths[ev.key] = tenth
        self.out.line(
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

            console = Console(file=self.out.stdout, no_color=not self.out.color)
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

"""`stigmer chat`: a conversation at the terminal, each message a turn of a session (an execution).

The turns go through the server's HTTP API exactly as `stigmer run --session` sends them, and are shown
by run_cmd's `follow` (streaming, tool calls, approvals asked inline, Ctrl-C cancels, API restarts ridden
out). Only what a chat adds lives here: the prompt, its commands, multi-line input and the history.
Nothing heavy is imported: the first prompt must come within a few hundred milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from stigmer.cli.render import Out, terminal_safe
from stigmer.cli.run_cmd import StreamView, _api, _submit, follow
from stigmer.errors import ErrorCode, StigmerError
from stigmer.executions.contract import EventKind as E
from stigmer.paths import Paths
from stigmer.server.client import ApiClient

PROMPT = ">>> "
MORE = "... "  # inside a multi-line message
QUOTES = '"""'
HISTORY_LINES = 1000
EXIT = ("/exit", "/bye", "/quit")
HELP = """\
  /session   the name of the current session
  /new       start a new session (with the same agent)
  /help      this list
  /exit      leave (also Ctrl-D)
  \"\"\"        starts and ends a message of several lines
  Ctrl-C     during an answer: cancel that turn; at the prompt: clear the line (twice: leave)"""


class ChatView(StreamView):
    """A turn as a chat shows it: the answer and what the agent does (tool calls, approvals, notices),
    without the phases and the summary block of `stigmer run`; a turn that did not complete says so."""

    def handle(self, kind: str, data: dict[str, Any]) -> bool:
        if kind in (E.PENDING, E.STARTED):
            return False
        return super().handle(kind, data)

    def summary(self) -> None:
        rec = self.final or {}
        state = rec.get("state")
        if state == "CANCELLED":
            self._print(f"{self.out.marks['failed']} Turn cancelled")
        elif state != "COMPLETED":
            self._print(f"{self.out.marks['failed']} Turn failed: {rec.get('error') or 'unknown reason'}")


class Terminal:
    """Input typed at a terminal: a prompt, line editing and arrow-key history (readline when there is
    one; without it, as on Windows, plain input() without history)."""

    interactive = True

    def __init__(self, history: Path) -> None:
        self.history = history
        self.rl: Any = None
        try:
            import readline
        except ImportError:
            return
        self.rl = readline
        readline.set_history_length(HISTORY_LINES)
        try:
            readline.read_history_file(str(history))
        except (OSError, UnicodeDecodeError):
            pass  # none yet, or unreadable: start without

    def read(self, prompt: str) -> str:
        return input(prompt)

    def length(self) -> int:
        return int(self.rl.get_current_history_length()) if self.rl is not None else 0

    def forget_since(self, length: int) -> None:
        """Drop what was typed after `length` entries (the answers to approval prompts)."""
        if self.rl is None:
            return
        while self.rl.get_current_history_length() > length:
            self.rl.remove_history_item(self.rl.get_current_history_length() - 1)

    def save(self) -> None:
        """Write the history, private to the user (0600) and bounded to HISTORY_LINES. It is a
        convenience: a failure to write it is not the chat's."""
        if self.rl is None:
            return
        path = str(self.history)
        try:
            Paths.from_env().ensure(self.history.parent)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # never readable by others
            self.rl.write_history_file(path)
            if os.name != "nt":
                os.chmod(path, 0o600)
        except OSError:
            pass


class Pipe:
    """Input from a pipe or a file: each line is a message; no prompt, no history."""

    interactive = False

    def read(self, prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def length(self) -> int:
        return 0

    def forget_since(self, length: int) -> None:
        pass

    def save(self) -> None:
        pass


def read_message(lines: Terminal | Pipe) -> tuple[str, bool]:
    """One message and whether it was quoted: a line, or the lines between two lines starting and ending
    with \"\"\" (never a command). EOFError at the end of input (in a pipe, an unfinished multi-line
    message is sent first)."""
    first = lines.read(PROMPT)
    head = first.strip()
    if not head.startswith(QUOTES):
        return head, False
    rest = head[len(QUOTES) :].lstrip()
    if len(rest) >= len(QUOTES) and rest.endswith(QUOTES):
        return rest[: -len(QUOTES)].strip(), True  # """all on one line"""
    parts = [rest] if rest else []
    while True:
        try:
            line = lines.read(MORE)
        except EOFError:
            if lines.interactive or not parts:
                raise
            return "\n".join(parts), True  # the script ended it
        end = line.rstrip()
        if end.endswith(QUOTES):
            if end[: -len(QUOTES)]:
                parts.append(end[: -len(QUOTES)])
            return "\n".join(parts), True
        parts.append(line)


def _session_path(name: str) -> str:
    return f"/v1/sessions/{urllib.parse.quote(name, safe='')}"


def _turns(session: dict[str, Any]) -> int:
    turns = session.get("turns")
    return len(turns) if isinstance(turns, list) else int(turns or 0)


class Chat:
    def __init__(self, api: ApiClient, out: Out, lines: Terminal | Pipe, agent: str) -> None:
        self.api = api
        self.out = out
        self.lines = lines
        self.agent = agent
        self.session = ""
        self.used: set[str] = set()  # names this chat picked (a session exists only from its first turn)

    # -- sessions -------------------------------------------------------------------------------------
    def new_name(self) -> str:
        """chat-<date>-<time>, with -2, -3... when that session exists already."""
        base = "chat-" + time.strftime("%Y%m%d-%H%M%S")
        for i in range(1, 100):
            name = base if i == 1 else f"{base}-{i}"
            if name in self.used:
                continue
            try:
                self.api.get(_session_path(name))
            except StigmerError as e:
                if e.code is not ErrorCode.NOT_FOUND:
                    raise
                return name
        import secrets

        return f"{base}-{secrets.token_hex(3)}"

    def open(self, args: argparse.Namespace) -> None:
        """The session to talk in: the most recent one (-c), the one named (--session), or a new one."""
        found: dict[str, Any] | None = None
        if args.continue_:
            listed = self.api.get("/v1/sessions")
            if not listed:
                raise StigmerError(
                    "There is no conversation to continue yet.",
                    hint="Start one: stigmer chat",
                    code=ErrorCode.NOT_FOUND,
                )
            found = listed[0]
        elif args.session:
            try:
                found = self.api.get(_session_path(args.session))
            except StigmerError as e:
                if e.code is not ErrorCode.NOT_FOUND:
                    raise  # a bad name: refused with the rule
        if found is not None:
            if args.agent and args.agent != found["agent"]:
                raise StigmerError(
                    f"Session {found['name']!r} is a conversation with the agent {found['agent']!r}, "
                    f"not {args.agent!r}.",
                    hint="Continue it without naming an agent, or start another: stigmer chat " + args.agent,
                    code=ErrorCode.INVALID_INPUT,
                )
            self.agent = str(found["agent"])
            self.begin(str(found["name"]), _turns(found))
            return
        if args.agent:
            self.api.get(f"/v1/agents/{urllib.parse.quote(args.agent, safe='')}")  # not there: 404 now
        self.begin(args.session or self.new_name(), 0)

    def begin(self, name: str, turns: int) -> None:
        self.session = name
        self.used.add(name)
        so_far = f", {turns} turn{'s' if turns != 1 else ''} so far" if turns else ""
        self.out.note(terminal_safe(f"Session: {name} (agent {self.agent}{so_far})"))

    # -- the loop -------------------------------------------------------------------------------------
    def loop(self) -> int:
        interactive = self.lines.interactive
        if interactive:
            self.out.note("Type a message; /help lists the commands; Ctrl-D leaves.")
        interrupted = False
        while True:
            try:
                text, quoted = read_message(self.lines)
            except EOFError:
                if interactive:
                    self.out.line()  # the prompt's line ends
                return 0
            except KeyboardInterrupt:
                if not interactive:
                    return ErrorCode.INTERRUPTED.exit_code
                self.out.line()
                if interrupted:
                    return 0
                interrupted = True
                self.out.note("(Ctrl-C again or Ctrl-D to leave)")
                continue
            interrupted = False
            self.lines.save()
            if not text:
                continue
            command = None if quoted else _command(text)
            if command is not None:
                if command in EXIT:
                    return 0
                self.do(command)
                continue
            code = self.turn(text)
            if code and not interactive:
                return code  # in a script, the first turn that does not complete ends it, with its code

    def do(self, command: str) -> None:
        if command == "/new":
            self.begin(self.new_name(), 0)
        elif command == "/session":
            self.out.line(terminal_safe(f"Session: {self.session} (agent {self.agent})"))
        elif command in ("/help", "/?"):
            self.out.line(HELP)
        else:
            self.out.warn(f"Unknown command {command}: /help lists them.")

    def turn(self, text: str) -> int:
        """One turn: sent, followed until it ends; the exit code `stigmer run` would have."""
        body = {"agent": self.agent, "message": text, "session": self.session}
        try:
            record = _submit(self.api, body, self.out)
        except KeyboardInterrupt:
            self.out.note(
                f"\nInterrupted while the turn was being sent; if it started, see: stigmer session get {self.session}"
            )
            return ErrorCode.INTERRUPTED.exit_code
        except StigmerError as e:
            self.out.error(e.message, e.hint)  # busy: another turn of this session runs
            return e.exit_code
        typed = self.lines.length()
        try:
            return follow(
                self.api,
                str(record["id"]),
                self.out,
                cancel_on_interrupt=True,
                view=ChatView(self.out, quiet=False),
            )
        except KeyboardInterrupt:  # a second Ctrl-C while the turn is being cancelled
            self.out.note("\nThe turn is being cancelled.")
            return ErrorCode.INTERRUPTED.exit_code
        except StigmerError as e:
            self.out.error(e.message, e.hint)
            return e.exit_code
        finally:
            self.lines.forget_since(typed)  # answers to approval prompts are not messages to recall


def _command(text: str) -> str | None:
    """The chat command `text` is (its first word, lower case), or None for a message. A line starting
    with a path (/etc/hosts ...) is a message."""
    word = text.split(maxsplit=1)[0].lower()
    if word in (*EXIT, "/new", "/session", "/help", "/?"):
        return word
    if word.startswith("/") and word[1:].isalpha() and word == text.strip().lower():
        return word  # an unknown command, said so
    return None


def chat(args: argparse.Namespace) -> int:
    out = Out()
    api = _api(start=True, out=out)
    lines: Terminal | Pipe
    if sys.stdin.isatty():
        lines = Terminal(Paths.from_env().data_dir / "chat_history")
    else:
        lines = Pipe()
    talk = Chat(api, out, lines, args.agent or "default")
    talk.open(args)
    return talk.loop()

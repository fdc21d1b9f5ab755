"""`stigmer`: parse, call the core, render. Nothing else lives here.

argparse (standard library) rather than typer/click: it costs ~7 ms to import against ~50 ms, and
`stigmer server llm status` has a 100 ms budget.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from stigmer import __version__
from stigmer.errors import ErrorCode, StigmerError

Handler = Callable[[argparse.Namespace], int]

EXIT_CODES_HELP = """\
exit codes:
  0 success, 1 unexpected error (a bug), 2 usage, 3 configuration, 4 network, 5 integrity (a download or
  file did not check out), 6 not found, 7 busy or in the way (a port, another command, a model in use),
  8 a service failed, 9 disk or filesystem, 10 not supported here, 11 refused (authorisation),
  12 an execution failed, 13 an execution was cancelled, 14 `stigmer doctor` found problems, 130 interrupted.
  A model that does not fit this machine is refused with 10 (model_too_large) or 9 (not enough disk).
  With --json, errors are printed on stderr as {"error": {"code", "message", "hint"}}."""


def _lines(text: str) -> int:
    """-n for logs: 0 or more (0 prints nothing, as tail does; with -f it only follows)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= n <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{n} is out of range: use 0 to 1000000 lines")
    return n


def _english_only() -> None:
    """argparse passes each of its own messages through gettext, which searches the disk for a
    translation catalogue at every call: ~8 ms of building this parser, a tenth of `stigmer server llm
    status`'s 100 ms. CPython ships no catalogue for them, and Stigmer's own texts are English."""
    argparse._ = lambda message: message  # type: ignore[attr-defined]


def _parser() -> argparse.ArgumentParser:
    _english_only()
    p = argparse.ArgumentParser(
        prog="stigmer",
        description="Stigmer local mode: a managed local LLM and AI agents on your machine.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-d", "--debug", action="store_true", help="debug logging and full tracebacks on stderr")
    p.add_argument("--version", action="version", version=f"stigmer {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    server = sub.add_parser(
        "server",
        help="start the Stigmer server in the background (idempotent)",
        description="Start the Stigmer server in the background: the Local LLM (downloading and installing "
        "what is missing), Temporal, the agent runner and the HTTP API, all supervised. Prints the "
        "status once every service passes its health check.",
    )
    server.add_argument(
        "--force",
        action="store_true",
        help="download the configured model even if it does not fit this machine",
    )
    server.set_defaults(handler="server_cmd:start")
    ssub = server.add_subparsers(dest="server_command", metavar="SUBCOMMAND")
    sstart = ssub.add_parser("start", help="the same as `stigmer server`")
    sstart.add_argument(
        "--force",
        action="store_true",
        help="download the configured model even if it does not fit this machine",
    )
    sstart.set_defaults(handler="server_cmd:start")
    ssub.add_parser(
        "run", help="run the server in the foreground (for containers and service managers)"
    ).set_defaults(handler="server_cmd:run")
    ssub.add_parser("stop", help="stop the server and every service it started").set_defaults(
        handler="server_cmd:stop"
    )
    ssub.add_parser("restart", help="stop everything, then start again").set_defaults(
        handler="server_cmd:restart"
    )
    st = ssub.add_parser("status", help="show every service: state, PID, port, uptime, restarts")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(handler="server_cmd:status")
    logs = ssub.add_parser("logs", help="show the services' logs, each line tagged with its component")
    logs.add_argument(
        "-n", "--lines", type=_lines, default=50, help="how many of the last lines (default 50; 0: none)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "-c",
        "--component",
        choices=("llm", "temporal", "agent-runner", "server", "daemon"),
        help="only this component's log",
    )
    logs.set_defaults(handler="server_cmd:logs")
    enable = ssub.add_parser("enable", help="start the server at login (systemd user unit / launchd agent)")
    enable.add_argument(
        "--system",
        action="store_true",
        help="Linux, as root: a system service run by a dedicated `stigmer` user (for multi-user hosts)",
    )
    enable.set_defaults(handler="server_cmd:enable")
    disable = ssub.add_parser("disable", help="no longer start the server at login")
    disable.add_argument(
        "--system", action="store_true", help="remove the system service (the stigmer user and its data stay)"
    )
    disable.set_defaults(handler="server_cmd:disable")
    tui = ssub.add_parser(
        "temporal-ui", help="open Temporal's Web UI, signed in (prints a one-time link, valid 2 minutes)"
    )
    tui.add_argument("--no-open", action="store_true", help="only print the link; do not open a browser")
    tui.set_defaults(handler="server_cmd:temporal_ui")

    llm = ssub.add_parser("llm", help="manage Local LLM models")
    lsub = llm.add_subparsers(dest="llm_command", metavar="SUBCOMMAND", required=True)
    ls = lsub.add_parser("list", help="list downloaded models (current one marked)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(handler="llm_cmd:list_models")
    pull = lsub.add_parser("pull", help="download a model")
    pull.add_argument("model", help="e.g. qwen2.5-coder:7b, or hf.co/ORG/REPO:QUANT for the built-in engine")
    pull.add_argument("--force", action="store_true", help="download it even if it does not fit this machine")
    pull.set_defaults(handler="llm_cmd:pull")
    rm = lsub.add_parser("rm", help="remove a downloaded model")
    rm.add_argument("model")
    rm.set_defaults(handler="llm_cmd:remove")
    lst = lsub.add_parser("status", help="is the Local LLM running, with which model")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(handler="llm_cmd:status")
    imp = lsub.add_parser("import", help="add a local GGUF file to the built-in engine's models")
    imp.add_argument("path", help="path to a .gguf file")
    imp.add_argument("--name", required=True, help="name to serve it under, e.g. mymodel:q4")
    imp.set_defaults(handler="llm_cmd:import_model")
    show = lsub.add_parser(
        "show",
        help="what a model needs here: memory estimate, context, whether it fits (reads only its header)",
        description="Read the model's GGUF header (its file, or the first MB from the registry or Hugging "
        "Face) and estimate its memory at the context it would get: weights, KV cache, overhead; say "
        "whether it fits on the GPU, partly, on the CPU, or not at all.",
    )
    show.add_argument("model", nargs="?", help="the model (default: the one configured)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler="llm_cmd:show")
    upd = lsub.add_parser("update", help="fetch a newer version of a model (only the layers that changed)")
    upd.add_argument("model", nargs="?", help="the model (default: the one configured)")
    upd.add_argument("--force", action="store_true", help="download it even if it does not fit this machine")
    upd.set_defaults(handler="llm_cmd:update")
    upg = lsub.add_parser(
        "upgrade-runtime",
        help="install a newer Local LLM runtime; the old one stays until the new one passes its health check",
    )
    upg.add_argument("version", nargs="?", help="e.g. 0.34.0 (default: the newest release)")
    upg.set_defaults(handler="llm_cmd:upgrade_runtime")

    run = sub.add_parser(
        "run",
        help="run an agent on the LLM and stream what it does",
        description="Run an agent (the built-in `default` one when none is named) as a durable execution "
        "and stream its answer. Starts the server if it is not running. Ctrl-C cancels the execution.",
    )
    run.add_argument(
        "agent", nargs="?", help="agent name (default: default, or the session's agent with --session/-c)"
    )
    run.add_argument("-m", "--message", help="the message for the agent (read from stdin when absent)")
    conversation = run.add_mutually_exclusive_group()
    conversation.add_argument(
        "--session", metavar="NAME", help="a turn of this conversation (started when it is new)"
    )
    conversation.add_argument(
        "-c",
        "--continue",
        dest="continue_",
        action="store_true",
        help="a turn of the most recently used session",
    )
    run.add_argument("--json", action="store_true", help="print the final execution record as JSON")
    run.add_argument("--detach", action="store_true", help="print the execution id and return at once")
    run.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a limit for this run: model_calls, tool_calls, tokens or seconds (repeatable; else the "
        "agent file's, else the defaults)",
    )
    run.set_defaults(handler="run_cmd:run")

    chat = sub.add_parser(
        "chat",
        help="talk with an agent at the terminal: each message is a turn of a session",
        description="A conversation with an agent (the built-in `default` one when none is named): each "
        "message is a turn of a session (a new one unless --session or -c), its answer streamed. Starts the "
        'server if it is not running. /help lists the commands; """ starts and ends a message of several '
        "lines; Ctrl-C cancels an answer; Ctrl-D leaves. When stdin is not a terminal, each line is a turn.",
    )
    chat.add_argument("agent", nargs="?", help="agent name (default: default, or the session's agent)")
    chat_session = chat.add_mutually_exclusive_group()
    chat_session.add_argument(
        "--session", metavar="NAME", help="talk in this session (started when it is new)"
    )
    chat_session.add_argument(
        "-c",
        "--continue",
        dest="continue_",
        action="store_true",
        help="go on with the most recently used session",
    )
    chat.set_defaults(handler="chat_cmd:chat")

    agent = sub.add_parser("agent", help="define agents (YAML files) and see them")
    asub = agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)
    ap = asub.add_parser(
        "apply",
        help="store or update an agent from a YAML file",
        description="Fields: name (required; letters, digits, - and _), instructions, model, temperature "
        "(0-2), max_tokens, tools, mcp_servers, workspace, output_schema.",
    )
    ap.add_argument("-f", "--file", required=True, help="the agent's YAML file (- for stdin)")
    ap.set_defaults(handler="run_cmd:agent_apply")
    al = asub.add_parser("list", help="the agents there are")
    al.add_argument("--json", action="store_true", help="machine-readable output")
    al.set_defaults(handler="run_cmd:agent_list")
    ag = asub.add_parser("get", help="one agent, as YAML")
    ag.add_argument("name")
    ag.add_argument("--json", action="store_true", help="machine-readable output")
    ag.set_defaults(handler="run_cmd:agent_get")
    ar = asub.add_parser("rm", help="remove an agent")
    ar.add_argument("name")
    ar.set_defaults(handler="run_cmd:agent_rm")

    ex = sub.add_parser("execution", help="see, follow, cancel and approve executions")
    esub = ex.add_subparsers(dest="execution_command", metavar="SUBCOMMAND", required=True)
    el = esub.add_parser("list", help="recent executions first")
    el.add_argument(
        "--state", help="only in this state (PENDING, IN_PROGRESS, WAITING_APPROVAL, COMPLETED, ...)"
    )
    el.add_argument("--agent", help="only of this agent")
    el.add_argument("-n", "--limit", type=_lines, default=20, help="how many (default 20)")
    el.add_argument("--json", action="store_true", help="machine-readable output")
    el.set_defaults(handler="run_cmd:execution_list")
    eg = esub.add_parser("get", help="one execution: its record and messages")
    eg.add_argument("id")
    eg.add_argument("--json", action="store_true", help="machine-readable output")
    eg.set_defaults(handler="run_cmd:execution_get")
    ec = esub.add_parser("cancel", help="cancel a running execution")
    ec.add_argument("id")
    ec.set_defaults(handler="run_cmd:execution_cancel")
    elog = esub.add_parser("logs", help="what an execution streamed (-f: attach to a running one)")
    elog.add_argument("id")
    elog.add_argument("-f", "--follow", action="store_true", help="keep following until it ends")
    elog.set_defaults(handler="run_cmd:execution_logs")
    for verb, text in (("approve", "allow"), ("deny", "refuse")):
        ea = esub.add_parser(verb, help=f"{text} the tool call an execution waits on")
        ea.add_argument("id")
        ea.add_argument(
            "--always", action="store_true", help=f"{text} this tool for the rest of the execution"
        )
        ea.set_defaults(handler=f"run_cmd:execution_{verb}")

    ses = sub.add_parser("session", help="conversations: each turn is an execution (stigmer run --session)")
    ssub2 = ses.add_subparsers(dest="session_command", metavar="SUBCOMMAND", required=True)
    sl = ssub2.add_parser("list", help="sessions, most recently used first")
    sl.add_argument("--agent", help="only of this agent")
    sl.add_argument("--json", action="store_true", help="machine-readable output")
    sl.set_defaults(handler="session_cmd:session_list")
    sg = ssub2.add_parser("get", help="one session's transcript, turn by turn")
    sg.add_argument("name")
    sg.add_argument("--json", action="store_true", help="machine-readable output")
    sg.set_defaults(handler="session_cmd:session_get")
    sr = ssub2.add_parser("rm", help="remove a session")
    sr.add_argument("name")
    sr.set_defaults(handler="session_cmd:session_rm")
    sf = ssub2.add_parser("fork", help="a new session with the first turns of this one (it stays as it is)")
    sf.add_argument("name")
    sf.add_argument("--at", type=int, metavar="TURN", help="keep turns 1 to TURN (default: the last turn)")
    sf.add_argument("--name", dest="new_name", metavar="NEW", help="the new session's name (default: picked)")
    sf.add_argument("--json", action="store_true", help="machine-readable output")
    sf.set_defaults(handler="session_cmd:session_fork")

    key = sub.add_parser(
        "key",
        help="keys for the OpenAI-compatible endpoint, each reaching only its scopes",
        description="Scoped keys (sk-stigmer-...) for OpenAI clients of the server's /v1 endpoint: a key "
        "reaches only the agents it names (model agent/NAME) and, with --models, the models; never the "
        "admin paths. The API token stays the admin credential.",
    )
    ksub = key.add_subparsers(dest="key_command", metavar="SUBCOMMAND", required=True)
    kc = ksub.add_parser("create", help="make a key and print it, once (only its hash is kept)")
    kc.add_argument("name", help="the key's name: letters, digits, - and _")
    reach = kc.add_mutually_exclusive_group()
    reach.add_argument("--agents", metavar="A,B", help="the agents it reaches (model agent/NAME)")
    reach.add_argument("--all-agents", action="store_true", help="every agent, also those added later")
    kc.add_argument("--models", action="store_true", help="the models themselves (the configured LLM's)")
    kc.add_argument(
        "--expires",
        metavar="DURATION",
        help="it stops working after this: 90m, 12h, 30d, 1w (default: never)",
    )
    kc.add_argument("--json", action="store_true", help="machine-readable output")
    kc.set_defaults(handler="key_cmd:key_create")
    kl = ksub.add_parser("list", help="the keys: name, scopes, created, last used, expiry (never the key)")
    kl.add_argument("--json", action="store_true", help="machine-readable output")
    kl.set_defaults(handler="key_cmd:key_list")
    kr = ksub.add_parser("rm", help="remove a key: it stops working at once")
    kr.add_argument("name")
    kr.set_defaults(handler="key_cmd:key_rm")

    from stigmer.cli.trigger_cmd import add_parsers as trigger_parsers

    trigger_parsers(sub)  # stigmer schedule ..., stigmer hook ...

    ep = sub.add_parser(
        "endpoint",
        help="the OpenAI-compatible URL for other tools (base URL, key, environment lines)",
        description="Stigmer serves the Local LLM (as `local`) and every agent (as `agent/NAME`) at one "
        "OpenAI-compatible URL on the API's port. This prints the base URL, how to make a key, and the "
        "OPENAI_BASE_URL / OPENAI_API_KEY lines for tools that read the environment.",
    )
    ep.add_argument("--json", action="store_true", help="machine-readable output")
    ep.set_defaults(handler="endpoint_cmd:endpoint")

    wk = sub.add_parser(
        "worker",
        help="run only an agent runner (more workers for an external Temporal)",
        description="Run an agent runner in the foreground against temporal.address. On other machines: "
        "set temporal.managed false, temporal.address to the shared Temporal, STIGMER_API_URL to the "
        "server's API and STIGMER_API_TOKEN to its token, so streamed answers reach it.",
    )
    wk.set_defaults(handler="run_cmd:worker")

    ui = sub.add_parser(
        "ui",
        help="open the web console, signed in (prints a one-time link, valid 2 minutes)",
        description="The web console (the server, chat with agents, executions, approvals, agents and models) "
        "is served by the API at http://127.0.0.1:PORT/. This prints a one-time sign-in link (valid 2 minutes, "
        "used once) and opens it in the browser when there is a display. Starts the server if needed.",
    )
    ui.add_argument("--no-open", action="store_true", help="only print the link; do not open a browser")
    ui.set_defaults(handler="ui_cmd:ui")

    doc = sub.add_parser(
        "doctor",
        help="check this machine and the server; each problem with the command that fixes it",
        description="Hardware (RAM, CPU, GPUs), the LLM runtime and where it came from, the server and its "
        "services, addresses, the model and whether it runs on the GPU, the models folder. Exit code 14 "
        "when a problem is found.",
    )
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.set_defaults(handler="doctor_cmd:doctor")

    cfg = sub.add_parser("config", help="read and change settings")
    csub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    g = csub.add_parser("get", help="print one setting")
    g.add_argument("key")
    g.set_defaults(handler="config_cmd:get")
    s = csub.add_parser("set", help="change one setting (validated, written atomically)")
    s.add_argument("key")
    s.add_argument("value")
    s.set_defaults(handler="config_cmd:set_")
    cl = csub.add_parser("list", help="every setting with its value and where it comes from")
    cl.add_argument("--json", action="store_true", help="machine-readable output")
    cl.set_defaults(handler="config_cmd:list_")
    csub.add_parser("path", help="where config.yaml is").set_defaults(handler="config_cmd:path")
    return p


def _load(target: str) -> Handler:
    """Import only the command module that runs (keeps `stigmer` quick to start)."""
    import importlib

    module, _, func = target.partition(":")
    handler: Handler = getattr(importlib.import_module(f"stigmer.cli.{module}"), func)
    return handler


def _os_error(e: OSError) -> tuple[str, str, ErrorCode]:
    import errno

    where = f" ({e.filename})" if e.filename else ""
    what = f"{e.strerror or e}{where}."
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"The disk is full{where}.",
            "Free some space and run the command again; nothing was lost.",
            ErrorCode.DISK_FULL,
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "Check the permissions of STIGMER_HOME (default ~/.stigmer), or point it elsewhere."
        return what, hint, ErrorCode.FILESYSTEM
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        hint = "STIGMER_HOME (default ~/.stigmer) must be a folder: move the file away or set STIGMER_HOME."
        return what, hint, ErrorCode.FILESYSTEM
    return what, "Run the command again with --debug for details.", ErrorCode.FILESYSTEM


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # Never die on a character the terminal cannot show (a model name, a log line): replace it.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")
    try:
        return _run(parser, args)
    except BrokenPipeError:
        # `stigmer server logs | head -1`: the reader has what it wanted. Point stdout at devnull so the
        # interpreter's final flush does not complain, and end quietly.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _fail(args: argparse.Namespace, error: StigmerError) -> int:
    from stigmer.cli.render import Out

    if args.debug:
        import logging

        logging.exception("error")
    if getattr(args, "json", False):
        Out().json_error(error.to_dict())
    else:
        Out().error(error.message, error.hint)
    return error.exit_code


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.debug:
        import logging  # only with --debug: keeps every other start-up lighter

        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
        )
    target: str | None = getattr(args, "handler", None)
    if target is None:
        parser.print_help()
        return 0
    try:
        return _load(target)(args)
    except StigmerError as e:
        return _fail(args, e)
    except BrokenPipeError:
        raise
    except OSError as e:
        # Filesystem trouble the user can fix (a full disk, permissions, STIGMER_HOME not a folder).
        message, hint, code = _os_error(e)
        return _fail(args, StigmerError(message, hint=hint, code=code))
    except KeyboardInterrupt:
        interrupted = StigmerError(
            "Interrupted.",
            hint="Run the command again to continue: downloads resume where they stopped.",
            code=ErrorCode.INTERRUPTED,
        )
        return _fail(args, interrupted)
    except Exception as e:
        if args.debug:
            raise
        bug = StigmerError(
            f"Unexpected error: {type(e).__name__}: {e}",
            hint="This is a bug in Stigmer. Run the command again with --debug for the full traceback.",
            code=ErrorCode.INTERNAL,
        )
        return _fail(args, bug)


if __name__ == "__main__":
    sys.exit(main())

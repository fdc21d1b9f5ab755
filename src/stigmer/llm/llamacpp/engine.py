"""The built-in engine's process: llama.cpp (through xllamacpp) serving one GGUF model over HTTP.

Run as ``python -m stigmer.llm.llamacpp.engine --model PATH --alias NAME --host 127.0.0.1 --port N``.
It serves the OpenAI-compatible API (``/v1/chat/completions`` incl. SSE streaming, ``/v1/models``)
and ``/health`` until SIGTERM or SIGINT. llama.cpp itself listens on an internal loopback port behind a
random key; the public port is a guard (proxy.py) that refuses foreign Host headers and web origins
that are not allowed (``--allow-origin``, repeatable), as Ollama does.

The process management around it (detaching, pid records, logs, readiness polling, stop) lives
elsewhere and treats this module as an opaque command line built by :func:`engine_argv`.

Exit codes: 0 stopped by a signal, 1 could not start (port busy, bad model, engine failure),
2 bad arguments (including a non-loopback host).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from stigmer.net.addresses import is_loopback_host

MODULE = "stigmer.llm.llamacpp.engine"

# Every GGUF file starts with these four bytes; checking them turns "llama.cpp failed to init"
# into a message that names the actual problem.
GGUF_MAGIC = b"GGUF"

# llama.cpp decoding is memory-bandwidth bound: past ~8 threads a CPU gains next to nothing and
# starves everything else on the machine (the agents, Temporal).
MAX_DEFAULT_THREADS = 8


MAX_THREADS = 1024
MAX_CTX = 1 << 20


def engine_argv(
    python: str,
    *,
    model_path: Path,
    alias: str,
    host: str,
    port: int,
    ctx_size: int,
    threads: int,
    origins: Sequence[str] = (),
) -> list[str]:
    """The command line that runs the engine; pure, so it is unit-tested without running anything."""
    extra = [a for origin in origins for a in ("--allow-origin", origin)]
    return [
        python,
        "-m",
        MODULE,
        "--model",
        str(model_path),
        "--alias",
        alias,
        "--host",
        host,
        "--port",
        str(port),
        "--ctx-size",
        str(ctx_size),
        "--threads",
        str(threads),
        *extra,
    ]


def default_threads() -> int:
    """Physical cores we may run on, capped at MAX_DEFAULT_THREADS, at least 1.

    Physical rather than logical: a second hyper-thread on the same core adds little to a
    bandwidth-bound matmul and measurably slows the first one.
    """
    try:
        usable = len(os.sched_getaffinity(0))  # respects taskset / cgroup cpusets (Linux)
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
    physical: int | None = None
    try:
        import psutil  # lazy: only the parent computes defaults, never the engine's hot path

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    cores = min(usable, physical) if physical else usable
    return max(1, min(cores, MAX_DEFAULT_THREADS))


def default_context_size() -> int:
    """Context window (tokens) when the user has not chosen one.

    4096 holds a system prompt, a tool list and a few turns of an agent conversation, and keeps the
    KV cache small: with SmolLM2-135M the engine's RSS is ~200 MB at 2048 and ~338 MB at 8192 (the
    llama.cpp default of the model's training context), so 4096 lands around 250 MB.
    """
    return 4096


def check_model_file(path: Path) -> str | None:
    """Why ``path`` cannot be served, or None when it looks like a GGUF model we can read."""
    if not path.exists():
        return f"model file not found: {path}"
    if not path.is_file():
        return f"model path is not a file: {path}"
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as e:
        return f"cannot read model file {path}: {e.strerror or e}"
    if magic != GGUF_MAGIC:
        return f"not a GGUF model file: {path}"
    return None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Serve one GGUF model over an OpenAI-compatible HTTP API on a loopback address.",
    )
    parser.add_argument("--model", required=True, type=Path, help="path of the .gguf model file")
    parser.add_argument("--alias", required=True, help="model name announced by the API, e.g. smollm2:135m")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", required=True, type=int, help="TCP port to bind (0 picks a free one)")
    parser.add_argument("--ctx-size", type=int, default=None, help="context window in tokens")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for decoding")
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (pattern) allowed to call the API from a browser, besides this machine's",
    )
    args = parser.parse_args(argv)
    if not is_loopback_host(args.host):
        parser.error(f"--host {args.host} is not a loopback address; the engine only binds loopback")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is out of range 0-65535")
    if not args.alias.strip():
        parser.error("--alias must not be empty")
    if args.ctx_size is None:
        args.ctx_size = default_context_size()
    if args.threads is None:
        args.threads = default_threads()
    if not 1 <= args.ctx_size <= MAX_CTX:
        parser.error(f"--ctx-size {args.ctx_size} is out of range 1-{MAX_CTX}")
    if not 1 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads {args.threads} is out of range 1-{MAX_THREADS}")
    return args


def _say(message: str, *, err: bool = False) -> None:
    # Flushed at once: the log is a redirected file (block-buffered) and we may leave via os._exit.
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


def _stop_now(signum: int, _frame: FrameType | None) -> None:
    """Leave at once. sys.exit here would run interpreter shutdown and Server's destructor, which
    waits for llama.cpp's threads: measured to hang while a streamed request is in flight. _exit
    skips all that, and the engine holds nothing that needs flushing (the model is only read)."""
    _say(f"engine stopping ({signal.Signals(signum).name})")
    os._exit(0)


def _listen(host: str, port: int) -> socket.socket | None:
    """The public socket, bound before the model loads: a busy port fails in milliseconds, and nothing
    can take the port while the model loads (clients connecting meanwhile wait in the backlog)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            return None
        raise
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    # Until the model is loaded, the main thread sits inside the Server constructor holding the GIL,
    # so a Python handler could not run: let SIGTERM/SIGINT kill the process outright instead.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    model_path: Path = args.model.expanduser().resolve()
    problem = check_model_file(model_path)
    if problem:
        _say(f"error: {problem}", err=True)
        return 1
    public = _listen(args.host, args.port)
    if public is None:
        _say(f"error: port {args.port} is already in use", err=True)
        return 1

    import xllamacpp  # heavy native module; only the engine process needs it

    key = secrets.token_urlsafe(32)  # for the internal server: known to this process only
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.model_alias = {args.alias}  # a set: names in /v1/models and every response's "model"
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # llama.cpp picks a free internal port; the guard forwards to it
    params.api_keys = [key]
    params.n_ctx = args.ctx_size
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads  # prompt processing; else llama.cpp picks
    params.ui = False  # no bundled web UI: the product talks to the API only
    params.cors_origins = ""  # CORS is the guard's: llama.cpp's default is "*" with credentials

    _say(
        f"engine starting: model {model_path} as {args.alias}, {args.host}:{args.port}, "
        f"ctx {args.ctx_size}, threads {args.threads}, xllamacpp {xllamacpp.__version__}"
    )
    started = time.monotonic()
    try:
        engine = xllamacpp.Server(params)  # returns once the model is loaded
    except (RuntimeError, ValueError, MemoryError, OverflowError) as e:
        # xllamacpp says only "Failed to init server"; llama.cpp's own log above has the detail.
        _say(f"error: the engine failed to start ({e}); see the llama.cpp log above", err=True)
        return 1
    backend = str(engine.listening_address)
    if not backend.startswith("http"):
        backend = "http://" + backend
    _say(
        f"engine ready on http://{args.host}:{args.port} (model {args.alias}) "
        f"in {time.monotonic() - started:.2f} s, pid {os.getpid()}"
    )
    _serve(public, backend, key, args.allow_origin)
    return 0


def _serve(public: socket.socket, backend: str, key: str, origins: Sequence[str]) -> None:
    import uvicorn

    from stigmer.llm.llamacpp.proxy import guarded

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # ours below: leave at once, never wait for a generation to finish

    signal.signal(signal.SIGTERM, _stop_now)
    signal.signal(signal.SIGINT, _stop_now)
    config = uvicorn.Config(
        guarded(backend, key, origins),
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        date_header=False,
    )
    Server(config).run(sockets=[public])
    os._exit(0)  # llama.cpp's threads must not run interpreter shutdown (see _stop_now)


if __name__ == "__main__":
    sys.exit(main())

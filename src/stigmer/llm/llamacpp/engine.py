"""The built-in engine's process: llama.cpp (through xllamacpp) serving one GGUF model over HTTP.

Run as ``python -m stigmer.llm.llamacpp.engine --model PATH --alias NAME --host 127.0.0.1 --port N``.
It serves the OpenAI-compatible API (``/v1/chat/completions`` incl. SSE streaming, ``/v1/models``)
and ``/health`` until SIGTERM or SIGINT. llama.cpp itself listens on an internal loopback port behind a
random key; the public port is a guard (proxy.py) that refuses foreign Host headers and web origins
that are not allowed (``--allow-origin``, repeatable), as Ollama does.

The process management around it (detaching, pid records, logs, readiness polling, stop) lives
elsewhere and treats this module as an opaque command line built by :func:`engine_argv`.

Exit codes: 0 stopped by a signal, 1 could not start (port busy, bad model, not enough memory for the
context, engine failure: always one line "error: ..." on stderr, never a traceback), 2 bad arguments
(including a non-loopback host, threads or context out of range).
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from stigmer.net.addresses import is_loopback_host

MODULE = "stigmer.llm.llamacpp.engine"

# Every GGUF file starts with these four bytes; checking them turns "llama.cpp failed to init"
# into a message that names the actual problem.
GGUF_MAGIC = b"GGUF"

# llama.cpp decoding is memory-bandwidth bound: past ~8 threads a CPU gains next to nothing and
# starves everything else on the machine (the agents, Temporal).
MAX_DEFAULT_THREADS = 8

# Bounds of the command line: beyond them llama.cpp fails in ways that say nothing useful (or worse,
# see memory_problem).
MAX_THREADS = 1024
MAX_CTX = 1 << 20

# Contexts up to this size are not checked against free memory: their KV cache is at most a few GB
# even for 70B models, and reading the GGUF header costs ~40 ms of every start (see memory_problem).
MEMORY_CHECK_ABOVE = 8192
MEMORY_SHARE = 0.9
UBATCH = 512  # llama.cpp's default micro-batch (tokens)

# Web origins allowed besides this machine's when no --allow-origin is given (comma-separated, like
# OLLAMA_ORIGINS). The product passes llm.origins as flags; this is for running the module by hand.
ORIGINS_ENV = "STIGMER_LLM_ORIGINS"


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
    internal_port: int = 0,
) -> list[str]:
    """The command line that runs the engine; pure, so it is unit-tested without running anything.
    `internal_port`: llama.cpp's own port, chosen by the caller so that a sandbox policy can name it
    (0: llama.cpp picks a free one)."""
    extra = [a for origin in origins for a in ("--allow-origin", origin)]
    if internal_port:
        extra += ["--internal-port", str(internal_port)]
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


def memory_problem(model_path: Path, ctx_size: int) -> str | None:
    """Why a context of `ctx_size` tokens cannot fit in the memory available now, or None.

    llama.cpp allocates and clears the whole KV cache at start. A context far beyond RAM does not fail
    cleanly: measured here, --ctx-size 1048576 with the 135M starter model asked for ~24 GB and the
    kernel's OOM killer ended the process (SIGKILL, no message), which can take other programs with it.
    The estimate is the one stigmer.hw.fit documents: weights, f16 KV cache (a K and a V vector per
    layer, KV head and token), 256 MiB fixed, one micro-batch of activations, flash attention's mask.
    The engine may take MEMORY_SHARE of what is available: near the limit the machine thrashes or the
    OOM killer picks a victim, and a refused start is the mild outcome. A header we cannot read is left
    to llama.cpp, which says what is wrong with the file.
    """
    if ctx_size <= MEMORY_CHECK_ABOVE:
        return None
    import psutil

    from stigmer.llm.gguf import GgufError, read_header
    from stigmer.units import human_bytes

    try:
        header = read_header(model_path)
    except (GgufError, OSError):
        return None
    per_token = header.block_count * (header.key_length + header.value_length) * header.head_count_kv * 2
    per_token += 2 * UBATCH  # the attention mask (f16) of one micro-batch
    n_ff = header.feed_forward_length or 4 * header.embedding_length
    fixed = header.tensor_data_size + (256 << 20) + 4 * UBATCH * (3 * n_ff + 4 * header.embedding_length)
    need = fixed + ctx_size * per_token
    available = int(psutil.virtual_memory().available)
    budget = int(available * MEMORY_SHARE)
    if need <= budget:
        return None
    fits = max(0, budget - fixed) // per_token
    return (
        f"a context of {ctx_size} tokens needs about {human_bytes(need)} of memory, more than this machine "
        f"can spare ({human_bytes(available)} available); use a smaller --ctx-size (at most about "
        f"{fits // 256 * 256} here; the model was trained for "
        f"{header.context_length or 'an unknown number of'} tokens)"
    )


def origins_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(o.strip() for o in environ.get(ORIGINS_ENV, "").split(",") if o.strip())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Serve one GGUF model over an OpenAI-compatible HTTP API on a loopback address.",
    )
    parser.add_argument("--model", required=True, type=Path, help="path of the .gguf model file")
    parser.add_argument("--alias", required=True, help="model name announced by the API, e.g. smollm2:135m")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", required=True, type=int, help="TCP port to bind (0 picks a free one)")
    parser.add_argument(
        "--internal-port",
        type=int,
        default=0,
        help="loopback port of llama.cpp behind the guard (default 0: a free one); a sandbox that "
        "restricts ports names it",
    )
    parser.add_argument("--ctx-size", type=int, default=None, help=f"context window in tokens (1-{MAX_CTX})")
    parser.add_argument(
        "--threads", type=int, default=None, help=f"CPU threads for decoding (1-{MAX_THREADS})"
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (pattern, * = anything) allowed to call the API from a browser besides this "
        f"machine's; repeatable; default from {ORIGINS_ENV} (comma-separated)",
    )
    args = parser.parse_args(argv)
    if not is_loopback_host(args.host):
        parser.error(f"--host {args.host} is not a loopback address; the engine only binds loopback")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is out of range 0-65535")
    if not 0 <= args.internal_port <= 65535:
        parser.error(f"--internal-port {args.internal_port} is out of range 0-65535")
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
    args.allow_origin = tuple(args.allow_origin) or origins_from_env(os.environ)
    return args


def _say(message: str, *, err: bool = False) -> None:
    # Flushed at once: the log is a redirected file (block-buffered) and we may leave via os._exit.
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


def _stop_now(signum: int) -> None:
    """Leave at once. sys.exit here would run interpreter shutdown and Server's destructor, which
    waits for llama.cpp's threads: measured to hang while a streamed request is in flight. _exit
    skips all that, and the engine holds nothing that needs flushing (the model is only read)."""
    _say(f"engine stopping ({signal.Signals(signum).name})")
    os._exit(0)


def listen(host: str, port: int) -> socket.socket | None:
    """The public socket (None when the port is taken), bound before the model loads: a busy port
    fails in milliseconds, and nothing can take the port while the model loads."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":
        # As servers do: a port left in TIME_WAIT by a stopped engine can be bound again at once.
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


def _taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_internal(
    *, model_path: Path, alias: str, ctx_size: int, threads: int, key: str, port: int = 0
) -> tuple[Any, str]:
    """llama.cpp's server on an internal loopback port (`port`, or a free one when 0) that only `key`
    opens (/health aside): (the xllamacpp.Server, which must stay referenced, and its base URL).
    Returns once the model is loaded; raises whatever xllamacpp raises when it cannot load."""
    import xllamacpp  # heavy native module; only the engine process needs it

    params = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.model_alias = {alias}  # a set: names in /v1/models and every response's "model"
    params.hostnames = ["127.0.0.1"]
    params.port = port  # 0: llama.cpp picks a free port; read back from listening_address
    params.api_keys = [key]  # a list of str; every endpoint but /health (and /models' preflight) needs one
    params.n_ctx = ctx_size
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads  # prompt processing; else llama.cpp picks
    params.ui = False  # no bundled web UI: the product talks to the API only
    params.cors_origins = ""  # CORS is the guard's: llama.cpp's default is "*" with credentials
    params.endpoint_metrics = True  # /metrics: requests that reached inference can be counted
    server = xllamacpp.Server(params)
    address = str(server.listening_address)
    return server, address if address.startswith("http") else "http://" + address


def serve(public: socket.socket, backend: str, key: str, origins: Sequence[str]) -> NoReturn:
    """Serve the guard on `public` in this (main) thread until SIGTERM/SIGINT, which end the process."""
    import asyncio
    import contextlib
    from collections.abc import Iterator

    import uvicorn

    from stigmer.llm.llamacpp.proxy import guarded
    from stigmer.net.head_deadline import with_head_deadline

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Not uvicorn's graceful shutdown, which waits for in-flight generations: leave at once.
            # Through the loop, so that a signal delivered to one of llama.cpp's threads still wakes it.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, _stop_now, sig)
                except NotImplementedError:  # Windows' event loops
                    signal.signal(sig, lambda signum, _frame: _stop_now(signum))
            yield

    config = uvicorn.Config(
        guarded(backend, key, origins),
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,  # llama.cpp's own Server header is passed through
        date_header=False,
        proxy_headers=False,  # X-Forwarded-* from a local client must not change who it seems to be
        http=with_head_deadline(),  # a connection that never sends its request is closed
    )
    Server(config).run(sockets=[public])
    os._exit(0)  # llama.cpp's threads must not run interpreter shutdown (see _stop_now)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    # Until the guard serves, the main thread is busy (the Server constructor holds the GIL for the
    # whole load), so a Python handler could not run: let SIGTERM/SIGINT end the process outright.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    model_path: Path = args.model.expanduser().resolve()
    problem = check_model_file(model_path) or memory_problem(model_path, args.ctx_size)
    if problem:
        _say(f"error: {problem}", err=True)
        return 1
    public = listen(args.host, args.port)
    if public is None:
        _say(f"error: port {args.port} is already in use", err=True)
        return 1

    # The serving side is imported before the model loads: an import problem fails fast, and the
    # forked loading responder shares the modules instead of importing its own.
    from stigmer.llm.llamacpp.proxy import LoadingResponder

    loading = LoadingResponder.start(public, args.allow_origin)  # before any thread exists
    key = secrets.token_urlsafe(32)  # for the internal server: known to this process only
    try:
        import xllamacpp  # heavy native module; only the engine process needs it

        _say(
            f"engine starting: model {model_path} as {args.alias}, {args.host}:{args.port}, "
            f"ctx {args.ctx_size}, threads {args.threads}, xllamacpp {xllamacpp.__version__}"
        )
        started = time.monotonic()
        server, backend = start_internal(  # `server` must stay referenced while we serve
            model_path=model_path,
            alias=args.alias,
            ctx_size=args.ctx_size,
            threads=args.threads,
            key=key,
            port=args.internal_port,
        )
    except Exception as e:
        if args.internal_port and _taken(args.internal_port):
            # Named as the supervisor's port-race retry looks for it: another program took the port
            # between the provider's pick and llama.cpp's bind.
            _say(f"error: internal port {args.internal_port}: address already in use", err=True)
            return 1
        # Whatever it is, one line for the log rather than a traceback: xllamacpp says only "Failed to
        # init server", llama.cpp's own log above has the detail.
        _say(
            f"error: the engine failed to start ({type(e).__name__}: {e}); see the llama.cpp log above",
            err=True,
        )
        return 1
    finally:
        if loading is not None:
            loading.stop()
    _say(
        f"engine ready on http://{args.host}:{args.port} (model {args.alias}) "
        f"in {time.monotonic() - started:.2f} s, pid {os.getpid()}"
    )
    serve(public, backend, key, args.allow_origin)


if __name__ == "__main__":
    sys.exit(main())

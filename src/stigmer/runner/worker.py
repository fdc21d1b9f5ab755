"""The agent runner: a Temporal worker on task queue `agent_execution_runner`.

Run by the daemon (`python -m stigmer.runner.worker`) or on its own by `stigmer worker` on other
machines against an external Temporal. While it polls Temporal it touches run/agent-runner.health every
few seconds; the supervisor reads that stamp as its health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from stigmer.config import store
from stigmer.config.store import Settings
from stigmer.errors import ErrorCode, StigmerError
from stigmer.executions.contract import TASK_QUEUE
from stigmer.paths import Paths
from stigmer.server.specs import HEALTH_EVERY, RUNNER, health_file

log = logging.getLogger("stigmer.runner")

CONNECT_ATTEMPTS = 30  # ~1 minute: Temporal may still be starting when the worker is
API_PATIENCE = float(os.environ.get("STIGMER_RUNNER_API_PATIENCE") or 60)  # the API may be starting too
API_CHECK_TICKS = 3  # every third health stamp (~6 s), the worker checks that the API answers
GRACE = timedelta(seconds=10)


async def connect(settings: Settings, paths: Paths) -> object:
    from pydantic_ai.durable_exec.temporal import PydanticAIPlugin

    from stigmer.server.temporal_client import connect as connect_temporal
    from stigmer.server.temporal_client import explain_connect_error

    delay = 0.2
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            # The plugin brings pydantic payloads and registers the agent's own activities with the worker.
            return await connect_temporal(settings, paths, plugins=[PydanticAIPlugin()], store="api")
        except StigmerError:
            raise
        except Exception as e:  # noqa: BLE001 - temporalio raises RuntimeError for every connect failure
            error = explain_connect_error(settings, e)
            if attempt == CONNECT_ATTEMPTS or not error.code.retryable:
                raise error from None  # a certificate or a key that is wrong stays wrong
            log.warning("Temporal at %s not reachable yet (%s); retrying", settings.temporal.address, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


async def check_api(paths: Paths, stop: asyncio.Event, *, patience: float = API_PATIENCE) -> bool:
    """Before taking work: the API answers at its address, takes this worker's token, and encrypts with
    the same payload key. A wrong token or key is an error at once (the worker does not start); an API
    that does not answer is waited for, up to `patience` seconds (it may be starting, or restarting).
    False when asked to stop meanwhile."""
    from stigmer.runner.publish import api_url, hello
    from stigmer.server.keys import PAYLOAD_KEY_ENV, key_id, payload_key

    deadline = time.monotonic() + patience
    while True:
        try:
            info = await hello()
            break
        except StigmerError as e:
            if e.code is not ErrorCode.NOT_RUNNING or time.monotonic() > deadline:
                raise
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
            return False
        except TimeoutError:
            pass
    if info.get("key_id") != key_id(payload_key(paths)):
        raise StigmerError(
            f"This worker's payload key is not the one of the Stigmer server at {api_url()}.",
            hint=f"Give the worker the server's $STIGMER_HOME/payload.key in {PAYLOAD_KEY_ENV}.",
            code=ErrorCode.CONFIG_INVALID,
        )
    return True


async def api_answers() -> bool:
    from stigmer.runner.publish import hello

    try:
        await hello()
        return True
    except StigmerError:
        return False


def sandbox() -> Any:
    """Temporal's workflow sandbox, with our modules and the model-price data passed through: loaded once
    in the worker rather than again in every workflow (pydantic-ai's plugin adds its own modules)."""
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("stigmer", "genai_prices")
    )


def warm_up() -> None:
    """Build one model: the OpenAI SDK and the model data load lazily on first use (~0.5-1.5 s here),
    which inside a workflow task trips Temporal's 2-second deadlock detector. It runs in a thread while
    the worker connects and checks the API, and is done before the worker polls: a workflow task that
    waited on this import (work queued before a restart arrives at once) was evicted with its task
    still running, and the worker's slots stayed taken for good (seen: executions stuck after a restart)."""
    from stigmer.runner import llm

    target = llm.LlmTarget(
        provider="llamacpp", model="warm-up", base_url="http://127.0.0.1:9/v1", kind="openai"
    )
    _ = llm.build(target, key="unused").profile


async def serve(settings: Settings, paths: Paths, stop: asyncio.Event, stamp: Path | None) -> None:
    # pydantic_ai's own package first, here: imported by two threads at once (the warm-up's model client
    # and connect()'s plugin), one of them could get the package half initialized (seen: "cannot import
    # name 'Model' from partially initialized module 'pydantic_ai.models'", the worker dead at start-up).
    import pydantic_ai.durable_exec.temporal  # noqa: F401
    from temporalio.client import Client
    from temporalio.worker import Worker

    from stigmer.runner.attempts import CountAttempts
    from stigmer.runner.registry import activities, workflows
    from stigmer.runner.summaries import ToolSummaries

    warming = asyncio.create_task(asyncio.to_thread(warm_up))
    if not await check_api(paths, stop):
        return
    client = cast(Client, await connect(settings, paths))
    try:
        await warming
    except Exception as e:  # noqa: BLE001 - the first execution loads it then
        log.warning("warming up the model client failed (the first execution loads it): %r", e)
    while not stop.is_set():
        worker = Worker(
            client,
            task_queue=TASK_QUEUE,
            workflows=workflows(),
            activities=activities(),
            workflow_runner=sandbox(),
            # retried attempts, counted by their workflow (limits); each tool call's sandbox in its summary
            interceptors=[CountAttempts(), ToolSummaries()],
            graceful_shutdown_timeout=GRACE,  # pausing lets the calls in flight finish
        )
        async with worker:
            log.info("polling task queue %s on %s", TASK_QUEUE, settings.temporal.address)
            lost = await _poll(stop, stamp)
        if lost:
            # Executions taken now could not report: take none until the API is back.
            log.warning("the Stigmer API stopped answering: this worker takes no work until it is back")
            while not stop.is_set() and not await api_answers():
                _stamp(stamp)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), HEALTH_EVERY)
            log.info("the Stigmer API answers again: taking work")
    from stigmer.runner.tools import close_servers

    await close_servers()  # the MCP server processes this worker started
    log.info("worker stopped")


async def _poll(stop: asyncio.Event, stamp: Path | None) -> bool:
    """Stamp the health file while the worker polls; True when the API stopped answering."""
    misses = 0
    ticks = 0
    while not stop.is_set():
        _stamp(stamp)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEALTH_EVERY)
        ticks += 1
        if ticks % API_CHECK_TICKS == 0 and not stop.is_set():
            misses = 0 if await api_answers() else misses + 1
            if misses >= 2:  # one miss may be a restart of a second
                return True
    return False


def _stamp(stamp: Path | None) -> None:
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()


def main(*, stamp: bool = True) -> int:
    """Run the worker until SIGTERM. `stamp`: write the health stamp the daemon's supervisor reads (a
    `stigmer worker` on its own has no supervisor)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore", "httpx2", "openai", "anthropic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # a line per event batch otherwise
    paths = Paths.from_env()
    settings = store.load(paths)
    stamp_file = health_file(paths, RUNNER) if stamp else None
    from stigmer.tools import procs

    procs.setup()  # kill what the tool calls of a dead worker left running (stigmer/tools/procs.py)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # Windows: Ctrl-C still raises KeyboardInterrupt
                pass
        await serve(settings, paths, stop, stamp_file)

    code = 0
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except StigmerError as e:
        log.error("%s %s", e.message, e.hint or "")
        print(f"✗ {e.message}\n  {e.hint}" if e.hint else f"✗ {e.message}", file=sys.stderr)
        code = e.code.exit_code
    except Exception:
        log.exception("the agent runner failed")
        code = 1
    finally:
        if stamp_file is not None:
            stamp_file.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # temporalio's native threads can crash interpreter exit (sdk-python#300)


if __name__ == "__main__":
    from stigmer.services.secret_pipe import start_child

    start_child()  # the secrets the daemon sent, before anything reads the settings
    main()

"""The agent runner: a Temporal worker on task queue `agent_execution_runner`.

Run by the daemon (`python -m stigmer.runner.worker`) or on its own by `stigmer worker` on other
machines against an external Temporal. While it polls Temporal it touches run/agent-runner.health every
few seconds; the supervisor reads that stamp as its health.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from stigmer.config import store
from stigmer.config.store import Settings
from stigmer.paths import Paths
from stigmer.server.specs import HEALTH_EVERY, RUNNER, TASK_QUEUE, health_file

log = logging.getLogger("stigmer.runner")

CONNECT_ATTEMPTS = 30  # ~1 minute: Temporal may still be starting when the worker is


async def connect(settings: Settings) -> object:
    from pydantic_ai.durable_exec.temporal import PydanticAIPlugin
    from temporalio.client import Client

    delay = 0.2
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            # The plugin brings pydantic payloads and registers the agent's own activities with the worker.
            return await Client.connect(
                settings.temporal.address, namespace=settings.temporal.namespace, plugins=[PydanticAIPlugin()]
            )
        except Exception as e:  # noqa: BLE001 - temporalio raises RuntimeError for every connect failure
            if attempt == CONNECT_ATTEMPTS:
                raise
            log.warning("Temporal at %s not reachable yet (%s); retrying", settings.temporal.address, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def sandbox() -> Any:
    """Temporal's workflow sandbox, with our modules and the model-price data passed through: loaded once
    in the worker rather than again in every workflow (pydantic-ai's plugin adds its own modules)."""
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("stigmer", "genai_prices")
    )


def warm_up() -> None:
    """Build one model: the OpenAI SDK and the model data load lazily on first use (~0.5-1.5 s here),
    which inside a workflow task could trip Temporal's 2-second deadlock detector. Run in a thread once
    the worker polls, so that its start (and `stigmer server`'s Ready!) does not wait for it; a workflow
    task that comes meanwhile waits on the same import, for what is left of it."""
    from stigmer.runner import llm

    target = llm.LlmTarget(
        provider="llamacpp", model="warm-up", base_url="http://127.0.0.1:9/v1", kind="openai"
    )
    _ = llm.build(target, key="unused").profile


async def serve(settings: Settings, paths: Paths, stop: asyncio.Event, stamp: Path | None) -> None:
    from temporalio.client import Client
    from temporalio.worker import Worker

    from stigmer.runner.registry import activities, workflows

    client = await connect(settings)
    assert isinstance(client, Client)
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=workflows(),
        activities=activities(),
        workflow_runner=sandbox(),
    )
    async with worker:
        log.info("polling task queue %s on %s", TASK_QUEUE, settings.temporal.address)
        warming = asyncio.create_task(asyncio.to_thread(warm_up))
        warming.add_done_callback(_warmed)
        while not stop.is_set():
            if stamp is not None:
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.touch()
            try:
                await asyncio.wait_for(stop.wait(), HEALTH_EVERY)
            except TimeoutError:
                pass
    from stigmer.runner.tools import close_servers

    await close_servers()  # the MCP server processes this worker started
    log.info("worker stopped")


def _warmed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("warming up the model client failed (the first execution loads it): %r", task.exception())


def main(*, stamp: bool = True) -> int:
    """Run the worker until SIGTERM. `stamp`: write the health stamp the daemon's supervisor reads (a
    `stigmer worker` on its own has no supervisor)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore", "httpx2", "openai", "anthropic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # a line per event batch otherwise
    paths = Paths.from_env()
    settings = store.load(paths)
    stamp_file = health_file(paths, RUNNER) if stamp else None

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
    main()

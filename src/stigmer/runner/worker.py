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

from stigmer.config import store
from stigmer.config.store import Settings
from stigmer.paths import Paths
from stigmer.server.specs import HEALTH_EVERY, RUNNER, TASK_QUEUE, health_file

log = logging.getLogger("stigmer.runner")

CONNECT_ATTEMPTS = 30  # ~1 minute: Temporal may still be starting when the worker is


async def connect(settings: Settings) -> object:
    from temporalio.client import Client

    delay = 0.2
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            return await Client.connect(settings.temporal.address, namespace=settings.temporal.namespace)
        except Exception as e:  # noqa: BLE001 - temporalio raises RuntimeError for every connect failure
            if attempt == CONNECT_ATTEMPTS:
                raise
            log.warning("Temporal at %s not reachable yet (%s); retrying", settings.temporal.address, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


async def serve(settings: Settings, paths: Paths, stop: asyncio.Event, stamp: Path | None) -> None:
    from temporalio.client import Client
    from temporalio.worker import Worker

    from stigmer.runner.registry import activities, workflows

    client = await connect(settings)
    assert isinstance(client, Client)
    worker = Worker(client, task_queue=TASK_QUEUE, workflows=workflows(), activities=activities())
    async with worker:
        log.info("polling task queue %s on %s", TASK_QUEUE, settings.temporal.address)
        while not stop.is_set():
            if stamp is not None:
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.touch()
            try:
                await asyncio.wait_for(stop.wait(), HEALTH_EVERY)
            except TimeoutError:
                pass
    log.info("worker stopped")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = Paths.from_env()
    settings = store.load(paths)
    stamp = health_file(paths, RUNNER) if os.environ.get("STIGMER_RUNNER_STAMP", "1") != "0" else None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # Windows: Ctrl-C still raises KeyboardInterrupt
                pass
        await serve(settings, paths, stop, stamp)

    code = 0
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("the agent runner failed")
        code = 1
    finally:
        if stamp is not None:
            stamp.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # temporalio's native threads can crash interpreter exit (sdk-python#300)


if __name__ == "__main__":
    main()

"""A workflow that proves the runner end to end: Temporal hands it to this worker, which runs one
activity and returns. Used by health checks and tests; costs nothing while idle."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="stigmer.pong")
async def pong(text: str) -> str:
    return f"pong: {text}"


@workflow.defn(name="stigmer.Ping")
class Ping:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(pong, text, start_to_close_timeout=timedelta(seconds=10))

"""An agent execution as a Temporal workflow (workflow id = execution id): pick the LLM on the worker,
say the execution started, run the agent (model requests and tool calls are activities), return what
it produced. The workflow only coordinates; every side effect is an activity.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from pydantic_ai.durable_exec.temporal import PydanticAIWorkflow
from pydantic_ai.exceptions import ModelAPIError
from pydantic_ai.settings import ModelSettings
from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from stigmer.agents.spec import AgentSpec
    from stigmer.agents.tools import tool_configs
    from stigmer.runner.agent import MODEL_PREFIX, RunDeps, agent, tool_agent
    from stigmer.runner.approvals import Approvals, Decision
    from stigmer.runner.llm import LlmTarget

WORKFLOW = "stigmer.AgentExecution"


class ExecutionInput(BaseModel):
    execution_id: str
    agent: str
    instructions: str
    message: str
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    tools: list[Any] = []  # as the agent file declares them
    mcp_servers: list[dict[str, Any]] = []
    workspace: str | None = None


class ExecutionOutput(BaseModel):
    text: str
    provider: str
    model: str
    endpoint: str
    input_tokens: int
    output_tokens: int
    requests: int
    tool_calls: int
    messages: list[dict[str, Any]]


class PrepareInput(BaseModel):
    execution_id: str
    model: str | None = None


@activity.defn(name="stigmer.prepare")
async def prepare(inp: PrepareInput) -> LlmTarget:
    """Choose the LLM from this worker's configuration, and tell the API the execution started."""
    from stigmer.runner import llm
    from stigmer.runner.publish import post_events

    target = llm.resolve(inp.model)
    await post_events(
        inp.execution_id,
        [
            {
                "type": "started",
                "provider": target.provider,
                "model": target.model,
                "endpoint": target.shown,
                "worker": f"{socket.gethostname()}:{os.getpid()}",
            }
        ],
    )
    return target


def _root(e: BaseException) -> str:
    """The innermost message of a failure chain (ActivityError -> ApplicationError -> ...)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return str(getattr(e, "message", "") or e) or type(e).__name__


@workflow.defn(name=WORKFLOW)
class AgentExecution(PydanticAIWorkflow, Approvals):
    __pydantic_ai_agents__ = [agent, tool_agent]

    def __init__(self) -> None:
        Approvals.__init__(self)

    @workflow.signal
    def decide(self, decision: Decision) -> None:
        """An answer to a tool call waiting for approval (from `stigmer execution approve|deny`)."""
        self.record(decision)

    @workflow.run
    async def run(self, inp: ExecutionInput) -> ExecutionOutput:
        # A local activity: it runs in this worker within the same workflow task, without a round trip
        # through Temporal's task queue (the LLM is this worker's to choose anyway).
        target = await workflow.execute_local_activity(
            prepare,
            PrepareInput(execution_id=inp.execution_id, model=inp.model),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=10)),
        )
        settings = ModelSettings()
        if inp.temperature is not None:
            settings["temperature"] = inp.temperature
        if inp.max_tokens is not None:
            settings["max_tokens"] = inp.max_tokens
        tools = _tools(inp)
        runner = tool_agent if tools else agent
        try:
            result = await runner.run(
                inp.message,
                model=MODEL_PREFIX + target.model,
                deps=RunDeps(
                    execution_id=inp.execution_id,
                    target=target,
                    agent=inp.agent,
                    tools=tools,
                    workspace=inp.workspace,
                ),
                instructions=inp.instructions or None,
                model_settings=settings,
            )
        except (ActivityError, ModelAPIError) as e:
            # pydantic-ai turns a model activity that failed every attempt into its own error: name the LLM.
            raise ApplicationError(
                f"The LLM at {target.shown} ({target.provider}, model {target.model}) failed after "
                f"retries: {_root(e)}",
                non_retryable=True,
            ) from e
        usage = result.usage
        messages = _messages(inp, result.all_messages())
        return ExecutionOutput(
            text=str(result.output),
            provider=target.provider,
            model=target.model,
            endpoint=target.shown,
            input_tokens=usage.input_tokens or 0,
            output_tokens=usage.output_tokens or 0,
            requests=usage.requests,
            tool_calls=sum(1 for m in messages if m["role"] == "tool"),
            messages=messages,
        )


def _tools(inp: ExecutionInput) -> list[dict[str, Any]]:
    from dataclasses import asdict

    spec = AgentSpec(name=inp.agent, tools=inp.tools, mcp_servers=inp.mcp_servers)
    return [asdict(c) for c in tool_configs(spec)]


def _messages(inp: ExecutionInput, history: list[Any]) -> list[dict[str, Any]]:
    """The conversation as the record keeps it: user, assistant text, tool calls and their results."""
    from pydantic_ai.messages import (
        ModelRequest,
        ModelResponse,
        TextPart,
        ToolCallPart,
        ToolReturnPart,
        UserPromptPart,
    )

    out: list[dict[str, Any]] = []
    if inp.instructions:
        out.append({"role": "system", "content": inp.instructions})
    for message in history:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart):
                    out.append(
                        {"role": "user", "content": part.content if isinstance(part.content, str) else ""}
                    )
                elif isinstance(part, ToolReturnPart):
                    out.append(
                        {
                            "role": "tool",
                            "content": str(part.content),
                            "data": {"tool": part.tool_name, "id": part.tool_call_id},
                        }
                    )
        elif isinstance(message, ModelResponse):
            text = "".join(p.content for p in message.parts if isinstance(p, TextPart))
            calls = [
                {"tool": p.tool_name, "id": p.tool_call_id, "args": p.args_as_dict()}
                for p in message.parts
                if isinstance(p, ToolCallPart)
            ]
            entry: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                entry["data"] = {"tool_calls": calls}
            out.append(entry)
    return out

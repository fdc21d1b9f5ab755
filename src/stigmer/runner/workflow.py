"""An agent execution as a Temporal workflow (workflow id = execution id): claim the execution from the
API (what to run comes from there, never from the workflow input: see executions/contract.py), pick the
LLM on the worker, run the agent (model requests and tool calls are activities), return what it
produced. The workflow only coordinates; every side effect is an activity.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_ai.durable_exec.temporal import PydanticAIWorkflow
from pydantic_ai.exceptions import ModelAPIError, UnexpectedModelBehavior, UsageLimitExceeded
from pydantic_ai.settings import ModelSettings
from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from stigmer.agents.limits import effective as effective_limits
    from stigmer.agents.spec import AgentSpec, output_type
    from stigmer.agents.tools import tool_configs
    from stigmer.executions.contract import WAKE_SIGNAL, WORKFLOW
    from stigmer.executions.messages import ExecutionRef, RunSpec
    from stigmer.runner import limits
    from stigmer.runner.agent import MODEL_PREFIX, RunDeps, agent, tool_agent
    from stigmer.runner.approvals import Approvals
    from stigmer.runner.attempts import MODEL_CALLS, RETRIED_SIGNAL, TOOL_CALLS, Retries
    from stigmer.runner.llm import LlmTarget, default_max_tokens
    from stigmer.runner.transcript import TRANSCRIPT_FAILED


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


class Prepared(BaseModel):
    target: LlmTarget
    spec: RunSpec


class Refused(ApplicationError):
    pass


@activity.defn(name="stigmer.prepare")
async def prepare(ref: ExecutionRef) -> Prepared:
    """Claim the execution from the API with its ticket (what to run comes back), then choose the LLM
    from this worker's configuration. A ticket the API does not know fails the workflow for good."""
    from stigmer.runner import llm
    from stigmer.runner.publish import Refused as ApiRefused
    from stigmer.runner.publish import call

    info = activity.info()
    workflow_id = info.workflow_id or ""
    if ref.execution_id != workflow_id:
        raise Refused(
            f"input for {ref.execution_id[:80]!r} given to workflow {workflow_id[:80]!r}",
            non_retryable=True,
        )
    # One round trip in the common case: the claim carries the LLM this worker serves by default, and the
    # API records the start with it unless the agent names a model of its own; then a second call says
    # which LLM runs it (the model is resolved on this worker, by its configuration).
    default = llm.resolve(None)
    body: dict[str, Any] = {"ticket": ref.ticket, "run_id": info.workflow_run_id,
                            "worker": f"{socket.gethostname()}:{os.getpid()}"}  # fmt: skip
    try:
        claimed = await call(
            f"/executions/{ref.execution_id}/claim", {**body, **_llm(default), "default_llm": True}
        )
    except ApiRefused as e:
        raise Refused(f"Stigmer's API refused to run this execution: {e}", non_retryable=True) from None
    spec = RunSpec.model_validate(claimed)
    target = default
    if spec.model:
        target = llm.resolve(spec.model)
        await call(f"/executions/{ref.execution_id}/claim", {**body, **_llm(target)})
    return Prepared(target=target, spec=spec)


def _llm(target: LlmTarget) -> dict[str, str]:
    return {"provider": target.provider, "model": target.model, "endpoint": target.shown}


def _root(e: BaseException) -> str:
    """The innermost message of a failure chain (ActivityError -> ApplicationError -> ...)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return str(getattr(e, "message", "") or e) or type(e).__name__


@workflow.defn(name=WORKFLOW)
class AgentExecution(PydanticAIWorkflow, Approvals, Retries):
    __pydantic_ai_agents__ = [agent, tool_agent]

    def __init__(self) -> None:
        Approvals.__init__(self)
        Retries.__init__(self)

    @workflow.signal(name=WAKE_SIGNAL)
    def wake(self, *_ignored: Any) -> None:
        """The API recorded a decision: read the decisions again (the signal itself carries nothing)."""
        self.woken = True

    @workflow.signal(name=RETRIED_SIGNAL)
    def retried(self, report: Any) -> None:
        """A worker tries a model request or a tool call again (runner/attempts.py): count the attempt."""
        self.note(report)

    @workflow.run
    async def run(self, given: dict[str, Any]) -> ExecutionOutput:
        # Taken as a plain mapping and checked here: an input of another shape (a workflow that
        # something other than Stigmer's API started) fails the workflow, rather than its task forever.
        try:
            ref = ExecutionRef.model_validate(given)
        except ValidationError:
            workflow.logger.warning("refused a workflow whose input did not come from Stigmer's API")
            raise Refused(
                "This workflow was not started by Stigmer's API: it runs nothing.", non_retryable=True
            ) from None
        # A local activity: it runs in this worker within the same workflow task, without a round trip
        # through Temporal's task queue (the LLM is this worker's to choose anyway).
        prepared = await workflow.execute_local_activity(
            prepare,
            ref,
            start_to_close_timeout=timedelta(seconds=30),
            # Tried again while the API restarts or the LLM's configuration cannot be read, for a while;
            # never after the API said no.
            schedule_to_close_timeout=timedelta(minutes=3),
            retry_policy=RetryPolicy(
                maximum_interval=timedelta(seconds=5), non_retryable_error_types=["Refused"]
            ),
        )
        target, inp = prepared.target, prepared.spec
        settings = ModelSettings()
        if inp.temperature is not None:
            settings["temperature"] = inp.temperature
        # Every model call is bounded: the agent's max_tokens, else a default tied to the context window.
        settings["max_tokens"] = inp.max_tokens or default_max_tokens(target.context)
        tools = _tools(inp)
        runner = tool_agent if tools else agent
        budget = limits.Budget(effective_limits(None, inp.limits))  # the defaults, for records made before
        try:
            result = await limits.run(
                runner,
                budget,
                inp.execution_id,
                ref.ticket,
                lambda history: _messages(inp, history),
                user_prompt=inp.message,
                model=MODEL_PREFIX + target.model,
                deps=RunDeps(
                    execution_id=inp.execution_id,
                    ticket=ref.ticket,
                    target=target,
                    agent=inp.agent,
                    tools=tools,
                    workspace=inp.workspace,
                    session=inp.session,
                    history=inp.history,
                ),
                instructions=inp.instructions or None,
                model_settings=settings,
                # An output schema: the answer is a `final_result` tool call whose arguments must match it
                # (a mismatch goes back to the model, within the agent's output retries).
                output_type=output_type(inp.output_schema) if inp.output_schema else None,
            )
        except UsageLimitExceeded as e:  # the agent library's own bounds are off (ours replace them): in case
            raise ApplicationError(
                f"The agent stopped: it reached a limit for one execution ({e.message.split('. ')[0]}).",
                non_retryable=True,
            ) from None
        except UnexpectedModelBehavior as e:
            if inp.output_schema and "output" in e.message:
                raise ApplicationError(
                    f"The model's answer did not match the agent's output_schema, after retries ({e.message}). "
                    "A small model may need a simpler schema, or instructions that describe the fields.",
                    non_retryable=True,
                ) from None
            raise ApplicationError(
                f"The model ({target.model}) answered in a way the agent could not use: {e.message}",
                non_retryable=True,
            ) from None
        except (ActivityError, ModelAPIError) as e:
            from stigmer.runner.mcp_servers import setup_failure

            if (server_failed := setup_failure(e)) is not None:  # an MCP server that cannot start: name it
                raise ApplicationError(server_failed, non_retryable=True) from e
            if _root(e).startswith(TRANSCRIPT_FAILED):  # the conversation could not be read: say so
                raise ApplicationError(_root(e), non_retryable=True) from e
            # pydantic-ai turns a model activity that failed every attempt into its own error: name the LLM.
            raise ApplicationError(
                f"The LLM at {target.shown} ({target.provider}, model {target.model}) failed after "
                f"retries: {_root(e)}",
                non_retryable=True,
            ) from e
        usage = result.usage
        messages = _messages(inp, result.all_messages())
        output = result.output
        return ExecutionOutput(
            text=json.dumps(output, ensure_ascii=False) if isinstance(output, dict) else str(output),
            provider=target.provider,
            model=target.model,
            endpoint=target.shown,
            input_tokens=usage.input_tokens or 0,
            output_tokens=usage.output_tokens or 0,
            requests=usage.requests + self.extra(MODEL_CALLS),  # retried attempts included
            tool_calls=sum(1 for m in messages if m["role"] == "tool") + self.extra(TOOL_CALLS),
            messages=messages,
        )


def _tools(inp: RunSpec) -> list[dict[str, Any]]:
    from dataclasses import asdict

    spec = AgentSpec(name=inp.agent, tools=inp.tools, mcp_servers=inp.mcp_servers)
    return [asdict(c) for c in tool_configs(spec)]


def _messages(inp: RunSpec, history: list[Any]) -> list[dict[str, Any]]:
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

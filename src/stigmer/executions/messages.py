"""The messages of the execution protocol (see contract.py): the workflow's input, what a worker claims and
sends, and the decisions people made. pydantic models, shared by the API and the agent runner."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ExecutionRef(BaseModel):
    """The workflow's input: a reference, not the work. The ticket is a secret of this execution."""

    execution_id: str = Field(max_length=64)
    ticket: str = Field(max_length=128)


class ClaimRequest(BaseModel):
    ticket: str = Field(max_length=128)
    worker: str = Field(default="", max_length=200)
    provider: str = Field(default="", max_length=64)
    model: str = Field(default="", max_length=300)
    endpoint: str = Field(default="", max_length=500)
    default_llm: bool = False  # the worker's default LLM, sent before it knows the agent's own model


class RunSpec(BaseModel):
    """What to run, as the API stored it when the execution was created (the agent as it was then)."""

    execution_id: str
    agent: str
    instructions: str = ""
    message: str
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    tools: list[Any] = []
    mcp_servers: list[dict[str, Any]] = []
    workspace: str | None = None
    session: str | None = None  # a turn of this session: the worker reads the transcript from the API
    turn: int | None = None
    history: bool = False  # the caller gave the conversation before the message: read like a transcript
    output_schema: dict[str, Any] | None = None  # the answer is an object matching this JSON Schema
    limits: dict[str, int] = {}  # every limit of this execution (agents/limits.py), decided at creation


class EventBatch(BaseModel):
    ticket: str = Field(max_length=128)
    events: list[dict[str, Any]] = Field(max_length=1000)


class DecisionsRequest(BaseModel):
    ticket: str = Field(max_length=128)
    call_ids: list[str] = Field(max_length=1000)


class Decision(BaseModel):
    """A person's answer to a tool call waiting for approval, as the API recorded it."""

    call_id: str
    tool: str = ""
    approve: bool
    always: bool = False

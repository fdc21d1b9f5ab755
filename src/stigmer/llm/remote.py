"""Remote LLM providers: OpenAI, Anthropic, and any OpenAI-compatible endpoint (vLLM, LM Studio, a
llama.cpp server on another machine). Nothing to install, start or pull: only a chat endpoint and a
status that says whether the endpoint answers and the key is accepted. The key is never shown.

Keys: llm.api_key (or STIGMER_LLM_API_KEY), else the provider's own variable (OPENAI_API_KEY,
ANTHROPIC_API_KEY).
"""

from __future__ import annotations

import json
import os
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stigmer.errors import ErrorCode, StigmerError
from stigmer.llm.endpoint import ChatEndpoint, Message, OpenAICompatible
from stigmer.llm.provider import Provider
from stigmer.llm.status import LlmStatus
from stigmer.net import http

MAX_LISTED = 20  # models shown in a status; an account can list hundreds


class RemoteProvider(Provider):
    key_env: ClassVar[str] = ""

    @property
    def api_key(self) -> str:
        return self.settings.llm.api_key or (os.environ.get(self.key_env, "") if self.key_env else "")

    def require_endpoint(self) -> None:
        if not self.base_url:
            raise StigmerError(
                f"llm.provider is {self.name} but llm.base_url is not set.",
                hint="Set the endpoint, as the OpenAI client takes it:  "
                "stigmer config set llm.base_url http://HOST:PORT/v1",
                code=ErrorCode.CONFIG_INVALID,
            )
        if not self.model:
            raise StigmerError(
                f"llm.provider is {self.name} but llm.model is not set.",
                hint="Set the model the endpoint serves:  stigmer config set llm.model NAME",
                code=ErrorCode.CONFIG_INVALID,
            )

    def status(self) -> LlmStatus:
        notes: list[str] = []
        available: list[str] = []
        reachable = False
        try:
            self.require_endpoint()
            available = self.endpoint().list_models()
            reachable = True
        except StigmerError as e:
            notes.append(e.message)
        return LlmStatus(
            provider=self.name,
            label=self.label,
            running=reachable,
            pid=None,
            managed=False,
            model=self.model,
            model_available=self.model in available,
            available=available[:MAX_LISTED],
            base_url=http.redact(self.base_url),
            notes=notes,
            remote=True,
        )


class OpenAIProvider(RemoteProvider):
    name = "openai"
    label = "OpenAI"
    noun = "OpenAI API"
    key_env = "OPENAI_API_KEY"

    def endpoint(self, model: str | None = None) -> ChatEndpoint:
        return OpenAICompatible(self.base_url, model or self.model, self.api_key)


class OpenAICompatibleProvider(OpenAIProvider):
    name = "openai-compatible"
    label = "OpenAI-compatible"
    noun = "OpenAI-compatible endpoint"
    key_env = ""


class AnthropicProvider(RemoteProvider):
    name = "anthropic"
    label = "Anthropic"
    noun = "Anthropic API"
    key_env = "ANTHROPIC_API_KEY"

    def endpoint(self, model: str | None = None) -> ChatEndpoint:
        return AnthropicMessages(self.base_url, model or self.model, self.api_key)


@dataclass(frozen=True)
class AnthropicMessages(ChatEndpoint):
    """Anthropic's Messages API (`/v1/messages`, SSE streaming) behind the ChatEndpoint interface."""

    base_url: str  # https://api.anthropic.com
    model: str
    api_key: str = field(default="", repr=False)
    timeout: float = 300.0
    version: str = "2023-06-01"
    max_tokens: int = 1024

    def _open(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        headers = {"x-api-key": self.api_key, "anthropic-version": self.version}
        try:
            return http.request(
                self.base_url + path,
                method="GET" if body is None else "POST",
                body=body,
                headers=headers,
                timeout=timeout or self.timeout,
            )
        except urllib.error.HTTPError as e:
            raise self._failed(http.error_body(e) or f"HTTP {e.code}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            raise self._failed(http.describe(e)) from None

    def _body(self, messages: list[Message], stream: bool, options: dict[str, Any]) -> dict[str, Any]:
        system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
        rest = [m for m in messages if m.get("role") != "system"]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": rest,
            "max_tokens": int(options.pop("max_tokens", self.max_tokens)),
            "stream": stream,
            **options,
        }
        if system:
            body["system"] = system
        return body

    def list_models(self) -> list[str]:
        with self._open("/v1/models?limit=100", timeout=10) as resp:
            data = json.loads(resp.read(4 * 1024 * 1024) or b"null")
        items = data.get("data") if isinstance(data, dict) else None
        return [str(m["id"]) for m in items or [] if isinstance(m, dict) and "id" in m]

    def chat(self, messages: list[Message], **options: Any) -> str:
        with self._open("/v1/messages", self._body(messages, False, options)) as resp:
            data = json.loads(resp.read())
        return "".join(b.get("text", "") for b in data.get("content") or [] if b.get("type") == "text")

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        with self._open("/v1/messages", self._body(messages, True, options)) as resp:
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:].strip())
                if event.get("type") == "content_block_delta":
                    text = (event.get("delta") or {}).get("text")
                    if text:
                        yield str(text)
                elif event.get("type") == "error":
                    raise self._failed(str((event.get("error") or {}).get("message", "stream error")))

    def _failed(self, why: str, status: int | None = None) -> StigmerError:
        where = http.redact(self.base_url)
        if status == 401:
            return StigmerError(
                f"The LLM endpoint {where} refused the API key (HTTP 401).",
                hint="Check the key: stigmer config set llm.api_key KEY (or ANTHROPIC_API_KEY).",
                code=ErrorCode.UNAUTHORIZED,
            )
        return StigmerError(
            f"The LLM request to {where} failed: {why}.",
            hint="Check the endpoint and your connection: stigmer server llm status",
            code=ErrorCode.LLM_REQUEST_FAILED,
        )

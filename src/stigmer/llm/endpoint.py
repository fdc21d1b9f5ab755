"""Chat endpoints: what every provider offers, local or remote (base URL, key, model; list models, chat,
streamed chat).

OpenAICompatible speaks the OpenAI chat completions API, which the local runtimes serve under /v1 too.
It is on the standard library so it adds nothing to the CLI's start-up; the agent runner uses an agent
framework's own clients.
"""

from __future__ import annotations

import json
import urllib.error
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from stigmer.errors import ErrorCode, StigmerError
from stigmer.net import http

Message = dict[str, str]


class ChatEndpoint(ABC):
    base_url: str
    model: str

    @abstractmethod
    def list_models(self) -> list[str]: ...

    @abstractmethod
    def chat(self, messages: list[Message], **options: Any) -> str: ...

    @abstractmethod
    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        """Yield the text of each streamed piece as it arrives."""


@dataclass(frozen=True)
class OpenAICompatible(ChatEndpoint):
    base_url: str  # the API root, ending in /v1 (as OpenAI clients take it)
    model: str
    api_key: str = field(default="", repr=False)
    timeout: float = 300.0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _body(self, messages: list[Message], stream: bool, options: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "stream": stream, **options}

    def _open(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        try:
            return http.request(
                self.base_url + path,
                method="GET" if body is None else "POST",
                body=body,
                headers=self._headers(),
                timeout=timeout or self.timeout,
            )
        except urllib.error.HTTPError as e:
            raise self._failed(http.error_body(e) or f"HTTP {e.code}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            raise self._failed(http.describe(e)) from None

    def list_models(self) -> list[str]:
        with self._open("/models", timeout=10) as resp:
            data = json.loads(resp.read(4 * 1024 * 1024) or b"null")
        items = data.get("data") if isinstance(data, dict) else None
        return [str(m["id"]) for m in items or [] if isinstance(m, dict) and "id" in m]

    def chat(self, messages: list[Message], **options: Any) -> str:
        with self._open("/chat/completions", self._body(messages, False, options)) as resp:
            data = json.loads(resp.read())
        return str(data["choices"][0]["message"].get("content") or "")

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        with self._open("/chat/completions", self._body(messages, True, options)) as resp:
            try:
                for raw in resp:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    chunk = json.loads(payload)
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:  # the first delta carries a role and content null
                            yield str(text)
            except OSError as e:
                raise self._failed(http.describe(e)) from None

    def _failed(self, why: str, status: int | None = None) -> StigmerError:
        where = http.redact(self.base_url)
        if status == 401:
            return StigmerError(
                f"The LLM endpoint {where} refused the API key (HTTP 401).",
                hint="Check the key: stigmer config set llm.api_key KEY (or the provider's environment "
                "variable).",
                code=ErrorCode.UNAUTHORIZED,
            )
        return StigmerError(
            f"The LLM request to {where} failed: {why}.",
            hint="Check it is running: stigmer server llm status",
            code=ErrorCode.LLM_REQUEST_FAILED,
        )

"""A small OpenAI-compatible chat client for the Local LLM (both providers serve /v1/chat/completions).

This is what the agent runner will use; it is on the standard library so it adds nothing to start-up.
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stigmer.errors import StigmerError
from stigmer.net import http

Message = dict[str, str]


@dataclass(frozen=True)
class ChatClient:
    base_url: str  # the server's root, e.g. http://127.0.0.1:11435
    model: str
    timeout: float = 300.0

    def _body(self, messages: list[Message], stream: bool, options: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "stream": stream, **options}

    def chat(self, messages: list[Message], **options: Any) -> str:
        try:
            with http.request(
                self.base_url + "/v1/chat/completions",
                method="POST",
                body=self._body(messages, False, options),
                timeout=self.timeout,
            ) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise _failed(http.error_body(e) or f"HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise _failed(http.describe(e)) from None
        return str(data["choices"][0]["message"].get("content") or "")

    def stream(self, messages: list[Message], **options: Any) -> Iterator[str]:
        """Yield the text of each streamed chunk (Server-Sent Events) as it arrives."""
        try:
            with http.request(
                self.base_url + "/v1/chat/completions",
                method="POST",
                body=self._body(messages, True, options),
                timeout=self.timeout,
            ) as resp:
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
        except urllib.error.HTTPError as e:
            raise _failed(http.error_body(e) or f"HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise _failed(http.describe(e)) from None


def _failed(why: str) -> StigmerError:
    return StigmerError(
        f"The Local LLM request failed: {why}.",
        code="llm_request_failed",
        hint="Check it is running: stigmer server llm status",
    )

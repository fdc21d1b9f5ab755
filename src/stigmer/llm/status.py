"""What a provider reports about its LLM: built by the provider, sent by the API as JSON, rebuilt and
printed by the CLI. Its own module, light to import: `stigmer server status` renders it without loading
the providers or the settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class LlmStatus:
    provider: str
    label: str  # what users see: "Local", "Local (built-in engine)"
    running: bool
    pid: int | None
    managed: bool  # started by Stigmer (so `server stop` will stop it)
    model: str
    model_available: bool
    available: list[str]
    base_url: str
    fallback: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    remote: bool = False  # an endpoint elsewhere: "running" means it answers and takes the key
    runs_on: str = ""  # gpu | partial | cpu, as the runtime reports the loaded model; "" when unknown
    context: int = 0  # the context window the server was started with (the built-in engine), 0 unknown
    # The estimated tokens/s of a model chosen for this machine (hw.speed); 0 when not estimated.
    expected_tokens_per_second: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LlmStatus:
        """A status as the daemon sent it; fields a newer or older daemon adds or lacks do not break it."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def chosen_note(reason: str) -> str:
    """The status note of a model the machine chose (llm.model not set), with why and how fast."""
    return f"Chosen for this machine: {reason}. To choose another: stigmer config set llm.model NAME"

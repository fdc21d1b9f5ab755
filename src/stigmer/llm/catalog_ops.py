"""Model management that the CLI (`stigmer server llm ...`) and the web console share: which provider
manages models, the fit check before a pull, the pull itself. Nothing here prints; notices are returned."""

from __future__ import annotations

from stigmer.errors import ErrorCode, StigmerError
from stigmer.events import Reporter
from stigmer.llm.provider import CATALOG, LocalRuntime, ModelCatalog, Provider


def catalog(provider: Provider, what: str) -> ModelCatalog:
    """The provider as a model catalog, or an error saying that its models are managed elsewhere."""
    if not isinstance(provider, ModelCatalog):
        raise StigmerError(
            f"The {provider.label} provider has no models to {what}: its models are managed by its service.",
            hint="Local providers (ollama, llamacpp) manage models: stigmer config set llm.provider ollama",
            code=ErrorCode.UNSUPPORTED,
        )
    assert CATALOG in provider.capabilities
    return provider


def fit_before_download(provider: Provider, model: str, *, force: bool, command: str) -> list[str]:
    """The fit check of a model about to be downloaded: raises when it does not fit (unless `force`);
    the notices to show otherwise. `command` is what the user runs to force it."""
    if not isinstance(provider, LocalRuntime):
        return []
    if provider.name == "ollama" and not provider.is_running():
        from stigmer.llm.provider import not_running_error

        raise not_running_error()  # the runtime pulls: nothing to check before it runs
    if provider.is_downloaded(model):
        return []
    from stigmer.llm.models.fit_check import before_download

    return before_download(
        model,
        provider=provider.name,
        settings=provider.settings,
        paths=provider.paths,
        force=force,
        force_command=command,
    )


def pull(
    provider: Provider, model: str, report: Reporter, *, force: bool, command: str, notices: Reporter
) -> None:
    """Check the fit, then download `model` with progress to `report`; fit notices go to `notices` as
    they are known (before the download starts)."""
    from stigmer.events import Event
    from stigmer.llm.names import parse_model_name

    parse_model_name(model)
    store = catalog(provider, "pull")
    for notice in fit_before_download(provider, model, force=force, command=command):
        notices(Event("notice", notice))
    store.pull(model, report)

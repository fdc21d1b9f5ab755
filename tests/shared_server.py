"""One real server (API, worker, Temporal) shared by every test of a module, with FakeOpenAI as the model:
starting one takes seconds of the shared cores, so a module that only adds records to it starts one.

A module uses it by defining
    server = pytest.fixture(scope="module")(shared_server)
and overriding conftest's autouse `isolated_home` with `same_home`, so each test sees the module's home
(and its ports) rather than a fresh one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from stigmer.paths import Paths
from tests.conftest import isolated_home, run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI


class Shared:
    def __init__(self, paths: Paths, fake: FakeOpenAI, env: dict[str, str]) -> None:
        self.paths, self.fake, self.env = paths, fake, env

    def api(self) -> Any:
        from stigmer.server import control

        return control.api(self.paths)


def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    import os

    mp = pytest.MonkeyPatch()
    try:
        paths = isolated_home.__wrapped__(tmp_path_factory.mktemp("shared"), mp)  # type: ignore[attr-defined]
        with FakeOpenAI(key="sk-shared") as fake:
            mp.setenv("STIGMER_LLM_PROVIDER", "openai")
            mp.setenv("STIGMER_LLM_BASE_URL", fake.url + "/v1")
            mp.setenv("OPENAI_API_KEY", "sk-shared")
            env = {
                k: v
                for k, v in os.environ.items()
                if k.startswith(("STIGMER_", "OPENAI_", "HOME", "NO_COLOR"))
            }
            r = run_cli("server", timeout=240)
            assert r.returncode == 0, r.stdout + r.stderr
            try:
                yield Shared(paths, fake, env)
            finally:
                from stigmer.server.control import stop

                stop(paths)
    finally:
        mp.undo()


def same_home(server: Shared, monkeypatch: pytest.MonkeyPatch) -> Paths:
    import os

    for var in [v for v in os.environ if v.startswith("STIGMER_")]:
        monkeypatch.delenv(var)
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    return server.paths

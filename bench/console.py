"""Benchmark: the web console (issue 17) in a real browser (Chromium through Playwright), against a running
server whose model is an instant OpenAI-compatible stand-in (the tests' FakeOpenAI).

(a) Overview's first paint: the browser's first-contentful-paint of `/` (signed in, server running), and
    when its live data is in (the services table filled from /ui/api/overview), against the first paint
    of the same page and files saved and served by a plain `http.server` in the same browser. Medians of
    --repeat loads, as a returning visitor (CSS and scripts revalidated: 304). Target: first paint < 300 ms.
(b) Page weight: the bytes of every response a console page loads (document, CSS, scripts, icon, its first
    JSON), each page in a new browser context (nothing cached), uncompressed (the API does not compress). Target: < 200 KB each.

    python bench/console.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from _common import (
    CpuWatch,
    clean_up,
    interrupt_on_sigterm,
    machine_line,
    server_env,
    start_server,
    stigmer_exe,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' stand-in model
from tests.doubles.fake_llm_apis import FakeOpenAI  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
PAINT_TARGET_MS = 300.0
WEIGHT_TARGET = 200_000
PAGES = ["/", "/ui/chat", "/ui/executions", "/ui/approvals", "/ui/agents", "/ui/agents/default", "/ui/models"]
FCP = "performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null"


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass


def first_paint(page: object, url: str, ready: str | None = None) -> tuple[float, float | None]:
    """(first contentful paint, when `ready` held) in ms from the navigation's start."""
    page.goto(url)  # type: ignore[attr-defined]
    page.wait_for_function(f"() => ({FCP}) !== null")  # type: ignore[attr-defined]
    fcp = float(page.evaluate(FCP))  # type: ignore[attr-defined]
    data = None
    if ready:
        page.wait_for_function(f"() => {ready}")  # type: ignore[attr-defined]
        data = float(page.evaluate("performance.now()"))  # type: ignore[attr-defined]
    return fcp, data


def main() -> None:
    from playwright.sync_api import sync_playwright

    import stigmer.console as console_pkg
    from stigmer.console.door import PREFIX

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="loads of each page measured; default 15")
    args = ap.parse_args()
    interrupt_on_sigterm()
    machine_line()
    tmp = Path(tempfile.mkdtemp(prefix="stigmer-bench-console-"))
    watch = CpuWatch()
    env: dict[str, str] | None = None
    with FakeOpenAI(key="sk-bench") as fake:
        try:
            env = server_env(tmp)
            env.update({"STIGMER_LLM_PROVIDER": "openai", "STIGMER_LLM_BASE_URL": fake.url + "/v1",
                        "OPENAI_API_KEY": "sk-bench"})  # fmt: skip
            start_server(env)
            subprocess.run([*stigmer_exe(), "run", "-m", "hello"], env=env, capture_output=True, check=True)
            link = subprocess.run(
                [*stigmer_exe(), "ui", "--no-open"], env=env, capture_output=True, text=True, check=True
            ).stdout.strip()
            origin = link.split(PREFIX + "/signin")[0]
            static = tmp / "static"
            static.mkdir()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_context(base_url=origin).new_page()
                page.goto(link)
                # the baseline: the Overview's page and files, saved, from a plain server (no data comes)
                (static / "index.html").write_text(page.content())
                shutil.copytree(Path(console_pkg.__file__).parent / "static", static / "ui" / "static")
                handler = functools.partial(Quiet, directory=str(static))
                httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
                threading.Thread(target=httpd.serve_forever, daemon=True).start()
                plain = f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
                for _ in range(3):  # warm-ups
                    first_paint(page, "/")
                    first_paint(page, plain)
                ours, live, base = [], [], []
                for _ in range(args.repeat):
                    fcp, data = first_paint(
                        page, "/", "document.querySelectorAll('#ov-services tr').length > 0"
                    )
                    ours.append(fcp)
                    live.append(data or 0.0)
                    base.append(first_paint(page, plain)[0])
                httpd.shutdown()
                paint = statistics.median(ours)
                print(
                    f"(a) Overview first paint: {paint:.0f} ms (p90 {sorted(ours)[int(0.9 * len(ours)) - 1]:.0f}), "
                    f"its live data in at {statistics.median(live):.0f} ms; a static copy from http.server: "
                    f"{statistics.median(base):.0f} ms | target < {PAINT_TARGET_MS:.0f} ms: "
                    f"{'met' if paint < PAINT_TARGET_MS else 'NOT MET'}",
                    flush=True,
                )
                cookies = page.context.cookies()
                for path in PAGES:  # each in a new browser context: nothing cached, the session's cookie
                    fresh = browser.new_context(base_url=origin)
                    fresh.add_cookies(cookies)
                    sizes: list[int] = []
                    first = fresh.new_page()
                    first.on("response", lambda r, sizes=sizes: sizes.append(len(r.body())))
                    first.goto(path)
                    first.wait_for_load_state("networkidle")
                    fresh.close()
                    weight = sum(sizes)
                    print(
                        f"(b) {path}: {weight / 1000:.1f} KB | target < {WEIGHT_TARGET // 1000} KB: "
                        f"{'met' if weight < WEIGHT_TARGET else 'NOT MET'}",
                        flush=True,
                    )
                browser.close()
        finally:
            clean_up(tmp, env, watch)


if __name__ == "__main__":
    main()

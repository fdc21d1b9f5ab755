"""Benchmark: the web console (issue 17) in a real browser (Chromium through Playwright), against a running
server whose model is an instant OpenAI-compatible stand-in (the tests' FakeOpenAI).

(a) Overview's first paint: the browser's first-contentful-paint of `/` (signed in, server running), and
    when its live data is in (the services table filled from /ui/api/overview), against the first paint
    of the same page and files saved and served by a plain `http.server` in the same browser. Medians of
    --repeat loads, as a returning visitor (CSS and scripts revalidated: 304). Target: first paint < 300 ms.
(b) Page weight: the bytes of every response a console page loads (document, CSS, scripts, icon, its first
    JSON), each page in a new browser context (nothing cached), uncompressed (the API does not compress). Target: < 200 KB each.
(c) Chat's first token: the stand-in model now streams a chunk every --delay s (50 ms: the first token
    is apart from the rest of the answer), and the same message is sent three ways, interleaved, each a
    new conversation, until its answer is complete:
    - console: Enter pressed in the Chat page (a new chat) -> the first answer text in the page, both
      timed inside the browser with performance.now() (a capture-phase keydown listener; a
      MutationObserver on the thread, which sees the text when the page inserts it: it is painted in
      that same frame). It includes what the page does between the two: POST /ui/api/chat, opening the
      execution's event stream (EventSource), the first `delta` and its frame (requestAnimationFrame).
    - `stigmer run` (the baseline): what `stigmer run -m MSG` does once it has started, with its own
      client (`ApiClient`, in this process): POST /v1/executions, then its event stream until the
      first `delta` -- the moment `run` prints it. Spawning `stigmer run` is left out on purpose:
      Python's and the CLI's start-up (~150-200 ms here, `execution_overhead.py` (b)) come before the
      request and have no counterpart in a page that is already open; the comparison starts when each
      one sends the message.
    - the same client with a new `session` in the body: what the console sends (every chat message
      is a turn of a session, `stigmer run --session NAME`), to tell the browser's share from the
      session's.
    Medians of --repeat each, after 2 warm-ups, with each way's stages (its POST answered, its event
    stream asked for, open, the first `delta`, the text shown) to tell where a difference comes from.
    Target: the console within +50 ms of `stigmer run`.

    python bench/console.py [--repeat 15] [--delay 0.05]
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
import time
from pathlib import Path
from typing import Any

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
FIRST_TOKEN_TARGET_MS = 50.0
MESSAGE = "Say hello to the console in a few short words"
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


# The console's clock, installed in a freshly loaded Chat page: the moment Enter goes down (before the
# page's own handler: capture phase, on window) and the moment the first answer text is in the thread.
CHAT_CLOCK = """() => {
  const thread = document.getElementById("chat-thread");
  window.__sent = null; window.__first = null; window.__stream = null; window.__open = null; window.__delta = null;
  const Native = window.EventSource;  // the page's event stream: when it is made, opened, and its first delta
  window.EventSource = class extends Native {
    constructor(url, options) {
      super(url, options);
      if (window.__stream !== null || !String(url).includes("/events")) return;
      window.__stream = performance.now();
      this.addEventListener("open", () => { window.__open ??= performance.now(); });
      this.addEventListener("delta", () => { window.__delta ??= performance.now(); });
    }
  };
  addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && window.__sent === null) window.__sent = performance.now();
  }, true);
  new MutationObserver(() => {
    if (window.__first !== null) return;
    const md = thread.querySelector(".turn .msg.assistant .md");
    if (md && md.textContent.trim()) window.__first = performance.now();
  }).observe(thread, { childList: true, subtree: true, characterData: true });
}"""
# When the page had POST /ui/api/chat's answer (resource timing), in the same clock.
CHAT_POSTED = """() => {
  const e = performance.getEntriesByType("resource").find((r) => r.name.endsWith("/ui/api/chat"));
  return e ? e.responseEnd : null;
}"""
# the message's POST answered, its event stream asked for, open (headers in), its first delta, text shown
STAGES = ("posted", "asked", "open", "delta", "text")


def console_first_token(page: Any) -> dict[str, float]:
    """Ms from Enter (a new chat) to each stage; `text`: the first answer text in the page."""
    page.goto("/ui/chat")
    page.wait_for_load_state("networkidle")  # the session list loaded: the page is idle, as a user finds it
    page.evaluate(CHAT_CLOCK)
    box = page.get_by_label("Message", exact=True)
    box.fill(MESSAGE)
    box.press("Enter")
    # Polled every 100 ms: Playwright's default polls at every frame, renderer CPU taken (on 2 cores) from
    # the worker making the token waited for. The clocks above are exact whatever the polling.
    page.wait_for_function("() => window.__first !== null", polling=100, timeout=60_000)
    page.wait_for_function(  # the answer complete before the next message
        "() => document.querySelector('.turn-foot') !== null", polling=100, timeout=60_000
    )
    got = page.evaluate(
        f"() => ({{sent: window.__sent, posted: ({CHAT_POSTED})(), asked: window.__stream, "
        "open: window.__open, "
        "delta: window.__delta, text: window.__first})"
    )
    return {k: float(got[k]) - float(got["sent"]) for k in STAGES}


def run_first_token(client: Any, session: str | None = None) -> dict[str, float]:
    """What `stigmer run -m MESSAGE` does after its start-up, its own client: ms from the POST to each
    stage (`text`: the first `delta`, which `run` prints as it comes), then the stream to its end."""
    body: dict[str, Any] = {"agent": "default", "message": MESSAGE}
    if session:
        body["session"] = session
    at: dict[str, float] = {}
    t0 = time.perf_counter()

    def stamp(stage: str) -> None:
        at.setdefault(stage, (time.perf_counter() - t0) * 1000)

    rec = client.post("/v1/executions", body)
    stamp("posted")
    stamp("asked")
    for _id, kind, _raw in client.events(f"/v1/executions/{rec['id']}/events", on_open=lambda: stamp("open")):
        if kind == "delta":
            stamp("delta")
            stamp("text")
        if kind in ("completed", "failed", "cancelled"):
            if kind != "completed":
                raise SystemExit(f"execution {rec['id']} ended {kind}")
            break
    if "text" not in at:
        raise SystemExit(f"execution {rec['id']} streamed no text")
    return at


def main() -> None:
    from playwright.sync_api import sync_playwright

    import stigmer.console as console_pkg
    from stigmer.console.door import PREFIX

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--repeat", type=int, default=15, help="loads of each page, and chat messages, measured; default 15"
    )
    ap.add_argument(
        "--delay",
        type=float,
        default=0.05,
        help="(c) seconds between the model's streamed chunks; default 0.05",
    )
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
                # (c) chat's first token
                from stigmer.server.client import ApiClient

                home = Path(env["STIGMER_HOME"])
                client = ApiClient(origin, (home / "api.token").read_text().strip())
                fake.delay = args.delay
                chat = browser.new_context(base_url=origin)
                chat.add_cookies(cookies)
                page = chat.new_page()
                ways = {
                    "console": "console (Enter -> text in the page)",
                    "run": "`stigmer run`'s client (POST -> first delta)",
                    "session": "the same, a new session's turn",
                }
                runs: dict[str, list[dict[str, float]]] = {how: [] for how in ways}
                for i in range(args.repeat + 2):  # 2 warm-ups
                    for how, stages in (
                        ("console", console_first_token(page)),
                        ("run", run_first_token(client)),
                        ("session", run_first_token(client, f"bench-{i}")),
                    ):
                        if i >= 2:
                            runs[how].append(stages)
                chat.close()
                med = {
                    how: {k: statistics.median(r[k] for r in v) for k in STAGES} for how, v in runs.items()
                }
                added = med["console"]["text"] - med["run"]["text"]
                print(
                    f"(c) first token, chunks every {args.delay * 1000:.0f} ms, median of {args.repeat}; ms from "
                    "sending: POST answered / stream asked for / open / first delta / text shown",
                    flush=True,
                )
                for how, label in ways.items():
                    texts = sorted(r["text"] for r in runs[how])
                    print(
                        f"    {label}: "
                        + " / ".join(f"{med[how][k]:.0f}" for k in STAGES)
                        + f" (text p90 {texts[int(0.9 * len(texts)) - 1]:.0f})",
                        flush=True,
                    )
                print(
                    f"    console - run: {added:+.0f} ms (over the session turn: "
                    f"{med['console']['text'] - med['session']['text']:+.0f}) | target <= "
                    f"+{FIRST_TOKEN_TARGET_MS:.0f} ms: {'met' if added <= FIRST_TOKEN_TARGET_MS else 'NOT MET'}",
                    flush=True,
                )
                browser.close()
        finally:
            clean_up(tmp, env, watch)


if __name__ == "__main__":
    main()

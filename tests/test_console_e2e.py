"""The web console (issue 17), end to end in a real browser (Chromium driven by Playwright) against the
real server (API, worker, Temporal) with a scripted OpenAI-compatible model: sign-in, chat, Stop, the
approvals inbox (also across a server restart: the last test, as it restarts the module's server), the
agent editor, models, a forged request from another localhost port, the phone width, and no errors in the
browser's console. One server for the module (a start costs ~10 s); every test signs in afresh. The Models
page with a local provider (pull, remove) is in test_console_models_e2e.py. Screenshots of every page,
light and dark, go to $CONSOLE_SHOTS (default: the pytest temp folder's console-shots/)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stigmer.paths import Paths
from tests.conftest import module_env, run_cli
from tests.doubles.fake_llm_apis import FakeOpenAI
from tests.executions import in_state, tool_call, wait_until

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="Chromium is not installed (apt-get install -y chromium)"
    ),
    pytest.mark.xdist_group("console"),  # one browser and the module's server, its tests in order on one worker
]
PAGES = {
    "overview": "/",
    "chat": "/ui/chat",
    "executions": "/ui/executions",
    "approvals": "/ui/approvals",
    "agents": "/ui/agents",
    "agent": "/ui/agents/default",
    "models": "/ui/models",
}


@dataclass
class Console:
    env: dict[str, str]
    paths: Paths
    fake: FakeOpenAI
    origin: str
    shots: Path
    browser: Any
    errors: list[str] = field(default_factory=list)

    def link(self) -> str:
        r = run_cli("ui", "--no-open", env=self.env)
        assert r.returncode == 0, r.stdout + r.stderr
        url = r.stdout.strip()
        assert url.startswith(self.origin + "/ui/signin?t="), url
        return url

    def api(self) -> Any:
        from stigmer.server import control

        return control.api(self.paths)

    def context(self, *, width: int = 1280, height: int = 860, scheme: str = "light") -> Any:
        return self.browser.new_context(
            viewport={"width": width, "height": height}, color_scheme=scheme, base_url=self.origin
        )

    def signed_in(self, *, watched: bool = True, **kwargs: Any) -> Any:
        """A page signed in through a fresh one-time link, its console errors collected (`watched`)."""
        page = self.context(**kwargs).new_page()
        if watched:
            watch(page, self.errors)
        page.goto(self.link())
        assert page.url == self.origin + "/"
        return page

    def shot(self, page: Any, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)


def watch(page: Any, errors: list[str]) -> None:
    page.on("console", lambda m: m.type == "error" and errors.append(f"{page.url}: {m.text}"))
    page.on("pageerror", lambda e: errors.append(f"{page.url}: {e}"))


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    from playwright.sync_api import sync_playwright

    from stigmer.server.control import stop

    root = tmp_path_factory.mktemp("console")
    shots = Path(os.environ.get("CONSOLE_SHOTS") or tmp_path_factory.getbasetemp() / "console-shots")
    shots.mkdir(parents=True, exist_ok=True)
    env = module_env(root)
    port = int(env["STIGMER_SERVER_PORT"])
    with FakeOpenAI(key="sk-console") as fake:
        env.update(
            {
                "STIGMER_LLM_PROVIDER": "openai",
                "STIGMER_LLM_BASE_URL": fake.url + "/v1",
                "OPENAI_API_KEY": "sk-console",
            }
        )
        paths = Paths(Path(env["STIGMER_HOME"]))
        try:
            r = run_cli("server", env=env, timeout=240)
            assert r.returncode == 0, r.stdout + r.stderr
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM)
                try:
                    yield Console(env, paths, fake, f"http://127.0.0.1:{port}", shots, browser)
                finally:
                    browser.close()
        finally:
            stop(paths)


@pytest.fixture(autouse=True)
def _server_env(console: Console, isolated_home: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI and API helpers of a test talk to the module's server (not this test's empty home)."""
    for key, value in console.env.items():
        if key.startswith("STIGMER_") or key in ("HOME", "OPENAI_API_KEY", "HF_ENDPOINT"):
            monkeypatch.setenv(key, value)
    console.fake.delay = 0.0
    console.fake.script.clear()


# -- signing in ---------------------------------------------------------------------------------------------
def test_without_a_session_every_page_says_how_to_sign_in(console: Console) -> None:
    page = console.context().new_page()
    for path in [*PAGES.values(), "/ui/executions/ex-nothing", "/ui/nowhere"]:
        response = page.goto(path)
        assert response.status == 401, path
        assert page.locator("h1").inner_text() == "Sign in to the Stigmer console"
        assert page.locator("pre.command").inner_text() == "stigmer ui"
        assert page.locator("nav").count() == 0  # nothing else is shown
    api = page.request.get("/ui/api/overview")
    assert api.status == 401 and api.json()["error"]["code"] == "unauthorized"
    console.shot(page, "signin-light")
    page.context.close()


def test_a_sign_in_link_works_once_and_sets_a_strict_httponly_cookie(console: Console) -> None:
    link = console.link()
    first = console.context().new_page()
    response = first.goto(link)
    assert first.url == console.origin + "/" and response.status == 200
    assert first.locator("h1").inner_text() == "Overview"
    (cookie,) = [c for c in first.context.cookies() if c["name"] == "stigmer_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["domain"] == "127.0.0.1"
    assert 0 < cookie["expires"] - __import__("time").time() <= 12 * 3600 + 60
    # used twice: refused, in another browser and in the same one
    for page in (console.context().new_page(), first):
        response = page.goto(link)
        assert response.status == 403
        assert page.locator("h1").inner_text() == "This sign-in link is no longer valid"
        assert "stigmer ui" in page.locator("main").inner_text()
    console.shot(first, "signin-used")
    # the session still opens every page; the bearer-token API works as it did, and opens no page
    assert first.goto("/ui/agents").status == 200
    assert [a["name"] for a in console.api().get("/v1/agents")] == ["default"]
    token = (console.paths.home / "api.token").read_text().strip()
    bare = console.context().new_page()
    assert bare.goto("/").status == 401
    assert bare.request.get("/", headers={"Authorization": f"Bearer {token}"}).status == 401
    first.context.close()
    bare.context.close()


def test_every_console_answer_carries_the_security_headers(console: Console) -> None:
    page = console.signed_in()
    for response in (
        page.goto("/"),
        page.request.get("/ui/static/app.js"),
        page.request.get("/ui/api/overview"),
    ):
        h = response.headers
        csp = h["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
        assert h["x-frame-options"] == "DENY" and h["referrer-policy"] == "no-referrer"
        assert h["x-content-type-options"] == "nosniff"
    page.context.close()


# -- chat ---------------------------------------------------------------------------------------------------
def test_chat_streams_renders_markdown_as_text_and_continues_its_session(console: Console) -> None:
    console.fake.delay = 0.03  # a chunk every 30 ms: the answer is seen arriving
    console.fake.script += [
        {
            "content": "Here is **code**:\n\n```python\nprint('hi')\n```\n\nand `inline` <img src=x onerror=alert(1)> done."
        }
    ]
    page = console.signed_in()
    page.goto("/ui/chat")
    box = page.get_by_label("Message", exact=True)
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"  # Shift+Enter is a new line, not a send
    box.press("Enter")
    page.locator(".msg.assistant .md.typing").first.wait_for()  # streaming, before the end
    foot = page.locator(".turn-foot").first
    foot.wait_for(timeout=60_000)
    assert "completed" in foot.inner_text()
    answer = page.locator(".msg.assistant .md").first
    assert answer.locator("strong").inner_text() == "code"
    assert answer.locator(".code pre").inner_text() == "print('hi')"
    assert answer.get_by_role("button", name="Copy code").count() == 1
    assert answer.locator("img").count() == 0 and "<img src=x onerror=alert(1)>" in answer.inner_text()
    session = page.locator("#chat-title").inner_text()
    assert session.startswith("chat-") and f"session={session}" in page.url
    # a second turn of the same session: the model is sent the first
    box.fill("What did I say?")
    box.press("Enter")
    page.locator(".turn-foot").nth(1).wait_for(timeout=60_000)
    sent = [m["content"] for m in console.fake.requests[-1]["messages"] if m["role"] == "user"]
    assert sent == ["first line\nsecond line", "What did I say?"]
    assert "echo: What did I say?" in page.locator(".turn").nth(1).inner_text()
    console.shot(page, "chat-light")
    # continued later: the session is listed, and opens with both turns
    page.goto("/ui/chat")
    page.get_by_role("button", name=session).click()
    page.locator(".turn").nth(1).wait_for()
    assert page.locator(".turn").count() == 2 and page.locator("#chat-agent").is_disabled()
    # forked from its first turn: a new session with that turn only
    page.get_by_role("button", name="Fork the conversation from turn 1").click()
    page.wait_for_url(lambda url: url.endswith(f"/ui/chat?session={session}-fork-1"))
    assert page.locator(".turn").count() == 1
    assert console.api().get(f"/v1/sessions/{session}-fork-1")["forked_from"] == session
    page.context.close()


def test_stop_cancels_the_turn(console: Console) -> None:
    console.fake.delay = 0.4
    console.fake.script += [{"content": " ".join(f"word{i}" for i in range(60))}]
    page = console.signed_in()
    page.goto("/ui/chat")
    page.get_by_label("Message", exact=True).fill("Talk for a long time")
    page.get_by_role("button", name="Send").click()
    page.locator(".msg.assistant .md.typing").first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Stop").click()
    foot = page.locator(".turn-foot").first
    foot.wait_for(timeout=60_000)
    assert "cancelled" in foot.inner_text()
    assert page.get_by_role("button", name="Stop").is_hidden()
    exec_id = page.locator(".turn-foot a", has_text="Details").get_attribute("href").rsplit("/", 1)[-1]
    assert console.api().get(f"/v1/executions/{exec_id}")["state"] == "CANCELLED"
    page.context.close()


def test_a_running_execution_s_page_streams_it_and_cancels_it(console: Console) -> None:
    console.fake.delay = 0.3
    console.fake.script += [{"content": " ".join(f"word{i}" for i in range(80))}]
    rec = console.api().post("/v1/executions", {"agent": "default", "message": "Talk slowly"})
    page = console.signed_in()
    page.goto(f"/ui/executions/{rec['id']}")
    live = page.locator("#x-live .md.typing")
    live.wait_for(timeout=30_000)
    first = live.inner_text()
    page.wait_for_function(
        "t => document.querySelector('#x-live .md').textContent.length > t.length", arg=first
    )
    page.get_by_role("button", name="Cancel").click()
    page.locator("#x-state", has_text="cancelled").wait_for(timeout=60_000)  # the page, reloaded at the end
    assert console.api().get(f"/v1/executions/{rec['id']}")["state"] == "CANCELLED"
    # the list, filtered by state and agent
    page.goto("/ui/executions?state=CANCELLED&agent=default")
    page.locator("#ex-rows a", has_text=rec["id"]).wait_for()
    states = page.locator("#ex-rows .badge").all_inner_texts()
    assert states and set(states) == {"cancelled"}
    page.get_by_label("State").select_option("COMPLETED")
    page.wait_for_function("() => !document.querySelector('#ex-rows').textContent.includes('cancelled')")
    assert "state=COMPLETED" in page.url
    page.context.close()


# -- approvals ----------------------------------------------------------------------------------------------
def _apply(console: Console, text: str) -> None:
    console.api().post("/v1/agents", {"yaml": text})


def test_an_approval_is_answered_from_the_inbox(console: Console) -> None:
    _apply(console, "name: ops\ninstructions: You run commands.\ntools:\n  - shell: {approval: required}\n")
    console.fake.script += [
        tool_call("run_command", argv=["echo", "<b>hello</b>"]),
        {"content": "It said hello."},
    ]
    rec = console.api().post("/v1/executions", {"agent": "ops", "message": "Say hello in a shell"})
    wait_until(lambda: in_state(rec["id"], "WAITING_APPROVAL"), 120)
    page = console.signed_in()
    page.goto("/ui/approvals")
    card = page.locator(".approval", has=page.locator(f"a[href='/ui/executions/{rec['id']}']"))
    card.wait_for()
    assert card.locator("code").first.inner_text() == "run_command"
    assert '"<b>hello</b>"' in card.locator("pre").inner_text() and card.locator("b").count() == 0
    assert "ops" in card.inner_text() and "waiting" in card.inner_text()
    assert page.locator("#nav-approvals").inner_text() == "1"
    console.shot(page, "approvals-light")
    card.get_by_role("button", name="Allow once").click()
    card.get_by_role("status").wait_for()
    done = wait_until(lambda: in_state(rec["id"], "COMPLETED", "FAILED"), 120)
    assert done["state"] == "COMPLETED" and done["output"] == "It said hello."
    page.get_by_text("Nothing is waiting for your approval.").wait_for(timeout=10_000)
    # the execution's page shows what happened: the call, its result, the answer
    page.goto(f"/ui/executions/{rec['id']}")
    assert page.locator(".tool-call code").first.inner_text() == "run_command"
    assert "<b>hello</b>" in page.locator(".tool-result pre").first.text_content()  # folded
    assert page.locator(".msg.assistant .md").last.inner_text() == "It said hello."
    console.shot(page, "execution-light")
    page.context.close()


def test_an_approval_is_asked_inline_in_chat(console: Console) -> None:
    # its own agent file (the same as the inbox's test): it does not depend on which tests ran before
    _apply(console, "name: ops\ninstructions: You run commands.\ntools:\n  - shell: {approval: required}\n")
    console.fake.script += [tool_call("run_command", argv=["rm", "-rf", "x"]), {"content": "I did not."}]
    page = console.signed_in()
    page.goto("/ui/chat?agent=ops")
    page.get_by_label("Message", exact=True).fill("Remove x")
    page.keyboard.press("Enter")
    card = page.locator(".thread .approval")
    card.wait_for(timeout=60_000)
    assert "rm" in card.locator("pre").inner_text()
    card.get_by_role("button", name="Deny").click()
    page.locator(".turn-foot").first.wait_for(timeout=60_000)
    assert "Denied" in card.inner_text() and "I did not." in page.locator(".turn").first.inner_text()
    page.context.close()


# -- agents and models ----------------------------------------------------------------------------------------
def test_an_agent_is_edited_with_its_error_shown_at_its_line(console: Console) -> None:
    page = console.signed_in()
    page.goto("/ui/agents/new")
    editor = page.get_by_label("Agent file (YAML)")
    editor.fill("name: poet\ninstructions: You write short poems.\ntemperature: 7\n")
    page.get_by_role("button", name="Save").click()
    error = page.get_by_role("alert")
    error.wait_for()
    assert "Line 3:" in error.inner_text() and "temperature" in error.inner_text()
    bad = page.locator(".lines li.bad")
    assert bad.count() == 1 and bad.locator("code").inner_text() == "temperature: 7"
    assert editor.get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "agent-yaml"  # the cursor is on that line
    assert (
        page.evaluate(
            "(() => { const a = document.activeElement; return a.value.slice(a.selectionStart, a.selectionEnd); })()"
        )
        == "temperature: 7"
    )
    console.shot(page, "agent-error-light")
    editor.fill("name: poet\ninstructions: You write short poems.\ntemperature: 0.7\n")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(lambda url: url.endswith("/ui/agents/poet?saved=1"))
    assert console.api().get("/v1/agents/poet")["temperature"] == 0.7
    page.goto("/ui/agents")
    assert page.get_by_role("link", name="poet", exact=True).count() == 1
    page.goto("/ui/agents/poet")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete poet").click()
    page.wait_for_url(lambda url: url.endswith("/ui/agents?removed=poet"))
    assert page.get_by_role("link", name="poet", exact=True).count() == 0
    page.context.close()


def test_the_models_are_listed(console: Console) -> None:
    page = console.signed_in()
    page.goto("/ui/models")
    rows = page.locator("#models tbody tr")
    assert rows.filter(has_text="gpt-4o-mini").filter(has_text="current").count() == 1
    assert rows.filter(has_text="gpt-4o").count() >= 1
    page.context.close()


# -- a page on another localhost port ---------------------------------------------------------------------------
# What a page of another program on this machine (another port: the same *site*, so the SameSite=Strict
# cookie goes along) can send: JSON as text/plain with no-cors (no preflight), and a form whose text/plain
# body is JSON; both would create something if only the cookie were checked.
ATTACK = """<!doctype html><title>Another app on this machine</title>
<form id=f method=post enctype=text/plain action="{origin}/ui/api/agents">
<input name='{{"yaml": "name: pwned", "x": "' value='"}}'></form>
<script>
fetch("{origin}/ui/api/chat", {{method: "POST", mode: "no-cors", credentials: "include",
  headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify({{agent: "default", message: "pwned"}})}})
  .finally(() => document.getElementById("f").submit());
</script>"""


@pytest.fixture
def attacker(console: Console) -> Iterator[str]:
    page = ATTACK.format(origin=console.origin).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *_args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_page_on_another_localhost_port_cannot_change_anything(console: Console, attacker: str) -> None:
    before = len(console.api().get("/v1/executions?limit=500"))
    page = console.signed_in(watched=False)  # the refusals below are errors in this page's console
    page.goto(attacker)
    page.wait_for_url(console.origin + "/ui/api/agents", timeout=15_000)  # the form's post, refused
    assert "Refused: requests from http://127.0.0.1:" in page.content()
    executions = console.api().get("/v1/executions?limit=500")
    assert len(executions) == before and not any(x["message"] == "pwned" for x in executions)
    assert "pwned" not in [a["name"] for a in console.api().get("/v1/agents")]
    # by hand: the session cookie with another origin, or without the page's token, is refused
    page.goto("/")
    csrf = page.locator("meta[name=csrf-token]").get_attribute("content")
    other = attacker.rstrip("/")
    post = page.request.post
    assert post("/ui/api/temporal-ui", headers={"Origin": other, "X-CSRF-Token": csrf}).status == 403
    assert post("/ui/api/temporal-ui", headers={"Origin": console.origin}).status == 403
    assert (
        post("/ui/api/temporal-ui", headers={"Origin": console.origin, "X-CSRF-Token": "x" + csrf}).status
        == 403
    )
    assert post("/ui/api/temporal-ui", headers={"X-CSRF-Token": csrf}).status == 403  # no origin at all
    ok = post("/ui/api/temporal-ui", headers={"Origin": console.origin, "X-CSRF-Token": csrf})
    assert ok.status == 200 and "/_stigmer/signin?t=" in ok.json()["url"]
    page.context.close()


# -- every page: phone width, light and dark, no console errors ----------------------------------------------
def test_every_page_fits_a_phone_in_light_and_dark_without_console_errors(console: Console) -> None:
    if not console.api().get("/v1/sessions"):  # run alone: a session (and execution) of its own for the pages
        console.fake.script += [{"content": "Hello."}]
        made = console.api().post("/v1/executions", {"agent": "default", "message": "Hi", "session": "phone"})
        wait_until(lambda: in_state(made["id"], "COMPLETED", "FAILED"), 120)
    exec_id = console.api().get("/v1/executions?limit=1")[0]["id"]
    pages = {**PAGES, "execution": f"/ui/executions/{exec_id}", "new-agent": "/ui/agents/new"}
    errors: list[str] = []
    for scheme in ("light", "dark"):
        for width, height, label in ((1280, 860, "desktop"), (375, 812, "phone")):
            page = console.context(width=width, height=height, scheme=scheme).new_page()
            watch(page, errors)
            page.goto(console.link())
            for name, path in pages.items():
                page.goto(path)
                page.wait_for_load_state("networkidle")
                if name == "chat":
                    page.goto(f"/ui/chat?session={console.api().get('/v1/sessions')[-1]['name']}")
                    page.locator(".turn").first.wait_for()
                width_used = page.evaluate("document.scrollingElement.scrollWidth")
                if label == "phone":
                    assert width_used <= 375, f"{name} is {width_used} px wide at 375"
                console.shot(page, f"{name}-{label}-{scheme}")
            page.context.close()
    assert errors == [] and console.errors == [], errors + console.errors


# -- a restart: last, as it restarts the module's server -----------------------------------------------------
def test_an_approval_waiting_in_the_inbox_survives_a_server_restart(console: Console) -> None:
    _apply(
        console, "name: night-ops\ninstructions: You run commands.\ntools:\n  - shell: {approval: required}\n"
    )
    console.fake.script += [
        tool_call("run_command", argv=["echo", "still here"]),
        {"content": "It said: still here."},
    ]
    rec = console.api().post("/v1/executions", {"agent": "night-ops", "message": "Echo after a restart"})
    wait_until(lambda: in_state(rec["id"], "WAITING_APPROVAL"), 120)
    before = console.signed_in(watched=False)  # its live parts fail while the server is down: expected
    before.goto("/ui/approvals")
    inbox = f".approval:has(a[href='/ui/executions/{rec['id']}'])"
    before.locator(inbox).wait_for()
    r = run_cli("server", "restart", env=console.env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    # the console's sessions were the old API process's: that page is signed out
    assert before.reload().status == 401
    assert before.locator("h1").inner_text() == "Sign in to the Stigmer console"
    before.context.close()
    # signed in again: the call still waits in the inbox, and is answered from there
    page = console.signed_in()
    page.locator("#nav-approvals", has_text="1").wait_for()  # the count in the navigation bar
    page.goto("/ui/approvals")
    card = page.locator(inbox)
    card.wait_for()
    assert card.locator("code").first.inner_text() == "run_command"
    assert '"still here"' in card.locator("pre").inner_text() and "night-ops" in card.inner_text()
    console.shot(page, "approvals-after-restart-light")
    card.get_by_role("button", name="Allow once").click()
    card.get_by_role("status").wait_for()
    done = wait_until(lambda: in_state(rec["id"], "COMPLETED", "FAILED"), 120)
    assert done["state"] == "COMPLETED" and done["output"] == "It said: still here."
    page.get_by_text("Nothing is waiting for your approval.").wait_for(timeout=10_000)
    page.goto(f"/ui/executions/{rec['id']}")
    assert page.locator("#x-state").inner_text() == "completed"
    assert "still here" in page.locator(".tool-result pre").first.text_content()
    assert page.locator(".msg.assistant .md").last.inner_text() == "It said: still here."
    page.context.close()
    assert console.errors == [], console.errors

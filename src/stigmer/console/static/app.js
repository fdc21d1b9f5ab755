// Stigmer console: the pages' shared helpers and the scripts of every page but Chat (chat.js).
// Everything a model, a tool or a record says is put in the page as text (textContent, text nodes):
// never as HTML.
"use strict";
(() => {
  const S = (window.Stigmer = {});
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const END = new Set(["completed", "failed", "cancelled"]);
  const KINDS = ["pending", "started", "delta", "retry", "tool_call", "tool_result", "approval_required",
    "approval", "notice", "cancelling", "completed", "failed", "cancelled"];

  // -- DOM -------------------------------------------------------------------------------------------
  const el = (S.el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c !== null && c !== undefined && c !== false) node.append(c instanceof Node ? c : String(c));
    }
    return node;
  });
  S.short = (text, n) => (text.length > n ? text.slice(0, n - 1) + "…" : text);
  S.seconds = (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return Math.round(s / 86400) + " d";
  };
  S.ago = (epoch) => (epoch ? S.seconds(Date.now() / 1000 - epoch) + " ago" : "");
  S.badge = (state) => el("span", { class: "badge state-" + String(state || "").toLowerCase() },
    String(state || "unknown").replace(/_/g, " ").toLowerCase());
  S.bytes = (n) => {
    if (!n && n !== 0) return "–";
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  };

  // -- talking to the server ---------------------------------------------------------------------------
  S.request = async (method, url, body) => {
    const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (method !== "GET") init.headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      if (response.status === 401) location.reload(); // signed out: the page says how to sign in
      const error = new Error((data && data.error && data.error.message) || "HTTP " + response.status);
      error.hint = data && data.error && data.error.hint;
      error.detail = (data && data.error) || {};
      throw error;
    }
    return data;
  };
  S.toast = (message, bad) => {
    const t = document.getElementById("toast");
    if (!t) return;
    t.textContent = message;
    t.className = "toast show" + (bad ? " bad" : "");
    clearTimeout(S._toast);
    S._toast = setTimeout(() => { t.className = "toast"; }, bad ? 6000 : 3000);
  };
  // Run `fn` now and every `ms` (not while the tab is hidden; at once when it shows again).
  S.poll = (fn, ms) => {
    let timer = null;
    const run = async () => {
      clearTimeout(timer);
      try { await fn(); } catch (e) { S.toast(e.message, true); }
      timer = setTimeout(() => { if (!document.hidden) run(); }, ms);
    };
    document.addEventListener("visibilitychange", () => { if (!document.hidden) run(); });
    run();
    return run;
  };
  // An execution's events (stored ones first, then live), until it ends.
  S.follow = (execId, onEvent, after) => {
    const source = new EventSource("/ui/api/executions/" + encodeURIComponent(execId) + "/events" +
      (after ? "?after=" + after : ""));
    for (const kind of KINDS) {
      source.addEventListener(kind, (e) => {
        let data = {};
        try { data = JSON.parse(e.data); } catch (_) { data = {}; }
        if (END.has(kind)) source.close();
        onEvent(kind, data);
      });
    }
    // A dropped stream reconnects by itself (from the last event); one the server refuses (signed out by
    // a restart of the API) is closed for good: say so.
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) onEvent("lost", {});
    });
    return source;
  };
  S.END = END;

  // -- markdown, safely: paragraphs, lists, headings, code blocks (with a copy button), inline code and
  // bold; every piece of text a text node ---------------------------------------------------------------
  const inline = (parent, text) => {
    const parts = text.split(/(`[^`\n]+`)/);
    for (const part of parts) {
      if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
        parent.append(el("code", {}, part.slice(1, -1)));
        continue;
      }
      const bold = part.split(/(\*\*[^*\n]+\*\*)/);
      for (const b of bold) {
        if (b.length > 4 && b.startsWith("**") && b.endsWith("**")) parent.append(el("strong", {}, b.slice(2, -2)));
        else if (b) parent.append(b);
      }
    }
  };
  const codeBlock = (code, lang) => {
    const pre = el("pre", {}, el("code", {}, code));
    const copy = el("button", { type: "button", class: "button ghost small copy", "aria-label": "Copy code" }, "Copy");
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(code);
        copy.textContent = "Copied";
        setTimeout(() => { copy.textContent = "Copy"; }, 1500);
      } catch (_) { S.toast("Could not copy: select the text instead.", true); }
    });
    return el("div", { class: "code" }, lang ? el("span", { class: "lang" }, lang) : null, copy, pre);
  };
  S.markdown = (text) => {
    const out = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    let list = null;
    const flush = () => {
      if (para.length) {
        const p = el("p");
        para.forEach((line, i) => { if (i) p.append(el("br")); inline(p, line); });
        out.append(p);
        para = [];
      }
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```+|~~~+)\s*([\w#+.-]*)\s*$/);
      if (fence) {
        flush();
        const body = [];
        let j = i + 1;
        while (j < lines.length && !lines[j].trim().startsWith(fence[1])) body.push(lines[j++]);
        out.append(codeBlock(body.join("\n"), fence[2]));
        i = j;
        continue;
      }
      const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      if (item) {
        if (para.length) flush();
        const ordered = /\d/.test(item[1]);
        if (!list || list.ordered !== ordered) {
          list = { node: el(ordered ? "ol" : "ul"), ordered };
          out.append(list.node);
        }
        const li = el("li");
        inline(li, item[2]);
        list.node.append(li);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (heading) {
        flush();
        const h = el(heading[1].length <= 2 ? "h3" : "h4");
        inline(h, heading[2]);
        out.append(h);
        continue;
      }
      if (!line.trim()) { flush(); continue; }
      list = null;
      para.push(line);
    }
    flush();
    return out;
  };
  S.renderMarkdownIn = (root) => {
    for (const node of root.querySelectorAll(".md")) {
      const text = node.textContent;
      node.replaceChildren(S.markdown(text));
    }
  };

  // -- approvals: asked inline, in the inbox and on an execution's page --------------------------------
  const VERDICT = { allow: "Allowed once", always: "Always allowed", deny: "Denied" };
  S.approvalCard = (execId, callId, tool, args, extra) => el("div",
    { class: "approval", "data-exec": execId, "data-call": callId },
    el("p", {}, "Allow ", el("code", {}, tool), "?", extra || null),
    el("pre", {}, JSON.stringify(args || {}, null, 2)),
    el("div", { class: "actions" },
      el("button", { type: "button", class: "button", "data-verdict": "allow" }, "Allow once"),
      el("button", { type: "button", class: "button ghost", "data-verdict": "always" }, "Always"),
      el("button", { type: "button", class: "button danger", "data-verdict": "deny" }, "Deny")));
  S.markDecided = (card, text) => {
    card.classList.add("decided");
    const actions = card.querySelector(".actions");
    if (actions) actions.replaceChildren(el("span", { class: "muted", role: "status" }, text));
  };
  document.addEventListener("click", async (e) => {
    const button = e.target.closest("[data-verdict]");
    const card = button && button.closest("[data-call]");
    if (!card) return;
    const verdict = button.dataset.verdict;
    for (const b of card.querySelectorAll("[data-verdict]")) b.disabled = true;
    try {
      await S.request("POST", "/ui/api/executions/" + encodeURIComponent(card.dataset.exec) + "/decide",
        { call_id: card.dataset.call, verdict });
      S.markDecided(card, VERDICT[verdict]);
      card.dispatchEvent(new CustomEvent("decided", { bubbles: true }));
    } catch (err) {
      for (const b of card.querySelectorAll("[data-verdict]")) b.disabled = false;
      S.toast(err.message, true);
    }
  });

  // -- one turn of an execution, drawn as its events arrive (chat, an execution's page) ----------------
  S.Turn = class {
    constructor(box, execId) {
      this.box = box;
      this.exec = execId;
      this.seg = null;
      this.text = "";
      this.last = null; // the last answer's node and text, to check against the record at the end
      this.queued = false;
      this.onpaint = null;
    }
    segment() {
      if (!this.seg) {
        this.text = "";
        this.seg = el("div", { class: "text md typing" });
        this.box.append(el("div", { class: "msg assistant" }, el("div", { class: "who" }, "Agent"), this.seg));
      }
      return this.seg;
    }
    paint() {
      if (this.queued) return;
      this.queued = true;
      requestAnimationFrame(() => {
        this.queued = false;
        if (this.seg) this.seg.replaceChildren(S.markdown(this.text));
        if (this.onpaint) this.onpaint();
      });
    }
    close() {
      if (this.seg) {
        this.seg.replaceChildren(S.markdown(this.text));
        this.seg.classList.remove("typing");
        this.last = { node: this.seg, text: this.text };
      }
      this.seg = null;
    }
    note(text) {
      this.box.append(el("p", { class: "note" }, text));
    }
    handle(kind, d) {
      if (kind === "delta") {
        this.segment();
        this.text += d.text || "";
        this.paint();
      } else if (kind === "retry") {
        if (this.seg) { this.text = ""; this.paint(); }
        this.note("The model call is being retried; its answer starts over.");
      } else if (kind === "tool_call") {
        this.close();
        const args = JSON.stringify(d.args || {});
        this.box.append(el("details", { class: "msg tool-call" },
          el("summary", {}, el("span", { class: "kind" }, "tool"),
            el("code", {}, d.name || "tool"), " ", el("span", { class: "args-short" }, S.short(args, 120))),
          el("pre", { class: "text" }, JSON.stringify(d.args || {}, null, 2))));
      } else if (kind === "tool_result") {
        this.close();
        this.box.append(el("details", { class: "msg tool-result" },
          el("summary", {}, el("span", { class: "kind" }, "result"), "of ",
            el("code", {}, d.name || "tool")),
          el("pre", { class: "text" }, String(d.content || ""))));
      } else if (kind === "approval_required") {
        this.close();
        if (!this.box.querySelector('[data-call="' + CSS.escape(String(d.id)) + '"]')) {
          this.box.append(S.approvalCard(this.exec, d.id, d.name, d.args));
        }
      } else if (kind === "approval") {
        const card = this.box.querySelector('[data-call="' + CSS.escape(String(d.id)) + '"]');
        const text = d.approved ? (d.always ? VERDICT.always : VERDICT.allow) : VERDICT.deny;
        if (card && !card.classList.contains("decided")) S.markDecided(card, text);
      } else if (kind === "notice") {
        this.note(d.text || "");
      } else if (kind === "cancelling") {
        this.note("Stopping…");
      } else if (kind === "lost") {
        this.close();
        this.note("Lost the connection to the server: reload the page to follow this turn.");
      } else if (END.has(kind)) {
        this.close();
        this.finish(kind, d.record || {});
      }
      if (this.onpaint) this.onpaint();
    }
    finish(kind, rec) {
      // Never end on less than the record has: an answer the stream missed or got wrong is replaced.
      const output = typeof rec.output === "string" ? rec.output : "";
      if (kind === "completed" && output.trim()) {
        if (!this.last) {
          this.segment();
          this.text = output;
          this.close();
        } else if (this.last.text.trim() !== output.trim()) {
          this.last.node.replaceChildren(S.markdown(output));
          this.last.text = output;
        }
      }
      for (const card of this.box.querySelectorAll(".approval:not(.decided)")) S.markDecided(card, "Closed");
      this.box.append(S.turnFoot(rec, kind));
    }
  };
  S.turnFoot = (rec, kind) => {
    const usage = rec.usage || {};
    const bits = [];
    if (rec.duration !== null && rec.duration !== undefined) bits.push(S.seconds(rec.duration));
    if (usage.input_tokens !== null && usage.input_tokens !== undefined) {
      bits.push(usage.input_tokens + " in / " + usage.output_tokens + " out");
    }
    const state = (rec.state || kind || "").toUpperCase();
    return el("div", { class: "turn-foot" }, S.badge(state), bits.join(" · "),
      rec.error && state !== "COMPLETED" ? el("span", { class: "error-text" }, rec.error) : null,
      rec.id ? el("a", { href: "/ui/executions/" + encodeURIComponent(rec.id) }, "Details") : null);
  };

  // -- pages ---------------------------------------------------------------------------------------------
  const setApprovalCount = (n) => {
    const badge = document.getElementById("nav-approvals");
    if (!badge) return;
    badge.hidden = !n;
    badge.textContent = String(n || "");
    badge.setAttribute("aria-label", n + " waiting");
  };
  const executionRow = (x, columns) => {
    const link = el("a", { href: "/ui/executions/" + encodeURIComponent(x.id), class: "id-link" }, x.id);
    const cells = {
      id: link,
      agent: x.agent,
      state: S.badge(x.state),
      model: x.model || "–",
      session: x.session ? el("a", { href: "/ui/chat?session=" + encodeURIComponent(x.session) },
        x.session + " #" + x.turn) : "–",
      duration: S.seconds(x.duration),
      created: S.ago(x.created),
    };
    return el("tr", {}, columns.map((c) => el("td", {}, cells[c])));
  };
  const emptyRow = (n, text) => el("tr", {}, el("td", { colspan: n, class: "muted" }, text));

  const pages = {};
  pages.overview = () => {
    const dl = (node, pairs) => node.replaceChildren(...pairs.filter((p) => p).flatMap(([k, v]) =>
      [el("dt", {}, k), el("dd", {}, v)]));
    S.poll(async () => {
      const d = await S.request("GET", "/ui/api/overview");
      const summary = document.getElementById("ov-summary");
      summary.textContent = d.running
        ? "The Stigmer server is running" + (d.uptime !== null ? " · up " + S.seconds(d.uptime) : "") +
          (d.pid ? " · PID " + d.pid : "")
        : d.unsupervised ? "Services are running, but not supervised: the daemon is not running."
          : "The Stigmer server is not running.";
      const rows = [];
      for (const s of d.services) {
        rows.push(el("tr", {}, el("th", { scope: "row" }, s.name), el("td", {}, S.badge(s.state)),
          el("td", {}, S.seconds(s.uptime)), el("td", {}, String(s.restarts || 0)),
          el("td", {}, s.address || (s.pid ? "PID " + s.pid : "–"))));
        if (s.last_failure && (s.restarts || s.state === "failed")) {
          rows.push(el("tr", {}, el("td", { colspan: 5, class: "error-text small" }, "Last failure: " + s.last_failure)));
        }
      }
      document.getElementById("ov-services").replaceChildren(...(rows.length ? rows : [emptyRow(5, "No services.")]));
      const llm = d.llm || {};
      dl(document.getElementById("ov-llm"), [
        ["Provider", llm.label || llm.provider || "–"],
        ["Model", el("span", { class: "model-name" }, llm.model || "–")],
        ["State", S.badge(llm.running ? "running" : "stopped")],
        ["Runs on", { gpu: "GPU", partial: "GPU and CPU", cpu: "CPU" }[llm.runs_on] ||
          (llm.remote ? "the endpoint's machine" : "unknown")],
        ["Context", llm.context ? llm.context + " tokens" : "–"],
        ["Fit", llm.remote ? (llm.model_available ? "served by the endpoint" : "not listed by the endpoint")
          : { gpu: "all on the GPU", partial: "split between the GPU and the CPU (slower)", cpu: "on the CPU" }[llm.runs_on] ||
            (llm.model_available ? "downloaded" : "not downloaded yet")],
        llm.expected_tokens_per_second ? ["Speed", "~" + Math.round(llm.expected_tokens_per_second) + " tokens/s (estimate)"] : null,
        llm.base_url ? ["Address", llm.base_url] : null,
        ...(llm.notes || []).map((n) => ["Note", n]),
      ]);
      const t = d.temporal || {};
      dl(document.getElementById("ov-temporal"), [
        ["Address", t.address || "–"],
        ["Managed", t.managed ? "by Stigmer" : "external"],
        ["Namespace", t.namespace || "–"],
      ]);
      document.getElementById("ov-temporal-ui").hidden = !d.temporal_ui;
      document.getElementById("ov-temporal-note").hidden = !d.temporal_ui;
      const approvals = document.getElementById("ov-approvals");
      approvals.textContent = String(d.approvals);
      approvals.setAttribute("aria-label", d.approvals + " tool calls waiting for approval");
      setApprovalCount(d.approvals);
      const cols = ["id", "agent", "state", "duration", "created"];
      document.getElementById("ov-executions").replaceChildren(...(d.executions.length
        ? d.executions.map((x) => executionRow(x, cols)) : [emptyRow(5, "No executions yet: start one in Chat.")]));
    }, 3000);
    document.getElementById("ov-temporal-ui").addEventListener("click", async () => {
      try {
        const link = await S.request("POST", "/ui/api/temporal-ui");
        const opened = window.open(link.url, "_blank", "noopener");
        const note = document.getElementById("ov-temporal-note");
        note.replaceChildren(opened ? "Opened in a new tab. " : "",
          el("a", { href: link.url, target: "_blank", rel: "noopener" }, "Sign-in link"),
          " (works once, within " + link.expires_in + " s).");
      } catch (e) { S.toast(e.message, true); }
    });
  };

  pages.executions = () => {
    const form = document.getElementById("ex-filters");
    const state = document.getElementById("ex-state");
    const agent = document.getElementById("ex-agent");
    const cols = ["id", "agent", "state", "model", "session", "duration", "created"];
    const refresh = S.poll(async () => {
      const q = new URLSearchParams();
      if (state.value) q.set("state", state.value);
      if (agent.value) q.set("agent", agent.value);
      const list = await S.request("GET", "/ui/api/executions?" + q);
      document.getElementById("ex-rows").replaceChildren(...(list.length ? list.map((x) => executionRow(x, cols))
        : [emptyRow(cols.length, "No executions" + (state.value || agent.value ? " match these filters." : " yet."))]));
    }, 3000);
    form.addEventListener("change", () => {
      const q = new URLSearchParams(new FormData(form));
      for (const [k, v] of [...q]) if (!v) q.delete(k);
      history.replaceState(null, "", "/ui/executions" + (q.toString() ? "?" + q : ""));
      refresh();
    });
  };

  pages.execution = () => {
    S.renderMarkdownIn(document.querySelector(".thread"));
    const cancel = document.getElementById("x-cancel");
    if (cancel) {
      cancel.addEventListener("click", async () => {
        cancel.disabled = true;
        try {
          await S.request("POST", "/ui/api/executions/" + encodeURIComponent(cancel.dataset.id) + "/cancel");
          S.toast("Cancelling…");
        } catch (e) { cancel.disabled = false; S.toast(e.message, true); }
      });
    }
    const live = document.getElementById("x-live");
    if (!live) return;
    const turn = new S.Turn(live, live.dataset.id);
    const stateBadge = document.getElementById("x-state");
    S.follow(live.dataset.id, (kind, data) => {
      if (kind === "approval_required") {
        // asked in the card above, not twice
        document.getElementById("x-approvals-card").hidden = false;
        const list = document.getElementById("x-approvals");
        if (!list.querySelector('[data-call="' + CSS.escape(String(data.id)) + '"]')) {
          list.append(el("li", {}, S.approvalCard(live.dataset.id, data.id, data.name, data.args)));
        }
        stateBadge.replaceWith(Object.assign(S.badge("WAITING_APPROVAL"), { id: "x-state" }));
        return;
      }
      turn.handle(kind, data);
      if (kind === "started") stateBadge.replaceWith(Object.assign(S.badge("IN_PROGRESS"), { id: "x-state" }));
      if (S.END.has(kind)) setTimeout(() => location.reload(), 600); // the final record, drawn by the server
    });
  };

  pages.approvals = () => {
    const box = document.getElementById("inbox");
    const decided = new Set();
    const refresh = S.poll(async () => {
      const list = (await S.request("GET", "/ui/api/approvals")).filter((a) => !decided.has(a.execution_id + "/" + a.call_id));
      setApprovalCount(list.length);
      const present = new Set(list.map((a) => a.execution_id + "/" + a.call_id));
      for (const card of box.querySelectorAll(".approval:not(.decided)")) {
        if (!present.has(card.dataset.exec + "/" + card.dataset.call)) card.remove();
      }
      for (const a of list) {
        const key = a.execution_id + "/" + a.call_id;
        const existing = [...box.querySelectorAll(".approval")].find((c) => c.dataset.exec + "/" + c.dataset.call === key);
        const waited = el("span", { class: "waited" }, "waiting " + S.seconds(a.waited));
        if (existing) { existing.querySelector(".waited").replaceWith(waited); continue; }
        const meta = el("p", { class: "meta" },
          el("span", {}, "Agent ", el("strong", {}, a.agent)),
          el("span", {}, "Execution ", el("a", { href: "/ui/executions/" + encodeURIComponent(a.execution_id) }, a.execution_id)),
          a.session ? el("span", {}, "Session ", el("a", { href: "/ui/chat?session=" + encodeURIComponent(a.session) }, a.session)) : null,
          waited);
        box.append(S.approvalCard(a.execution_id, a.call_id, a.tool, a.args, meta));
      }
      const empty = box.querySelector(".empty-note");
      if (!box.querySelector(".approval")) {
        if (!empty) box.replaceChildren(el("p", { class: "muted empty-note" }, "Nothing is waiting for your approval."));
      } else if (empty) empty.remove();
      const loading = box.querySelector(":scope > p.muted:not(.empty-note)");
      if (loading) loading.remove();
    }, 3000);
    box.addEventListener("decided", (e) => {
      const card = e.target;
      decided.add(card.dataset.exec + "/" + card.dataset.call);
      setTimeout(() => { card.remove(); refresh(); }, 1500);
    });
  };

  pages.agent = () => {
    const form = document.getElementById("agent-form");
    const area = document.getElementById("agent-yaml");
    const box = document.getElementById("agent-error");
    const selectLine = (line) => {
      const lines = area.value.split("\n");
      const start = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
      area.focus();
      area.setSelectionRange(start, start + (lines[line - 1] || "").length);
    };
    const showError = (error) => {
      const line = Number(error.line || 0);
      const lines = area.value.split("\n");
      box.replaceChildren(el("p", {}, line ? el("strong", {}, "Line " + line + ": ") : null, error.message || "Not saved."),
        error.hint ? el("p", { class: "muted" }, error.hint) : null,
        line ? el("ol", { class: "lines", "aria-label": "The agent file, line by line" }, lines.map((text, i) =>
          el("li", i + 1 === line ? { class: "bad", "aria-current": "true" } : {},
            el("span", { class: "ln", "aria-hidden": "true" }, String(i + 1)), el("code", {}, text)))) : null);
      box.hidden = false;
      area.setAttribute("aria-invalid", "true");
      area.setAttribute("aria-describedby", "agent-error");
      const bad = box.querySelector("li.bad");
      if (bad) bad.scrollIntoView({ block: "nearest" });
      if (line) selectLine(line);
    };
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const save = form.querySelector('button[type="submit"]');
      save.disabled = true;
      try {
        const done = await S.request("POST", "/ui/api/agents", { yaml: area.value });
        if (done.saved) {
          location.assign("/ui/agents/" + encodeURIComponent(done.name) + "?saved=1");
          return;
        }
        save.disabled = false;
        showError(done.error);
      } catch (err) {
        save.disabled = false;
        showError({ ...err.detail, message: err.message });
      }
    });
    area.addEventListener("input", () => area.removeAttribute("aria-invalid"));
    area.addEventListener("keydown", (e) => {
      if (e.key === "Tab" && !e.shiftKey && !e.ctrlKey && !e.metaKey && !e.altKey) {
        // two spaces, as YAML wants; Escape then Tab leaves the text area
        if (area.dataset.escaped) { delete area.dataset.escaped; return; }
        e.preventDefault();
        area.setRangeText("  ", area.selectionStart, area.selectionEnd, "end");
      } else if (e.key === "Escape") {
        area.dataset.escaped = "1";
      } else if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
        form.requestSubmit();
      }
    });
    const remove = document.getElementById("agent-delete");
    if (remove) {
      remove.addEventListener("click", async () => {
        const name = remove.dataset.name;
        if (!window.confirm("Remove the agent " + name + "? Its executions and sessions stay.")) return;
        try {
          await S.request("DELETE", "/ui/api/agents/" + encodeURIComponent(name));
          location.assign("/ui/agents?removed=" + encodeURIComponent(name));
        } catch (err) { S.toast(err.message, true); }
      });
    }
  };

  pages.models = () => {
    const form = document.getElementById("pull-form");
    const needsCard = document.getElementById("needs-card");
    const showNeeds = async (model) => {
      if (!needsCard) return;
      const box = document.getElementById("needs");
      document.getElementById("needs-model").textContent = model || "the configured model";
      needsCard.hidden = false;
      box.replaceChildren(el("dt", {}, "Reading"), el("dd", {}, "the model's header…"));
      try {
        const a = await S.request("GET", "/ui/api/models/needs" + (model ? "?model=" + encodeURIComponent(model) : ""));
        const e = a.estimate;
        const fits = { gpu: "yes, on the GPU", partial: "yes, split between the GPU and the CPU (slower)",
          cpu: "yes, on the CPU", does_not_fit: "no: it does not fit" };
        const pairs = [
          ["Model", a.model],
          [a.downloaded ? "File" : "From", a.origin],
          [a.downloaded ? "Size" : "Download", S.bytes(a.downloaded ? a.file_size : a.download_size)],
          ["Architecture", a.architecture], ["Quantization", a.quantization],
          ["Parameters", (a.parameters / 1e9).toFixed(2) + " B"],
          ["Context", a.context.size + " tokens" + (a.context.note ? " (" + a.context.note + ")" : "")],
          ["Memory", S.bytes(e.total) + " (weights " + S.bytes(e.weights) + ", KV cache " + S.bytes(e.kv_cache) +
            ", overhead " + S.bytes(e.overhead) + ")"],
          ["Fits", (fits[a.fit.kind] || a.fit.kind) + ". " + a.fit.reason],
        ];
        if (!a.downloaded) pairs.push(["Disk", (a.fit.disk_ok ? "ok" : "not enough") + (a.fit.disk_reason ? ": " + a.fit.disk_reason : "")]);
        box.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { class: "wrap" }, String(v))]));
      } catch (err) {
        box.replaceChildren(el("dt", {}, "Could not tell"), el("dd", { class: "error-text" }, err.message));
      }
    };
    for (const b of document.querySelectorAll("[data-needs]")) b.addEventListener("click", () => showNeeds(b.dataset.needs));
    for (const b of document.querySelectorAll("[data-remove]")) {
      b.addEventListener("click", async () => {
        const model = b.dataset.remove;
        if (!window.confirm("Remove the model " + model + " from this machine?")) return;
        b.disabled = true;
        try {
          await S.request("POST", "/ui/api/models/remove", { model });
          location.assign("/ui/models?removed=" + encodeURIComponent(model));
        } catch (err) { b.disabled = false; S.toast(err.message, true); }
      });
    }
    if (!form) return;
    document.getElementById("needs-button").addEventListener("click", () => showNeeds(form.model.value.trim()));
    const progress = document.getElementById("pull-progress");
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const submit = form.querySelector('button[type="submit"]');
      submit.disabled = true;
      try {
        const job = await S.request("POST", "/ui/api/models/pull", { model: form.model.value.trim(), force: form.force.checked });
        const source = new EventSource("/ui/api/models/pulls/" + encodeURIComponent(job.id));
        const draw = (snap) => {
          const items = snap.messages.slice(-4).map((m) => el("p", { class: "small muted" }, m));
          for (const bar of snap.bars) {
            const pct = bar.total ? Math.floor((100 * bar.done) / bar.total) : 0;
            items.push(el("label", { class: "small" }, bar.message + " · " + S.bytes(bar.done) + " of " + S.bytes(bar.total) + " (" + pct + " %)",
              el("progress", { max: String(bar.total), value: String(bar.done) })));
          }
          progress.replaceChildren(el("p", {}, "Pulling ", el("strong", {}, snap.model), "…"), ...items);
        };
        source.addEventListener("progress", (m) => draw(JSON.parse(m.data)));
        source.addEventListener("end", (m) => {
          source.close();
          submit.disabled = false;
          const snap = JSON.parse(m.data);
          if (snap.state === "done") {
            progress.replaceChildren(el("p", { class: "notice" }, "Model " + snap.model + " is ready."));
            setTimeout(() => location.reload(), 1200);
          } else {
            const err = snap.error || {};
            progress.replaceChildren(el("div", { class: "error-box", role: "alert" }, el("p", {}, err.message || "The pull failed."),
              err.hint ? el("p", { class: "muted" }, err.hint) : null));
          }
        });
      } catch (err) {
        submit.disabled = false;
        progress.replaceChildren(el("div", { class: "error-box", role: "alert" }, el("p", {}, err.message),
          err.hint ? el("p", { class: "muted" }, err.hint) : null));
      }
    });
  };

  S.pages = pages;
  const start = () => {
    const page = document.body.dataset.page;
    if (pages[page]) pages[page]();
  };
  // After every deferred script (a page's own, as chat.js) has registered itself.
  if (document.readyState === "complete") start();
  else document.addEventListener("DOMContentLoaded", start);
})();

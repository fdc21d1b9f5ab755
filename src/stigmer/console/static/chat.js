// Stigmer console: Chat. Each message is a turn of a session (an execution), its answer streamed from
// the execution's events; sessions are listed, continued, started and forked here.
"use strict";
(() => {
  const S = window.Stigmer;
  const el = S.el;

  S.pages.chat = () => {
    const thread = document.getElementById("chat-thread");
    const input = document.getElementById("chat-input");
    const form = document.getElementById("chat-form");
    const send = document.getElementById("chat-send");
    const stop = document.getElementById("chat-stop");
    const agent = document.getElementById("chat-agent");
    const list = document.getElementById("chat-sessions");
    const title = document.getElementById("chat-title");
    const meta = document.getElementById("chat-meta");
    let session = null; // the session's name, or null for a new chat (named by the server at its first turn)
    let running = null; // the execution id of the turn being answered
    let source = null;

    const nearBottom = () => thread.scrollHeight - thread.scrollTop - thread.clientHeight < 120;
    const toBottom = () => { thread.scrollTop = thread.scrollHeight; };
    const setUrl = () => {
      const q = new URLSearchParams();
      if (session) q.set("session", session);
      else if (agent.value) q.set("agent", agent.value);
      history.replaceState(null, "", "/ui/chat" + (q.toString() ? "?" + q : ""));
    };
    const setBusy = (execId) => {
      running = execId;
      stop.hidden = !execId;
      send.disabled = Boolean(execId);
      thread.setAttribute("aria-busy", execId ? "true" : "false");
    };

    // -- the session list ------------------------------------------------------------------------------
    const loadSessions = async () => {
      const sessions = await S.request("GET", "/ui/api/sessions");
      list.replaceChildren(...sessions.map((s) => el("li", {}, el("button", {
        type: "button", "data-session": s.name, "aria-current": s.name === session ? "true" : null,
        onclick: () => open(s.name),
      }, el("span", { class: "s-name" }, s.name),
      el("span", { class: "s-meta" }, s.agent + " · " + s.turns + (s.turns === 1 ? " turn" : " turns") + " · " + S.ago(s.updated))))));
      if (!sessions.length) list.replaceChildren(el("li", { class: "muted small" }, "No sessions yet."));
    };

    // -- drawing turns ---------------------------------------------------------------------------------
    const userBubble = (text) => el("div", { class: "msg user" }, el("div", { class: "who" }, "You"),
      el("div", { class: "text" }, text));
    const drawMessages = (box, messages) => {
      const turn = new S.Turn(box, "");
      for (const m of messages) {
        if (m.role === "user") continue; // drawn from the turn's message
        if (m.role === "tool") {
          turn.handle("tool_result", { name: (m.data || {}).tool, content: m.content });
        } else if (m.role === "assistant") {
          if (m.content) {
            turn.segment();
            turn.text = m.content;
            turn.close();
          }
          for (const call of (m.data || {}).tool_calls || []) turn.handle("tool_call", { id: call.id, name: call.tool, args: call.args });
        }
      }
      return turn;
    };
    const forkButton = (turnNumber) => el("button", {
      type: "button", class: "button ghost", "aria-label": "Fork the conversation from turn " + turnNumber,
      onclick: async () => {
        try {
          const made = await S.request("POST", "/ui/api/sessions/" + encodeURIComponent(session) + "/fork", { at: turnNumber });
          S.toast("Forked into " + made.name);
          await open(made.name);
        } catch (e) { S.toast(e.message, true); }
      },
    }, "Fork from here");
    const follow = (box, execId, turnNumber, onEnd) => {
      const turn = new S.Turn(box, execId);
      turn.onpaint = () => { if (nearBottom()) toBottom(); };
      setBusy(execId);
      source = S.follow(execId, (kind, data) => {
        turn.handle(kind, data);
        if (kind === "lost") {
          source = null;
          setBusy(null);
        }
        if (S.END.has(kind)) {
          source = null;
          setBusy(null);
          if (turnNumber || (data.record && data.record.turn)) {
            box.querySelector(".turn-foot").append(forkButton(turnNumber || data.record.turn));
          }
          if (onEnd) onEnd(data.record || {});
        }
      });
    };

    // -- opening a session -----------------------------------------------------------------------------
    const reset = () => {
      if (source) { source.close(); source = null; }
      setBusy(null);
      thread.replaceChildren();
    };
    const open = async (name) => {
      let data;
      try {
        data = await S.request("GET", "/ui/api/sessions/" + encodeURIComponent(name));
      } catch (e) { S.toast(e.message, true); return; }
      reset();
      session = name;
      title.textContent = name;
      meta.textContent = "with " + data.agent + " · " + data.turn_count + (data.turn_count === 1 ? " turn" : " turns") +
        (data.forked_from ? " · forked from " + data.forked_from + " at turn " + data.forked_at : "");
      if (![...agent.options].some((o) => o.value === data.agent)) agent.append(el("option", { value: data.agent }, data.agent));
      agent.value = data.agent;
      agent.disabled = true; // a session keeps its agent
      for (const t of data.turns) {
        const box = el("div", { class: "turn", "data-turn": t.turn });
        box.append(userBubble(t.message));
        thread.append(box);
        if (!S.END.has(t.state.toLowerCase())) {
          follow(box, t.execution_id, t.turn); // still running: its events, from the start
          continue;
        }
        drawMessages(box, t.messages).finish(t.state.toLowerCase(),
          { ...t, id: t.execution_id, state: t.state });
        box.querySelector(".turn-foot").append(forkButton(t.turn));
      }
      if (!data.turns.length) thread.append(el("p", { class: "empty muted" }, "No turns yet."));
      setUrl();
      await loadSessions();
      if (window.matchMedia("(max-width: 760px)").matches) document.getElementById("sessions-box").open = false;
      toBottom();
      input.focus();
    };
    const startNew = () => {
      reset();
      session = null;
      agent.disabled = false;
      title.textContent = "New chat";
      meta.textContent = "";
      thread.append(el("p", { class: "empty muted" }, "Ask " + agent.value + " something. Enter sends; Shift+Enter starts a new line."));
      setUrl();
      loadSessions();
      input.focus();
    };

    // -- sending ---------------------------------------------------------------------------------------
    const submit = async () => {
      const text = input.value;
      if (!text.trim() || running) return;
      send.disabled = true;
      const body = { message: text };
      if (session) body.session = session;
      else body.agent = agent.value;
      let rec;
      try {
        rec = await S.request("POST", "/ui/api/chat", body);
      } catch (e) {
        send.disabled = false;
        S.toast(e.message, true);
        return;
      }
      input.value = "";
      for (const empty of thread.querySelectorAll(".empty")) empty.remove();
      const box = el("div", { class: "turn", "data-turn": rec.turn });
      box.append(userBubble(text));
      thread.append(box);
      toBottom();
      if (!session) {
        session = rec.session;
        title.textContent = session;
        agent.disabled = true;
        setUrl();
      }
      meta.textContent = "with " + rec.agent + " · turn " + rec.turn;
      loadSessions();
      follow(box, rec.id, rec.turn, () => { loadSessions(); input.focus(); });
    };
    form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        submit();
      }
    });
    stop.addEventListener("click", async () => {
      if (!running) return;
      stop.disabled = true;
      try {
        await S.request("POST", "/ui/api/executions/" + encodeURIComponent(running) + "/cancel");
      } catch (e) { S.toast(e.message, true); }
      stop.disabled = false;
    });
    document.getElementById("chat-new").addEventListener("click", startNew);
    agent.addEventListener("change", () => { if (!session) startNew(); });

    const q = new URLSearchParams(location.search);
    if (q.get("session")) open(q.get("session"));
    else startNew();
  };
})();

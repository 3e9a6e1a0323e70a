// The reference chat page: one answer streams at a time; Stop (or Escape) stops it.
import { historyFor, startChat } from "./client.js";

const list = document.getElementById("messages");
const form = document.getElementById("composer");
const input = document.getElementById("message");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const demo = document.getElementById("demo");
const demoText = document.getElementById("demo-text");
const picker = document.getElementById("model-picker");
const modelSelect = document.getElementById("model");

const entries = []; // what the next request's history is built from
let current = null; // the chat streaming now

const TIMEOUTS = {
  first_token: "the provider did not start answering in time",
  idle: "the provider went quiet for too long",
  total: "the answer reached its time limit",
};

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function describe(state) {
  const delivered = `${plural(state.tokens, "token")} delivered.`;
  if (state.status === "stopped") {
    if (state.reason === "user") return `AI response stopped by user. ${delivered}`;
    if (state.reason === "cancel") return `AI response stopped by a cancel request. ${delivered}`;
    if (state.reason === "timeout") {
      return `AI response stopped: ${TIMEOUTS[state.detail] ?? "it timed out"}. ${delivered}`;
    }
    if (state.reason === "shutdown") {
      return `AI response stopped: the server is restarting. ${delivered} Try again in a moment.`;
    }
    return `AI response stopped. ${delivered}`;
  }
  if (state.status === "error") {
    return `Something went wrong: ${state.message}${state.detail ? ` (${state.detail})` : ""}`;
  }
  if (state.refusal) return "The model declined to answer.";
  return "";
}

function addMessage(role, text) {
  const el = document.createElement("article");
  el.className = `msg ${role}`;
  el.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.append(body);
  list.append(el);
  el.scrollIntoView({ block: "end" });
  return { el, body };
}

// The model's thinking, in a block of its own before the answer: open while it
// streams, folded once the answer ends, and kept on Stop. Made at the first delta.
function thinkingBlock(view) {
  if (!view.thinking) {
    const block = document.createElement("details");
    block.className = "thinking";
    block.open = true;
    block.innerHTML = "<summary>Thinking</summary><div class=\"reasoning\"></div>";
    view.el.insertBefore(block, view.body);
    view.thinking = block;
  }
  return view.thinking.querySelector(".reasoning");
}

// A refusal (the model declines; OpenAI's structured outputs) is not the answer's
// text: it gets a block of its own, marked as a refusal.
function refusalBlock(view) {
  if (!view.refusal) {
    view.refusal = document.createElement("p");
    view.refusal.className = "refusal";
    view.refusal.setAttribute("aria-label", "Refusal");
    view.el.insertBefore(view.refusal, view.body.nextSibling);
  }
  return view.refusal;
}

// Tool calls as the model writes them: one line per call, name(arguments).
function showToolCalls(view, calls) {
  if (!view.tools) {
    view.tools = document.createElement("pre");
    view.tools.className = "tool-calls";
    view.el.insertBefore(view.tools, view.body.nextSibling);
  }
  view.tools.textContent = calls.map((c) => `${c.name ?? "tool"}(${c.arguments})`).join("\n");
}

function setStreaming(streaming) {
  stopButton.disabled = !streaming;
  sendButton.disabled = streaming;
}

async function showDemo(sessionId) {
  // Demo mode only: what the built-in simulator did for this answer.
  const response = await fetch(`/api/demo/provider/${encodeURIComponent(sessionId)}`).catch(() => null);
  if (!response?.ok) return;
  const p = await response.json();
  const how = p.outcome === "closed_by_client" ? "stopped by the gateway" : p.outcome;
  demoText.textContent = `Simulated provider: generated ${p.generated} of ${p.planned} tokens, ${how}.`;
  demo.hidden = false;
}

// While the client resumes a dropped stream (docs/resume.md); gone at the next delta.
function showReconnecting(view, on) {
  let note = view.el.querySelector(".reconnecting");
  if (on && note === null) {
    note = document.createElement("span");
    note.className = "reconnecting";
    note.setAttribute("role", "status");
    note.textContent = "Reconnecting…";
    view.el.append(note);
  } else if (!on && note !== null) {
    note.remove();
  }
}

async function send(text) {
  if (current !== null) return;
  entries.push({ role: "user", content: text });
  addMessage("user", text);
  const entry = { role: "assistant", content: "", status: "streaming" };
  const history = historyFor(entries);
  entries.push(entry);
  const view = addMessage("assistant", "");
  view.el.setAttribute("aria-busy", "true");
  const calls = [];
  const chat = startChat({
    messages: history,
    model: modelSelect.value || undefined,
    onReasoning: (delta) => {
      showReconnecting(view, false);
      thinkingBlock(view).textContent += delta;
      view.el.scrollIntoView({ block: "end" });
    },
    onReconnect: () => showReconnecting(view, true),
    onRefusal: (delta) => {
      showReconnecting(view, false);
      refusalBlock(view).textContent += delta;
      view.el.scrollIntoView({ block: "end" });
    },
    onToken: (delta) => {
      showReconnecting(view, false);
      view.body.textContent += delta;
      view.el.scrollIntoView({ block: "end" });
    },
    onToolCall: (part) => {
      const call = (calls[part.index] ??= { name: null, arguments: "" });
      if (part.name && call.name === null) call.name = part.name;
      call.arguments += part.arguments ?? "";
      showToolCalls(view, calls.filter(Boolean));
    },
  });
  const details = document.createElement("details");
  details.innerHTML = "<summary>Details</summary>Session id: <code></code>";
  details.querySelector("code").textContent = chat.sessionId;
  view.el.dataset.sessionId = chat.sessionId;
  current = chat;
  setStreaming(true);

  const state = await chat.done;
  showReconnecting(view, false);
  entry.content = state.text;
  entry.status = state.status;
  entry.reasoning = state.reasoning;
  entry.refusal = state.refusal;
  view.body.textContent = state.text;
  if (state.refusal) refusalBlock(view).textContent = state.refusal;
  if (state.reasoning) {
    thinkingBlock(view).textContent = state.reasoning;
    if (state.status === "completed") view.thinking.open = false;
  }
  view.el.removeAttribute("aria-busy");
  view.el.classList.add(state.status);
  view.el.dataset.status = state.status;
  const note = describe(state);
  if (note) {
    const status = document.createElement("span");
    status.className = "status";
    status.textContent = note;
    view.el.append(status);
  }
  if (state.provider) {
    // Who served it, when the gateway routes between providers (docs/routing.md).
    const served = document.createElement("span");
    served.className = "served-by";
    served.textContent = ` Served by ${state.provider}` + (state.providerModel ? ` (${state.providerModel}).` : ".");
    details.append(served);
    view.el.dataset.provider = state.provider;
  }
  view.el.append(details);
  if (current === chat) {
    current = null;
    setStreaming(false);
  }
  // A server that is shutting down has no panel to show.
  if (state.reason !== "shutdown") showDemo(chat.sessionId);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || current !== null) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

stopButton.addEventListener("click", () => current?.stop());

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && current !== null) {
    event.preventDefault();
    current.stop();
  }
});

// Leaving or reloading mid-answer: the browser drops the fetch, and the cancel call
// (sent with keepalive) reaches the gateway even if a proxy keeps the stream open.
window.addEventListener("pagehide", () => current?.stop());

// The models the gateway serves (its routes' names, docs/routing.md): a picker when
// there is a choice. Without one, or when the list needs a key, requests name none.
async function loadModels() {
  const response = await fetch("/v1/models").catch(() => null);
  if (!response?.ok) return;
  const ids = ((await response.json()).data ?? []).map((m) => m.id).filter((id) => typeof id === "string");
  if (ids.length < 2) return;
  for (const id of ids) modelSelect.append(new Option(id, id));
  picker.hidden = false;
}

loadModels();
input.focus();

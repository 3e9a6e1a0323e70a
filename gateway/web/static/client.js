// The client half of the gateway's Stop protocol: a dependency-free ES module.
// Documented in docs/client.md; tested by tests/js/client.test.mjs (node --test)
// and by the browser tests in tests/test_page.py.

/** A fresh session id, `session_<ms>_<random>`, one per request. */
export function newSessionId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  const random = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `session_${Date.now()}_${random}`;
}

/**
 * An incremental Server-Sent Events parser (the WHATWG rules): lines end with CRLF,
 * LF or CR, also when split across chunks; `data:` lines join with "\n"; comments
 * and unknown fields are skipped; an event is dispatched at a blank line, and only
 * if it had data.
 */
export class SSEParser {
  constructor() {
    this.lastEventId = "";
    this._buffer = "";
    this._data = [];
    this._event = "";
    this._skipLF = false; // the previous chunk ended with CR: a leading LF is its pair
  }

  /** Feed decoded text; returns the events it completed, as `{event, data, id}`. */
  feed(text) {
    const events = [];
    if (text === "") return events;
    let start = 0;
    if (this._skipLF && text.startsWith("\n")) start = 1;
    this._skipLF = false;
    let carry = this._buffer;
    for (let i = start; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this._line(carry + text.slice(start, i), events);
      carry = "";
      if (c === 13) {
        if (i + 1 === text.length) this._skipLF = true;
        else if (text.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this._buffer = carry + text.slice(start);
    return events;
  }

  _line(line, events) {
    if (line === "") {
      if (this._data.length > 0) {
        events.push({
          event: this._event || "message",
          data: this._data.join("\n"),
          id: this.lastEventId,
        });
      }
      this._data = [];
      this._event = "";
      return;
    }
    if (line.charCodeAt(0) === 58) return; // ":" starts a comment, e.g. ": ping"
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (field === "data") this._data.push(value);
    else if (field === "event") this._event = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
  }
}

/**
 * The history to send with the next request: every user and system message, and
 * only the assistant answers that completed. A stopped or failed answer is left out,
 * so a half-written reply never becomes context.
 * Entries are `{role, content, status?, reasoning?, refusal?}`; `status` matters for
 * assistant entries. An answer's reasoning is left out too, unless `{reasoning: true}`
 * (DeepSeek wants it back as `reasoning_content` within a tool-call loop, and only
 * there). An answer that was only a refusal goes back as OpenAI's refusal part.
 */
export function historyFor(entries, { reasoning = false } = {}) {
  return entries
    .filter((m) => m.role !== "assistant" || m.status === "completed")
    .map((m) => {
      const refused = m.role === "assistant" && !m.content && m.refusal;
      const content = refused ? [{ type: "refusal", refusal: m.refusal }] : m.content;
      return reasoning && m.role === "assistant" && m.reasoning
        ? { role: m.role, content, reasoning_content: m.reasoning }
        : { role: m.role, content };
    });
}

// Who served the answer, when the gateway routes between providers (docs/routing.md).
function servedBy(data, state) {
  if ("provider" in data) {
    state.provider = data.provider;
    state.providerModel = data.provider_model ?? null;
  }
  return state;
}

/**
 * Start one streamed answer.
 *
 * `startChat({messages, onToken, onReasoning, onRefusal, onToolCall, onContentPart, onExtra,
 * onEvent, onReconnect, baseUrl, model, body, headers, sessionId, fetch, resume})` (`headers`:
 * extra ones for every call, e.g. `Authorization`; `body`: extra request fields, e.g. `tools`)
 * returns `{sessionId, stop(), done, state}` at once. `onReasoning(delta)` gets the model's
 * thinking, `onRefusal(delta)` the text of a refusal (the model declines; OpenAI's structured
 * outputs), `onToolCall({index, id?, name?, arguments})` each tool-call fragment,
 * `onContentPart(part)` a content part of a type the gateway does not know, `onExtra(extras)`
 * what the provider added beyond the answer (`{chunk?, choice?, delta?}`: Perplexity's
 * `citations`, Groq's `x_groq`, ...), each time it changes.
 * `done` resolves (never rejects) with the final state, one of:
 *   {status: "completed", text, tokens, finishReason, usage}
 *   {status: "stopped", reason, detail?, text, tokens}   reason: "user" (stop() was
 *        called), "cancel" (cancelled elsewhere), "timeout" (detail: first_token, idle,
 *        total), "shutdown", "superseded" (the answer was resumed elsewhere, e.g.
 *        another tab)
 *   {status: "error", code, message, detail?, text, tokens}   detail: the provider's own
 *        reason for a failed generation, e.g. "MALFORMED_FUNCTION_CALL"
 * With the gateway's routes (docs/routing.md), each also has `provider` and `providerModel`:
 * who served the answer (null if none did).
 * And, on each, `reasoning` (the thinking's text), `refusal` (the refusal's text, "" if
 * none), `toolCalls` (`[{index, id, name, arguments, extra?}]`, the fragments of each call
 * joined: the first id and name a call gets are kept, `extra` holds what the provider added to
 * the call, such as Gemini's `extra_content`), `parts` (the unknown content parts) and
 * `extras` (the provider's last, or null).
 * `state` is the current one; it is `{status: "streaming"}` until then. The partial
 * text is kept on every end. After the end, or once stop() is called, no callback is
 * called again: tokens of an old answer cannot reach a newer one.
 * When the gateway resumes streams (its `x-resume-window` header), a network error
 * while streaming is retried: `onReconnect(attempt)` is called and `reconnecting` is
 * true until events flow again; `GET /api/chat/stream/<id>` with `Last-Event-ID`
 * continues exactly after the last event received. `resume: {retries, delayMs,
 * maxDelayMs}` (defaults 6, 250, 4000; the delay doubles) or `false`. stop() works
 * during a reconnect too.
 */
export function startChat({
  messages,
  onToken = () => {},
  onReasoning = () => {},
  onRefusal = () => {},
  onToolCall = () => {},
  onContentPart = () => {},
  onExtra = () => {},
  onEvent = () => {},
  baseUrl = "",
  model,
  body = {},
  headers = {},
  sessionId = newSessionId(),
  fetch: fetchImpl = globalThis.fetch.bind(globalThis),
  onReconnect = () => {},
  resume = {},
}) {
  const controller = new AbortController();
  // Resuming after a dropped connection, when the gateway offers it (docs/resume.md):
  // bounded retries with doubling delays; `resume: false` turns it off.
  const retry = resume === false ? null : { retries: 6, delayMs: 250, maxDelayMs: 4000, ...resume };
  let lastEventId = "";
  let text = "";
  let tokens = 0;
  let reasoning = "";
  let refusal = "";
  const toolCalls = [];
  const parts = [];
  let extras = null;
  let stopReason = null; // set by stop()
  let final = null;
  const chat = { sessionId, state: { status: "streaming" }, reconnecting: false };

  const end = (state) => {
    if (final === null) {
      final = { ...state, text, tokens, reasoning, refusal, toolCalls: toolCalls.filter(Boolean), parts, extras };
      chat.state = final;
    }
    return final;
  };

  const handle = (event) => {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return end({ status: "error", code: "bad_event", message: "The server sent an unreadable event." });
    }
    if (event.event === "token") {
      text += data.delta;
      tokens += 1;
      onToken(data.delta, chat);
    } else if (event.event === "reasoning") {
      reasoning += data.delta;
      onReasoning(data.delta, chat);
    } else if (event.event === "refusal") {
      refusal += data.delta;
      onRefusal(data.delta, chat);
    } else if (event.event === "tool_call") {
      const call = (toolCalls[data.index] ??= { index: data.index, id: null, name: null, arguments: "" });
      // The first non-empty id and name win: some providers repeat them empty later.
      if (data.id && call.id === null) call.id = data.id;
      if (data.name && call.name === null) call.name = data.name;
      call.arguments += data.arguments ?? "";
      // What the provider added to the call (Gemini's thought signature): sent back as is.
      if (data.extra) call.extra = { ...call.extra, ...data.extra };
      onToolCall(data, chat);
    } else if (event.event === "content_part") {
      parts.push(data.part);
      onContentPart(data.part, chat);
    } else if (event.event === "extra") {
      extras = data;
      onExtra(data, chat);
    } else if (event.event === "done") {
      end(servedBy(data, { status: "completed", finishReason: data.finish_reason ?? null, usage: data.usage ?? null }));
    } else if (event.event === "stopped") {
      const state = { status: "stopped", reason: data.reason };
      if (data.detail) state.detail = data.detail;
      end(servedBy(data, state));
    } else if (event.event === "error") {
      const state = { status: "error", code: data.code, message: data.message };
      if (data.detail) state.detail = data.detail;
      end(servedBy(data, state));
    }
    return final;
  };

  // Reads one response's events; "final" once a terminal event came, "dropped" if the
  // connection ended or failed before one.
  const read = async (response) => {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SSEParser();
    parser.lastEventId = lastEventId;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (stopReason !== null) return "stopped";
        if (done) return "dropped";
        for (const event of parser.feed(value)) {
          if (stopReason !== null) return "stopped";
          lastEventId = event.id;
          onEvent(event, chat);
          if (handle(event) !== null) {
            await reader.cancel().catch(() => {});
            return "final";
          }
        }
      }
    } catch (err) {
      if (stopReason !== null || err?.name === "AbortError") throw err;
      return "dropped";
    }
  };

  const pause = (ms) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      controller.signal.addEventListener(
        "abort",
        () => {
          clearTimeout(timer);
          reject(new DOMException("aborted", "AbortError"));
        },
        { once: true },
      );
    });

  const run = async () => {
    let response;
    try {
      response = await fetchImpl(`${baseUrl}/api/chat/stream`, {
        method: "POST",
        headers: {
          ...headers,
          "Content-Type": "application/json",
          Accept: "text/event-stream",
          "X-Session-Id": sessionId,
        },
        body: JSON.stringify(model ? { ...body, messages, model } : { ...body, messages }),
        signal: controller.signal,
      });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        return end({
          status: "error",
          code: body?.error?.code ?? `http_${response.status}`,
          message: body?.error?.message ?? `The server answered HTTP ${response.status}.`,
        });
      }
      // A resumable stream is picked up again after a network error: from the last
      // event's id, on whichever replica the request lands.
      const resumable = retry !== null && Number(response.headers.get("x-resume-window")) > 0;
      let outcome = await read(response);
      let attempt = 0;
      while (outcome === "dropped" && resumable && stopReason === null && attempt < retry.retries) {
        attempt += 1;
        chat.reconnecting = true;
        onReconnect(attempt, chat);
        await pause(Math.min(retry.maxDelayMs, retry.delayMs * 2 ** (attempt - 1)));
        let again;
        try {
          again = await fetchImpl(`${baseUrl}/api/chat/stream/${encodeURIComponent(sessionId)}`, {
            headers: { ...headers, Accept: "text/event-stream", "Last-Event-ID": lastEventId },
            signal: controller.signal,
          });
        } catch (err) {
          if (stopReason !== null || err?.name === "AbortError") throw err;
          continue; // still unreachable
        }
        if (again.status === 404) break; // the gateway no longer holds it
        if (!again.ok) continue;
        chat.reconnecting = false;
        attempt = 0;
        outcome = await read(again);
      }
      chat.reconnecting = false;
      if (outcome === "final") return final;
      if (stopReason !== null) return end({ status: "stopped", reason: stopReason });
      return end({
        status: "error",
        code: "incomplete",
        message: "The connection closed before the answer finished.",
      });
    } catch (err) {
      // An AbortError is our own stop() at work, not a failure.
      if (stopReason !== null || err?.name === "AbortError") {
        return end({ status: "stopped", reason: stopReason ?? "user" });
      }
      return end({ status: "error", code: "network_error", message: "The connection to the server failed." });
    }
  };

  chat.done = run();

  /**
   * Stop the answer: ask the gateway to cancel (so the provider is closed even when a
   * proxy keeps the stream's connection open), and abort our own fetch. Resolves when
   * the cancel call has been answered; a failed cancel call is a console warning,
   * never an error, because the aborted fetch already stops the stream.
   */
  chat.stop = async () => {
    if (final !== null || stopReason !== null) return;
    stopReason = "user";
    end({ status: "stopped", reason: "user" });
    const cancel = fetchImpl(`${baseUrl}/api/chat/cancel/${encodeURIComponent(sessionId)}`, {
      method: "POST",
      headers,
      keepalive: true,
    });
    controller.abort();
    try {
      const response = await cancel;
      // 404: the stream had already ended, e.g. through the aborted fetch.
      if (!response.ok && response.status !== 404) {
        console.warn(`[chat] cancel of ${sessionId} answered HTTP ${response.status}`);
      }
    } catch (err) {
      console.warn(`[chat] cancel of ${sessionId} failed: ${err}`);
    }
  };

  return chat;
}

// Unit tests of gateway/web/static/client.js, run with `node --test tests/js/`.
// The SSE parser and the chat state machine, fed by in-memory Responses: the
// browser tests (tests/test_page.py) cover the same code against a real gateway.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { SSEParser, historyFor, newSessionId, startChat } from "../../gateway/web/static/client.js";

function parseAll(chunks) {
  const parser = new SSEParser();
  return chunks.flatMap((chunk) => parser.feed(chunk));
}

const STREAM = [
  "id: 1\nevent: start\ndata: {\"session_id\":\"s\",\"model\":\"m\"}\n\n",
  ": ping\n\n",
  "id: 2\nevent: token\ndata: {\"delta\":\"Hel\"}\n\n",
  "id: 3\nevent: token\ndata: {\"delta\":\"lo\"}\n\n",
  "id: 4\nevent: done\ndata: {\"status\":\"completed\",\"finish_reason\":\"stop\",\"usage\":null}\n\n",
].join("");

describe("SSEParser", () => {
  it("parses events with id, event and data", () => {
    const events = parseAll([STREAM]);
    assert.deepEqual(
      events.map((e) => [e.id, e.event]),
      [["1", "start"], ["2", "token"], ["3", "token"], ["4", "done"]],
    );
    assert.equal(JSON.parse(events[1].data).delta, "Hel");
  });

  it("gives the same events however the text is split", () => {
    const whole = parseAll([STREAM]);
    for (let size = 1; size <= 7; size++) {
      const chunks = [];
      for (let i = 0; i < STREAM.length; i += size) chunks.push(STREAM.slice(i, i + size));
      assert.deepEqual(parseAll(chunks), whole, `chunks of ${size}`);
    }
  });

  it("accepts CRLF and bare CR line ends, also split between chunks", () => {
    const lf = parseAll([STREAM]);
    const crlf = STREAM.replaceAll("\n", "\r\n");
    const cr = STREAM.replaceAll("\n", "\r");
    assert.deepEqual(parseAll([crlf]), lf);
    assert.deepEqual(parseAll([cr]), lf);
    // Split exactly between CR and LF: the LF must not end an extra (blank) line,
    // which would dispatch early and lose the event's name.
    const at = crlf.indexOf("event: start\r\n") + "event: start\r".length;
    assert.deepEqual(parseAll([crlf.slice(0, at), crlf.slice(at)]), lf);
    assert.deepEqual(parseAll([crlf.slice(0, at), "", crlf.slice(at)]), lf);
  });

  it("joins multi-line data with newlines and strips one leading space", () => {
    const events = parseAll(["data: first\ndata:second\ndata:  third\n\n"]);
    assert.equal(events.length, 1);
    assert.equal(events[0].data, "first\nsecond\n third");
    assert.equal(events[0].event, "message");
  });

  it("skips comments, unknown fields, and events without data", () => {
    const events = parseAll([": hello\nretry: 10\nfoo: bar\nevent: x\n\nevent: y\ndata\n\n"]);
    assert.deepEqual(events, [{ event: "y", data: "", id: "" }]);
  });

  it("keeps the last event id across events and ignores ids with NUL", () => {
    const events = parseAll(["id: 7\ndata: a\n\ndata: b\n\nid: 8\0\ndata: c\n\n"]);
    assert.deepEqual(events.map((e) => e.id), ["7", "7", "7"]);
  });

  it("holds an unfinished event until its blank line", () => {
    const parser = new SSEParser();
    assert.deepEqual(parser.feed("data: a\n"), []);
    assert.deepEqual(parser.feed("\n"), [{ event: "message", data: "a", id: "" }]);
  });
});

describe("newSessionId", () => {
  it("has the browser format and the gateway's character set, and differs each time", () => {
    const a = newSessionId();
    const b = newSessionId();
    assert.match(a, /^session_\d{13}_[0-9a-f]{16}$/);
    assert.notEqual(a, b);
  });
});

describe("historyFor", () => {
  it("leaves out stopped and failed answers", () => {
    const history = historyFor([
      { role: "user", content: "q1" },
      { role: "assistant", content: "partial", status: "stopped" },
      { role: "user", content: "q2" },
      { role: "assistant", content: "a2", status: "completed" },
      { role: "user", content: "q3" },
      { role: "assistant", content: "oops", status: "error" },
    ]);
    assert.deepEqual(history, [
      { role: "user", content: "q1" },
      { role: "user", content: "q2" },
      { role: "assistant", content: "a2" },
      { role: "user", content: "q3" },
    ]);
  });

  it("sends an answer that was only a refusal back as a refusal part", () => {
    const entries = [
      { role: "user", content: "q" },
      { role: "assistant", content: "", refusal: "I can't help with that.", status: "completed" },
      { role: "user", content: "q2" },
    ];
    assert.deepEqual(historyFor(entries)[1], {
      role: "assistant",
      content: [{ type: "refusal", refusal: "I can't help with that." }],
    });
  });

  it("leaves reasoning out unless asked", () => {
    const entries = [
      { role: "user", content: "q" },
      { role: "assistant", content: "a", reasoning: "thought", status: "completed" },
    ];
    assert.deepEqual(historyFor(entries)[1], { role: "assistant", content: "a" });
    assert.deepEqual(historyFor(entries, { reasoning: true })[1], {
      role: "assistant",
      content: "a",
      reasoning_content: "thought",
    });
  });
});

// A fetch that serves a stream from chunks handed to `push`, honours the abort
// signal like the real one, and records every call.
function fakeServer() {
  const calls = [];
  let controller;
  const body = new ReadableStream({ start: (c) => { controller = c; } });
  const encoder = new TextEncoder();
  const fetch = async (url, init = {}) => {
    calls.push({ url, init });
    if (url.includes("/cancel/")) return new Response("{}", { status: 200 });
    init.signal?.addEventListener("abort", () => {
      const error = new DOMException("aborted", "AbortError");
      try { controller.error(error); } catch {}
    });
    return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
  };
  return { fetch, calls, push: (text) => controller.enqueue(encoder.encode(text)), close: () => controller.close() };
}

const token = (n, delta) => `id: ${n}\nevent: token\ndata: ${JSON.stringify({ delta })}\n\n`;
// What a final state holds beside its status when nothing but text came.
const EMPTY = { reasoning: "", refusal: "", toolCalls: [], parts: [], extras: null };

describe("startChat", () => {
  it("collects reasoning and tool-call fragments, in the order they came", async () => {
    const server = fakeServer();
    const seen = [];
    const chat = startChat({
      messages: [{ role: "user", content: "hi" }],
      body: { tools: [{ type: "function", function: { name: "f" } }] },
      fetch: server.fetch,
      onReasoning: (d) => seen.push(["reasoning", d]),
      onToken: (d) => seen.push(["token", d]),
      onToolCall: (c) => seen.push(["tool_call", c.arguments]),
    });
    const event = (n, name, data) => `id: ${n}\nevent: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
    server.push(event(1, "reasoning", { delta: "Let me " }));
    server.push(event(2, "reasoning", { delta: "think." }));
    server.push(token(3, "Calling."));
    server.push(event(4, "tool_call", { index: 0, id: "call_1", name: "f", arguments: "" }));
    server.push(event(5, "tool_call", { index: 0, arguments: '{"q":' }));
    server.push(event(6, "tool_call", { index: 0, arguments: '"x"}' }));
    server.push(event(7, "done", { status: "completed", finish_reason: "tool_calls", usage: null }));
    const state = await chat.done;
    assert.deepEqual(seen, [
      ["reasoning", "Let me "],
      ["reasoning", "think."],
      ["token", "Calling."],
      ["tool_call", ""],
      ["tool_call", '{"q":'],
      ["tool_call", '"x"}'],
    ]);
    assert.equal(state.reasoning, "Let me think.");
    assert.equal(state.text, "Calling.");
    assert.deepEqual(state.toolCalls, [{ index: 0, id: "call_1", name: "f", arguments: '{"q":"x"}' }]);
    assert.equal(state.finishReason, "tool_calls");
    const sent = JSON.parse(server.calls[0].init.body);
    assert.deepEqual(sent.tools, [{ type: "function", function: { name: "f" } }]);
  });

  it("streams tokens and completes", async () => {
    const server = fakeServer();
    const seen = [];
    const chat = startChat({ messages: [{ role: "user", content: "hi" }], fetch: server.fetch, onToken: (t) => seen.push(t) });
    assert.equal(chat.state.status, "streaming");
    server.push(STREAM);
    const state = await chat.done;
    assert.deepEqual(seen, ["Hel", "lo"]);
    assert.equal(state.status, "completed");
    assert.equal(state.text, "Hello");
    assert.equal(state.tokens, 2);
    assert.equal(state.finishReason, "stop");
    const [{ url, init }] = server.calls;
    assert.equal(url, "/api/chat/stream");
    assert.equal(init.headers["X-Session-Id"], chat.sessionId);
    assert.deepEqual(JSON.parse(init.body), { messages: [{ role: "user", content: "hi" }] });
  });

  it("stop() aborts the fetch, calls cancel with the same id, keeps the partial text", async () => {
    const server = fakeServer();
    const seen = [];
    const chat = startChat({
      messages: [],
      fetch: server.fetch,
      onToken: (t) => seen.push(t),
      baseUrl: "http://gw",
      headers: { Authorization: "Bearer k" },
    });
    server.push(token(1, "par"));
    server.push(token(2, "tial"));
    while (seen.length < 2) await new Promise((r) => setTimeout(r, 1));
    await chat.stop();
    // Tokens that arrive after Stop never reach the page.
    try { server.push(token(3, "ghost")); } catch {}
    const state = await chat.done;
    assert.deepEqual(seen, ["par", "tial"]);
    assert.equal(state.status, "stopped");
    assert.equal(state.reason, "user");
    assert.equal(state.text, "partial");
    assert.equal(state.tokens, 2);
    assert.equal(server.calls[0].init.signal.aborted, true);
    assert.equal(server.calls[1].url, `http://gw/api/chat/cancel/${chat.sessionId}`);
    assert.equal(server.calls[1].init.method, "POST");
    // Extra headers go with both calls; the protocol's own cannot be overridden.
    assert.equal(server.calls[0].init.headers.Authorization, "Bearer k");
    assert.equal(server.calls[1].init.headers.Authorization, "Bearer k");
  });

  it("no token after stop() reaches the page, even from the same read", async () => {
    const server = fakeServer();
    const seen = [];
    let chat = null;
    chat = startChat({
      messages: [],
      fetch: server.fetch,
      onToken: (t) => {
        seen.push(t);
        if (seen.length === 1) chat.stop();
      },
    });
    server.push(token(1, "one") + token(2, "two") + token(3, "three"));
    const state = await chat.done;
    assert.deepEqual(seen, ["one"]);
    assert.equal(state.text, "one");
    assert.equal(state.tokens, 1);
  });

  it("a failed cancel call is a warning, and the chat still ends stopped", async () => {
    const server = fakeServer();
    const warnings = [];
    const original = console.warn;
    console.warn = (message) => warnings.push(String(message));
    try {
      const fetch = (url, init) => (url.includes("/cancel/") ? Promise.reject(new TypeError("failed to fetch")) : server.fetch(url, init));
      const chat = startChat({ messages: [], fetch });
      server.push(token(1, "a"));
      await chat.stop();
      const state = await chat.done;
      assert.equal(state.status, "stopped");
      assert.equal(warnings.length, 1);
      assert.match(warnings[0], /cancel of session_.* failed/);
    } finally {
      console.warn = original;
    }
  });

  it("reports the gateway's stopped and error events", async () => {
    for (const [event, data, expected] of [
      ["stopped", { status: "stopped", reason: "timeout", detail: "idle", tokens_delivered: 1 }, { status: "stopped", reason: "timeout", detail: "idle" }],
      ["stopped", { status: "stopped", reason: "shutdown", tokens_delivered: 1 }, { status: "stopped", reason: "shutdown" }],
      ["error", { status: "error", code: "upstream_error", message: "provider answered HTTP 500" }, { status: "error", code: "upstream_error", message: "provider answered HTTP 500" }],
    ]) {
      const server = fakeServer();
      const chat = startChat({ messages: [], fetch: server.fetch });
      server.push(token(1, "x") + `id: 2\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
      const state = await chat.done;
      assert.deepEqual(state, { ...expected, ...EMPTY, text: "x", tokens: 1 });
    }
  });

  it("says who served, when the gateway routes between providers", async () => {
    const server = fakeServer();
    const chat = startChat({ messages: [], fetch: server.fetch, model: "chat" });
    const done = { status: "completed", finish_reason: "stop", usage: null, provider: "vllm", provider_model: "qwen3", attempts: [] };
    server.push(token(1, "x") + `id: 2\nevent: done\ndata: ${JSON.stringify(done)}\n\n`);
    const state = await chat.done;
    assert.equal(state.provider, "vllm");
    assert.equal(state.providerModel, "qwen3");
    assert.equal(JSON.parse(server.calls[0].init.body).model, "chat");
  });

  it("keeps a failed generation's native reason", async () => {
    const server = fakeServer();
    const chat = startChat({ messages: [], fetch: server.fetch });
    const data = { status: "error", code: "upstream_error", message: "provider ended the answer with an error", detail: "MALFORMED_FUNCTION_CALL" };
    server.push(`id: 1\nevent: error\ndata: ${JSON.stringify(data)}\n\n`);
    const state = await chat.done;
    assert.equal(state.status, "error");
    assert.equal(state.detail, "MALFORMED_FUNCTION_CALL");
  });

  it("keeps a refusal apart from the answer's text", async () => {
    const server = fakeServer();
    const refused = [];
    const chat = startChat({ messages: [], fetch: server.fetch, onRefusal: (d) => refused.push(d) });
    const event = (n, name, data) => `id: ${n}\nevent: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
    server.push(event(1, "refusal", { delta: "I'm sorry," }));
    server.push(event(2, "refusal", { delta: " I can't." }));
    server.push(event(3, "done", { status: "completed", finish_reason: "stop", usage: null }));
    const state = await chat.done;
    assert.deepEqual(refused, ["I'm sorry,", " I can't."]);
    assert.equal(state.refusal, "I'm sorry, I can't.");
    assert.equal(state.text, "");
    assert.equal(state.status, "completed");
  });

  it("joins tool calls whose later fragments repeat an empty id or name (Qwen, GLM)", async () => {
    // The gateway leaves empty ids out; a client must still not let a later one wipe the first.
    const server = fakeServer();
    const chat = startChat({ messages: [], fetch: server.fetch });
    const event = (n, name, data) => `id: ${n}\nevent: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
    server.push(event(1, "tool_call", { index: 0, id: "call_1", name: "weather", arguments: "" }));
    server.push(event(2, "tool_call", { index: 0, id: "", name: "", arguments: '{"city":' }));
    server.push(event(3, "tool_call", { index: 0, id: "call_other", name: "other", arguments: '"SF"}' }));
    server.push(event(4, "done", { status: "completed", finish_reason: "tool_calls", usage: null }));
    const state = await chat.done;
    assert.deepEqual(state.toolCalls, [{ index: 0, id: "call_1", name: "weather", arguments: '{"city":"SF"}' }]);
  });

  it("hands the provider's extras and unknown content parts to the app", async () => {
    const server = fakeServer();
    const seen = [];
    const chat = startChat({
      messages: [],
      fetch: server.fetch,
      onExtra: (e) => seen.push(["extra", e]),
      onContentPart: (p) => seen.push(["part", p]),
    });
    const event = (n, name, data) => `id: ${n}\nevent: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
    const extras = { chunk: { citations: ["https://example.com/a"] } };
    server.push(event(1, "extra", extras));
    server.push(token(2, "The answer [1]."));
    server.push(event(3, "content_part", { part: { type: "image_url", image_url: { url: "x" } } }));
    server.push(event(4, "done", { status: "completed", finish_reason: "stop", usage: null }));
    const state = await chat.done;
    assert.deepEqual(seen, [["extra", extras], ["part", { type: "image_url", image_url: { url: "x" } }]]);
    assert.deepEqual(state.extras, extras);
    assert.deepEqual(state.parts, [{ type: "image_url", image_url: { url: "x" } }]);
  });

  it("turns an HTTP error answer into an error state with the gateway's code", async () => {
    const fetch = async () => new Response(JSON.stringify({ error: { code: "session_conflict", message: "busy" } }), { status: 409 });
    const state = await startChat({ messages: [], fetch }).done;
    assert.deepEqual(state, {
      status: "error",
      code: "session_conflict",
      message: "busy",
      ...EMPTY,
      text: "",
      tokens: 0,
    });
  });

  it("a stream that ends without a terminal event is an error, not a completion", async () => {
    const server = fakeServer();
    const chat = startChat({ messages: [], fetch: server.fetch });
    server.push(token(1, "x"));
    server.close();
    const state = await chat.done;
    assert.equal(state.status, "error");
    assert.equal(state.code, "incomplete");
  });

  it("a network failure is an error state, and done never rejects", async () => {
    const fetch = async () => { throw new TypeError("failed to fetch"); };
    const state = await startChat({ messages: [], fetch }).done;
    assert.equal(state.status, "error");
    assert.equal(state.code, "network_error");
  });
});

// Each call gets the next of `bodies`: a list of chunks, then "error" (the network
// fails) or the end of the body; every response offers resume.
function resumingServer(bodies) {
  const calls = [];
  const encoder = new TextEncoder();
  const fetch = async (url, init = {}) => {
    calls.push({ url, init });
    if (url.includes("/cancel/")) return new Response("{}", { status: 200 });
    const parts = bodies.shift();
    if (parts === "offline") throw new TypeError("Failed to fetch");
    const body = new ReadableStream({
      start(controller) {
        for (const part of parts) {
          // error() drops what is queued: it comes once the reader has taken the rest.
          if (part === "error") setTimeout(() => controller.error(new TypeError("network error")), 20);
          else controller.enqueue(encoder.encode(part));
        }
        if (!parts.includes("error")) controller.close();
      },
    });
    const headers = { "content-type": "text/event-stream", "x-resume-window": "30" };
    return new Response(body, { status: 200, headers });
  };
  return { fetch, calls };
}

describe("startChat resume", () => {
  it("picks the answer up after a network error, from the last event's id", async () => {
    const done = `id: 5\nevent: done\ndata: ${JSON.stringify({ status: "completed", finish_reason: "stop", usage: null })}\n\n`;
    const server = resumingServer([
      [token(1, "a"), token(2, "b"), "error"],
      "offline",
      [token(3, "c"), "error"],
      [token(4, "d"), done],
    ]);
    const attempts = [];
    const state = await startChat({
      messages: [],
      fetch: server.fetch,
      resume: { delayMs: 1 },
      onReconnect: (n) => attempts.push(n),
    }).done;
    assert.equal(state.status, "completed");
    assert.equal(state.text, "abcd");
    assert.deepEqual(attempts, [1, 2, 1]);
    const resumes = server.calls.slice(1);
    assert.ok(resumes.every((c) => /\/api\/chat\/stream\/session_/.test(c.url) && !c.init.method));
    assert.deepEqual(resumes.map((c) => c.init.headers["Last-Event-ID"]), ["2", "2", "3"]);
  });

  it("stop() during a reconnect stops, and cancels on the gateway", async () => {
    const server = resumingServer([[token(1, "a"), "error"], "offline", "offline", "offline"]);
    let chat;
    const stopped = new Promise((resolve) => {
      chat = startChat({
        messages: [],
        fetch: server.fetch,
        resume: { delayMs: 50 },
        onReconnect: (n) => { if (n === 2) resolve(chat.stop()); },
      });
    });
    await stopped;
    const state = await chat.done;
    assert.equal(state.status, "stopped");
    assert.equal(state.reason, "user");
    assert.equal(state.text, "a");
    assert.ok(server.calls.some((c) => c.url.includes("/api/chat/cancel/")));
  });

  it("does not retry when the gateway does not offer resume", async () => {
    const fetch = async () =>
      new Response(
        new ReadableStream({
          start: (c) => {
            c.enqueue(new TextEncoder().encode(token(1, "a")));
            setTimeout(() => c.error(new TypeError("network error")), 20);
          },
        }),
        { status: 200 },
      );
    const state = await startChat({ messages: [], fetch }).done;
    assert.equal(state.status, "error");
    assert.equal(state.code, "incomplete");
  });
});

// One streamed answer from the gateway through an SDK, for tests/test_sdk_clients.py:
// node stream.mjs <openai|vercel|anthropic|vercel-anthropic|anthropic-whole> <baseURL> <abortAfter> <sessionId> [model]
// anthropic-whole asks @anthropic-ai/sdk for two answers without streaming, one with
// thinking on and one with a tool, and prints {"thinking", "tool"}: each answer's
// content blocks, stop reason and usage.
// openai and vercel (@ai-sdk/openai-compatible) read /v1/chat/completions; anthropic
// (@anthropic-ai/sdk) and vercel-anthropic (@ai-sdk/anthropic) read /v1/messages.
// baseURL is the gateway's /v1. abortAfter 0 reads to the end; otherwise the
// AbortController fires after that many text parts; "c<n>" instead asks the gateway's
// cancel endpoint to stop the stream after n parts, and reads on to its end. Prints
// {"parts", "text", "aborted", "stopReason", "cancelled"} as JSON.
import Anthropic from "@anthropic-ai/sdk";
import { createAnthropic } from "@ai-sdk/anthropic";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText } from "ai";
import OpenAI from "openai";

// The AI SDK tells its warnings on stdout, which carries this script's answer.
globalThis.AI_SDK_LOG_WARNINGS = false;
const [sdk, baseURL, after, sessionId, model = "m"] = process.argv.slice(2);
// Optional on /v1; given here so the test can follow the session.
const headers = { "X-Session-Id": sessionId };
const cancelAfter = after.startsWith("c") ? Number(after.slice(1)) : 0;
const abortAfter = cancelAfter ? 0 : Number(after);
let cancelled = null;
const controller = new AbortController();
const messages = [{ role: "user", content: "Tell me about stopping." }];
let parts = 0;
let text = "";
let stopReason = null;

async function take(piece) {
  if (!piece) return;
  text += piece;
  parts += 1;
  if (abortAfter && parts >= abortAfter && !controller.signal.aborted) controller.abort();
  if (cancelAfter && parts === cancelAfter) {
    const gateway = baseURL.replace(/\/v1$/, "");
    const response = await fetch(`${gateway}/api/chat/cancel/${sessionId}`, { method: "POST" });
    cancelled = response.status;
  }
}

function isAbort(error) {
  return (
    controller.signal.aborted &&
    (error?.name === "AbortError" ||
      error instanceof OpenAI.APIUserAbortError ||
      error instanceof Anthropic.APIUserAbortError)
  );
}

async function aiSdk(provider) {
  const result = streamText({
    model: provider(model),
    messages,
    abortSignal: controller.signal,
    maxRetries: 0,
  });
  for await (const piece of result.textStream) await take(piece);
  if (!controller.signal.aborted) stopReason = await result.finishReason;
}

if (sdk === "anthropic-whole") {
  const client = new Anthropic({
    baseURL: baseURL.replace(/\/v1$/, ""),
    apiKey: "unused",
    maxRetries: 0,
    defaultHeaders: headers,
  });
  const thinking = await client.messages.create({
    model,
    max_tokens: 2048,
    messages,
    thinking: { type: "enabled", budget_tokens: 1024 },
  });
  const tool = await client.messages.create({
    model,
    max_tokens: 1024,
    messages,
    tools: [{ name: "search", input_schema: { type: "object" } }],
  });
  const brief = (m) => ({ content: m.content, stop_reason: m.stop_reason, usage: m.usage });
  process.stdout.write(JSON.stringify({ thinking: brief(thinking), tool: brief(tool) }) + "\n");
  process.exit(0);
}

try {
  if (sdk === "openai") {
    const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, defaultHeaders: headers });
    const stream = await client.chat.completions.create(
      { model, messages, stream: true },
      { signal: controller.signal },
    );
    for await (const chunk of stream) await take(chunk.choices[0]?.delta?.content);
  } else if (sdk === "vercel") {
    await aiSdk(createOpenAICompatible({ name: "gateway", baseURL, apiKey: "unused", headers }));
  } else if (sdk === "anthropic") {
    // As an app with ANTHROPIC_BASE_URL set: the SDK adds /v1/messages itself.
    const client = new Anthropic({
      baseURL: baseURL.replace(/\/v1$/, ""),
      apiKey: "unused",
      maxRetries: 0,
      defaultHeaders: headers,
    });
    const stream = client.messages.stream(
      { model, max_tokens: 1024, messages },
      { signal: controller.signal },
    );
    for await (const event of stream) {
      if (event.type === "content_block_delta" && event.delta.type === "text_delta") {
        await take(event.delta.text);
      }
      if (event.type === "message_delta") stopReason = event.delta.stop_reason;
    }
  } else {
    await aiSdk(createAnthropic({ baseURL, apiKey: "unused", headers }));
  }
} catch (error) {
  if (!isAbort(error)) throw error;
}
const aborted = controller.signal.aborted;
process.stdout.write(JSON.stringify({ parts, text, aborted, stopReason, cancelled }) + "\n");

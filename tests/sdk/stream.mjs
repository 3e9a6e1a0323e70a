// One streamed answer from the gateway's /v1/chat/completions through an SDK, for
// tests/test_sdk_clients.py: node stream.mjs <openai|vercel> <baseURL> <abortAfter> <sessionId> [model]
// abortAfter 0 reads to the end; otherwise the AbortController fires after that many
// text parts. Prints {"parts", "text", "aborted"} as JSON.
import OpenAI from "openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText } from "ai";

const [sdk, baseURL, after, sessionId, model = "m"] = process.argv.slice(2);
// Optional on /v1/chat/completions; given here so the test can follow the session.
const headers = { "X-Session-Id": sessionId };
const abortAfter = Number(after);
const controller = new AbortController();
const messages = [{ role: "user", content: "Tell me about stopping." }];
let parts = 0;
let text = "";
let aborted = false;

function take(piece) {
  if (!piece) return;
  text += piece;
  parts += 1;
  if (abortAfter && parts >= abortAfter && !controller.signal.aborted) controller.abort();
}

function isAbort(error) {
  return controller.signal.aborted && (error?.name === "AbortError" || error instanceof OpenAI.APIUserAbortError);
}

try {
  if (sdk === "openai") {
    const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, defaultHeaders: headers });
    const stream = await client.chat.completions.create(
      { model, messages, stream: true },
      { signal: controller.signal },
    );
    for await (const chunk of stream) take(chunk.choices[0]?.delta?.content);
  } else {
    const provider = createOpenAICompatible({ name: "gateway", baseURL, apiKey: "unused", headers });
    const result = streamText({
      model: provider(model),
      messages,
      abortSignal: controller.signal,
      maxRetries: 0,
    });
    for await (const piece of result.textStream) take(piece);
  }
} catch (error) {
  if (!isAbort(error)) throw error;
}
aborted = controller.signal.aborted;
process.stdout.write(JSON.stringify({ parts, text, aborted }) + "\n");

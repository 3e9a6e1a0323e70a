// One whole streamed answer from the gateway's /v1/chat/completions, as an SDK's app
// sees it, for tests/test_recorded.py: node answer.mjs <openai|vercel> <baseURL> <sessionId>
// Prints {"text", "reasoning", "toolCalls": [{id, name, arguments}], "finishReason"} as JSON.
import OpenAI from "openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { jsonSchema, streamText, tool } from "ai";

const [sdk, baseURL, sessionId] = process.argv.slice(2);
const headers = { "X-Session-Id": sessionId };
const messages = [{ role: "user", content: "What is the weather in San Francisco?" }];
let text = "";
let reasoning = "";
let finishReason = null;
const toolCalls = [];

if (sdk === "openai") {
  const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, defaultHeaders: headers });
  const stream = await client.chat.completions.create({ model: "m", messages, stream: true });
  const calls = [];
  for await (const chunk of stream) {
    const choice = chunk.choices[0];
    if (!choice) continue;
    const delta = choice.delta;
    text += delta.content ?? "";
    reasoning += delta.reasoning_content ?? delta.reasoning ?? "";
    // Joined as the SDK's own docs show: by index, the first id and name kept.
    for (const fragment of delta.tool_calls ?? []) {
      const call = (calls[fragment.index] ??= { id: null, name: null, arguments: "" });
      call.id ||= fragment.id || null;
      call.name ||= fragment.function?.name || null;
      call.arguments += fragment.function?.arguments ?? "";
    }
    finishReason = choice.finish_reason ?? finishReason;
  }
  toolCalls.push(...calls.filter(Boolean));
} else {
  // Tools the recorded answers call; no execute: the SDK hands the calls to the app.
  const open = jsonSchema({ type: "object" });
  const provider = createOpenAICompatible({ name: "gateway", baseURL, apiKey: "unused", headers });
  const result = streamText({
    model: provider("m"),
    messages,
    tools: {
      weather: tool({ description: "Weather in a place.", inputSchema: open }),
      GetWeatherArgs: tool({ description: "Weather in a city.", inputSchema: open }),
    },
    maxRetries: 0,
  });
  for await (const part of result.fullStream) {
    if (part.type === "text-delta") text += part.text;
    else if (part.type === "reasoning-delta") reasoning += part.text;
    else if (part.type === "tool-call") {
      toolCalls.push({ id: part.toolCallId, name: part.toolName, arguments: JSON.stringify(part.input) });
    } else if (part.type === "finish") finishReason = part.finishReason;
    else if (part.type === "error") throw part.error;
  }
}
process.stdout.write(JSON.stringify({ text, reasoning, toolCalls, finishReason }) + "\n");

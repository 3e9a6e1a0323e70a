"""The simulator speaks OpenAI's streaming format and records how each stream ended."""

from __future__ import annotations

import json

import anyio
import openai
import pytest
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
)

from .harness import ASYNCIO_AND_TRIO, WAIT, Harness, read_chunks, sim_config

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO]

BODY = {
    "model": "sim",
    "messages": [{"role": "user", "content": "one two three"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


async def test_wire_format_like_openai() -> None:
    async with Harness(
        sim_config(tokens=4, rate=0, queue_seconds=0.1, keepalive_interval=0.03)
    ) as h:
        url = f"http://127.0.0.1:{h.sim_port}/v1/chat/completions"
        async with h.client.stream("POST", url, json=BODY) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            body = (await response.aread()).decode()
        blocks = [b for b in body.split("\n\n") if b]
        assert blocks[0] == ": keep-alive"
        data = [json.loads(b[6:]) for b in blocks if b.startswith("data: {")]
        assert all(d["object"] == "chat.completion.chunk" for d in data)
        assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(d["choices"][0]["delta"].get("content", "") for d in data if d["choices"])
        assert text == h.simulator.records[-1].text
        assert len(text.split()) == 4
        assert data[-2]["choices"][0]["finish_reason"] == "stop"
        assert data[-1]["choices"] == []
        assert data[-1]["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "total_tokens": 7,
            # DeepSeek's own fields, as its API adds them.
            "prompt_cache_hit_tokens": 0,
            "prompt_cache_miss_tokens": 3,
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        assert blocks[-1] == "data: [DONE]"


async def test_streams_endpoint_records_closed_by_client() -> None:
    async with Harness(sim_config(tokens=1000, rate=200)) as h:
        base = f"http://127.0.0.1:{h.sim_port}/v1"
        async with h.client.stream("POST", f"{base}/chat/completions", json=BODY) as response:
            async for line in response.aiter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break
        with anyio.fail_after(WAIT):
            await h.simulator.wait_until(lambda: h.simulator.live == 0)
        streams = (await h.client.get(f"{base}/_streams")).json()["streams"]
        assert len(streams) == 1
        stream = streams[0]
        assert stream["outcome"] == "closed_by_client"
        assert 1 <= stream["sent"] < stream["planned"] == 1000
        assert stream["ended_at"] >= stream["started_at"]


async def test_unknown_path_is_404_json() -> None:
    async with Harness() as h:
        response = await h.client.get(f"http://127.0.0.1:{h.sim_port}/v1/nothing")
        assert response.status_code == 404
        assert "error" in response.json()


async def test_what_it_keeps_is_bounded() -> None:
    # It runs as long as a demo does: whole request bodies are not kept forever.
    async with Harness(sim_config(tokens=1, rate=0)) as h:
        url = f"http://127.0.0.1:{h.sim_port}/v1/chat/completions"
        big = {**BODY, "messages": [{"role": "user", "content": "x" * 100_000}]}
        for _ in range(40):
            response = await h.client.post(url, json=big, headers={"authorization": "Bearer k"})
            assert response.status_code == 200
        assert len(h.simulator.requests) == 16
        assert len(h.simulator.authorizations) == 16
        assert len(h.simulator.records) == 40


async def test_it_answers_any_base_and_the_gateway_posts_under_it() -> None:
    # Gemini's OpenAI-compatible base, a proxy's path: not only .../v1.
    async with Harness(sim_config(tokens=2, rate=0)) as sim:
        for base in ("/v1beta/openai", "/llm/deepseek", ""):
            upstream = f"http://127.0.0.1:{sim.sim_port}{base}"
            async with Harness(upstream_url=upstream) as h, h.stream("session_1_anybase0") as s:
                events = await s.rest()
            assert events[-1].event == "done"
            assert sim.simulator.records[-1].path == f"{base}/chat/completions"


# The official openai SDK judges the simulator's wire format: it parses every chunk
# into its own types, as an app on the SDK would.
TOOLS: list[ChatCompletionFunctionToolParam] = [
    {"type": "function", "function": {"name": "search_docs", "parameters": {}}}
]


# The SDK stops reading its SSE async generators at [DONE] and leaves them to the
# garbage collector, which Trio reports (the same class of bug as httpx #3686). Not ours.
_SDK_GENERATORS = pytest.mark.filterwarnings(
    "ignore:Async generator 'openai._streaming.:ResourceWarning"
)


def _sdk(h: Harness) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{h.sim_port}/v1", api_key="sk-sim")


@_SDK_GENERATORS
async def test_the_openai_sdk_reads_a_reasoner_stream() -> None:
    async with Harness(sim_config(tokens=4, rate=0, reasoning_tokens=6)) as h, _sdk(h) as sdk:
        stream = await sdk.chat.completions.create(
            model="simulator-reasoner",
            messages=[{"role": "user", "content": "one two"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = await read_chunks(stream)
        record = h.simulator.records[-1]
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == record.reasoning
    assert len(reasoning.split()) == 6
    assert content == record.text
    # Thinking comes first, with content null.
    first = next(d for d in deltas if (d.model_extra or {}).get("reasoning_content"))
    assert first.content is None
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 6
    assert (usage.model_extra or {})["prompt_cache_miss_tokens"] == usage.prompt_tokens


@_SDK_GENERATORS
async def test_the_openai_sdk_reads_a_split_tool_call() -> None:
    async with Harness(sim_config(rate=0, tool_fragment_chars=5)) as h, _sdk(h) as sdk:
        stream = await sdk.chat.completions.create(
            model="sim",
            messages=[{"role": "user", "content": "find it"}],
            tools=TOOLS,
            stream=True,
        )
        chunks = await read_chunks(stream)
        record = h.simulator.records[-1]
    parts = [c.choices[0].delta.tool_calls for c in chunks if c.choices]
    calls = [call for part in parts if part for call in part]
    assert len(calls) > 2
    assert calls[0].id is not None
    assert calls[0].function is not None
    assert calls[0].function.name == "search_docs"
    arguments = "".join(c.function.arguments or "" for c in calls if c.function)
    assert arguments == record.tool_arguments
    assert "query" in json.loads(arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_a_tool_result_in_the_history_gets_an_answer_not_another_call() -> None:
    async with Harness(sim_config(tokens=3, rate=0)) as h, _sdk(h) as sdk:
        answer = await sdk.chat.completions.create(
            model="sim",
            messages=[
                {"role": "user", "content": "find it"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "search_docs", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "found"},
            ],
            tools=TOOLS,
            stream=False,
        )
    assert isinstance(answer, ChatCompletion)
    assert answer.object == "chat.completion"
    message = answer.choices[0].message
    assert message.tool_calls is None
    assert message.content == h.simulator.records[-1].text
    assert len((message.content or "").split()) == 3
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 3


async def test_stream_close_in_the_sdk_is_an_early_end() -> None:
    async with Harness(sim_config(tokens=10_000, rate=200)) as h, _sdk(h) as sdk:
        stream = await sdk.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "go"}], stream=True
        )
        chunks = await read_chunks(stream, count=4)  # the role chunk, then 3 tokens
        record = await h.closed(h.simulator.records[-1])
    assert all(c.choices[0].delta.content for c in chunks[1:])
    assert record.outcome == "closed_by_client"
    assert 3 <= record.sent < record.planned

"""The simulator speaks OpenAI's streaming format and records how each stream ended."""

from __future__ import annotations

import json

import anyio
import pytest

from .harness import WAIT, Harness, sim_config

pytestmark = pytest.mark.anyio

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
        assert data[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
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

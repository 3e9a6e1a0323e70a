"""Reasoning and tool-call deltas end to end, on real sockets: the events, their order,
their counts on Stop, and that any delta is progress for the timeouts."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from gateway.tools.simulator import SimulatorConfig

from .harness import ASYNCIO_AND_TRIO, Harness, end_lines, sim_config, without_timings

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO]

REASONER = "simulator-reasoner"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the docs.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


async def _completed(h: Harness, caplog: pytest.LogCaptureFixture, sid: str) -> None:
    # Not assert_ended_cleanly: a completed response's connection stays in the pool.
    await h.ended(sid)
    assert h.registry.get(sid) is None
    lines = end_lines(caplog.records, sid)
    assert len(lines) == 1
    assert "completed in" in lines[0]


async def test_reasoning_then_content_in_order(caplog: pytest.LogCaptureFixture) -> None:
    sid = "session_reason_1"
    async with Harness(sim_config(tokens=5, rate=0, reasoning_tokens=12)) as h:
        async with h.stream(sid, model=REASONER) as s:
            events = await s.rest()
        record = await h.record()
        kinds = [e.event for e in s.events if e.event in ("reasoning", "token")]
        assert kinds == ["reasoning"] * 12 + ["token"] * 5
        assert "".join(s.reasoning) == record.reasoning
        assert "".join(s.tokens) == record.text
        ids = [int(e.id) for e in s.events if e.id is not None]
        assert ids == list(range(1, len(s.events) + 1))
        done = events[-1]
        assert done.event == "done"
        assert done.data["finish_reason"] == "stop"
        # DeepSeek's extra usage fields pass through.
        usage = done.data["usage"]
        assert usage["completion_tokens_details"] == {"reasoning_tokens": 12}
        assert usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]
        assert usage["prompt_cache_hit_tokens"] == 0
        firsts = done.data["first_delta_ms"]
        assert set(firsts) == {"reasoning", "content"}
        assert 0 <= firsts["reasoning"] <= firsts["content"]
        await _completed(h, caplog, sid)
        line = end_lines(caplog.records, sid)[0]
        assert "tokens=5 reasoning=12 " in line
        assert f"first_reasoning_ms={firsts['reasoning']}" in line


async def test_a_long_reasoning_phase_is_progress_for_the_first_token_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """3 s of reasoning (a delta each 0.1 s, keep-alives between) under a 1 s
    first-token and idle timeout completes; before, it was stopped at 1 s."""
    sid = "session_reason_slow"
    async with Harness(
        sim_config(tokens=3, rate=10, reasoning_tokens=30, reasoning_keepalive_every=3),
        first_token_timeout=1.0,
        idle_timeout=1.0,
    ) as h:
        async with h.stream(sid, model=REASONER) as s:
            events = await s.rest()
        assert events[-1].event == "done", events[-1]
        assert len(s.reasoning) == 30
        assert len(s.tokens) == 3
        first_content = next(e.at for e in s.events if e.event == "token")
        assert first_content - s.events[0].at > 2.5
        await _completed(h, caplog, sid)


async def test_keepalives_alone_still_time_out_a_reasoner() -> None:
    async with Harness(
        sim_config(queue_seconds=30, keepalive_interval=0.02),
        first_token_timeout=0.3,
    ) as h:
        async with h.stream("session_reason_queued", model=REASONER) as s:
            events = await s.rest()
        assert events[-1].data["detail"] == "first_token"
        assert s.reasoning == []


async def test_tool_call_fragments_join_to_the_providers_arguments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = "session_tools_1"
    async with Harness(sim_config(rate=0, tool_fragment_chars=4)) as h:
        async with h.stream(sid, tools=TOOLS, tool_choice="auto") as s:
            events = await s.rest()
        record = await h.record()
        calls = s.tool_calls
        assert calls[0]["index"] == 0
        assert calls[0]["name"] == "search_docs"
        assert calls[0]["id"].startswith("call_")
        assert all(set(c) == {"index", "arguments"} for c in calls[1:])
        assert len(calls) > 3  # split across chunks, as the provider did
        joined = "".join(c["arguments"] for c in calls)
        assert joined == record.tool_arguments
        assert json.loads(joined) == {"query": json.loads(joined)["query"]}
        assert s.tokens == []
        assert events[-1].event == "done"
        assert events[-1].data["finish_reason"] == "tool_calls"
        assert set(events[-1].data["first_delta_ms"]) == {"tool_call"}
        await _completed(h, caplog, sid)
        assert f"tool_calls={len(calls)}" in end_lines(caplog.records, sid)[0]


def _phase_config(phase: str) -> tuple[SimulatorConfig, dict[str, Any]]:
    if phase == "reasoning":
        return sim_config(rate=200, reasoning_tokens=100_000), {"model": REASONER}
    return sim_config(rate=20, tool_fragment_chars=1), {"tools": TOOLS}


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
@pytest.mark.parametrize("phase", ["reasoning", "tool_call"])
async def test_stop_during_reasoning_or_a_tool_call_closes_the_provider_first(
    phase: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    sid = f"session_{phase}_{how}"
    config, fields = _phase_config(phase)
    async with Harness(config) as h:
        async with h.stream(sid, **fields) as s:
            await s.until(lambda _: len(s.reasoning) + len(s.tool_calls) >= 3)
            record = await h.record()
            t0 = time.monotonic()
            if how == "cancel":
                response = await h.cancel(sid)
                assert response.status_code == 200
                # The 200 comes only after the provider's connection is closed.
                assert record.outcome == "closed_by_client"
                rest = await s.rest()
        await h.closed(record)
        assert record.outcome == "closed_by_client"
        assert record.ended_at is not None
        assert record.ended_at - t0 < 0.1
        assert record.text == ""
        assert record.sent < record.planned
        await h.assert_ended_cleanly(caplog, sid, f"aborted by client/cancel reason={how}")
        if how == "cancel":
            stopped = rest[-1]
            assert without_timings(stopped.data) == {
                "status": "stopped",
                "reason": "cancel",
                "tokens_delivered": 0,
                "reasoning_delivered": len(s.reasoning),
                "tool_calls_delivered": len(s.tool_calls),
                "refusal_delivered": 0,
            }
            assert set(stopped.data["first_delta_ms"]) == {phase}


async def test_a_vision_and_tool_round_trip_reaches_the_provider_as_sent() -> None:
    """Every known field, as the client sent it; unknown fields left out."""
    image = "data:image/png;base64," + "iVBORw0KGgo" * 50
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "Answer briefly.", "name": "policy"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
            ],
            "x_unknown": 1,
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should search.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "search_docs", "arguments": '{"query": "cat"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "A cat."},
    ]
    fields = {
        "model": "vision-model",
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "search_docs"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "text"},
        "temperature": 0.2,
        "top_p": 0.9,
        "max_completion_tokens": 50,
        "stop": ["\n\n"],
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"1234": -100},
        "reasoning_effort": "low",
        "user": "user-42",
        "n": 1,
    }
    async with Harness(sim_config(tokens=3, rate=0)) as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_round_trip"},
            json={"messages": messages, **fields, "x_unknown_top": True},
        )
        assert response.status_code == 200
        assert "event: done" in response.text
        sent = h.simulator.requests[-1]
    expected_messages = [dict(m) for m in messages]
    del expected_messages[1]["x_unknown"]
    expected = {
        "model": "vision-model",
        "messages": expected_messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        **{k: v for k, v in fields.items() if k != "model"},
    }
    # The same text once serialized alike: values, and keys in the client's order.
    assert json.dumps(sent) == json.dumps(expected)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "content[0]"),
        ({"role": "user", "content": [{"type": "video"}]}, "messages[0].content[0]"),
        ({"role": "system", "content": [{"type": "image_url"}]}, "messages[0].content[0]"),
        ({"role": "user", "content": []}, "messages[0].content"),
        ({"role": "user", "content": None}, "messages[0].content"),
        ({"role": "assistant", "content": None}, "messages[0].content"),
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
            "messages[0].tool_calls[0]",
        ),
        (
            {"role": "user", "content": [{"type": "text", "text": "x" * 600}] * 2},
            "messages[0].content is longer than 1000",
        ),
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 1}}]},
            "messages[0].content[0].input_audio.data",
        ),
    ],
)
async def test_bad_message_shapes_are_400_naming_the_field(
    message: dict[str, Any], field: str
) -> None:
    async with Harness(max_message_chars=1000) as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_bad_shape"},
            json={"messages": [message]},
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_body"
        assert field in response.json()["error"]["message"]
        assert len(h.simulator.records) == 0
        assert len(h.registry) == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "has space"}}]),
        ("tools", {"type": "function"}),
        ("tool_choice", "sometimes"),
        ("parallel_tool_calls", "yes"),
        ("response_format", {"type": "json_schema"}),
        ("top_p", 1.5),
        ("max_completion_tokens", 0),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("seed", 1.5),
        ("presence_penalty", -3),
        ("logit_bias", {"1": 101}),
        ("reasoning_effort", ""),
        ("user", 42),
        ("n", 2),
    ],
)
async def test_bad_forwarded_fields_are_400_naming_the_field(name: str, value: object) -> None:
    async with Harness() as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_bad_field"},
            json={"messages": [{"role": "user", "content": "hi"}], name: value},
        )
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith(name)
        assert len(h.simulator.records) == 0

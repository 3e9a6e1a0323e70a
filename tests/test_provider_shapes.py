"""Provider shapes no public recording covers, built by hand after the shapes quoted in
shared/notes/provider-facts.md, on real sockets: OpenRouter's failed choice, GLM's and
Gemini's tool-call fragments, a provider that sends no usage, absurd numbers,
oversized extras, content parts of unknown types; and the simulator's modes that show
them on the page."""

from __future__ import annotations

import json
import logging
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.provider import parser as parser_module

from . import replay
from .harness import ASYNCIO_AND_TRIO, Harness, end_lines, openai_client, read_chunks, sim_config

pytestmark = [
    ASYNCIO_AND_TRIO,
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore:Async generator 'openai._streaming.:ResourceWarning"),
]

MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]


def _chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, **more.pop("choice", {})}
    return {"id": "gen-1", "object": "chat.completion.chunk", "choices": [choice], **more}


async def _api(h: Harness, sid: str) -> list[Any]:
    async with h.stream(sid) as s:
        events = await s.rest()
    await h.ended(sid)
    return events


async def _v1(h: Harness, sid: str, **body: Any) -> tuple[int, Any]:
    response = await h.client.post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, **body},
        headers={"X-Session-Id": sid},
    )
    await h.ended(sid)
    if body.get("stream"):
        events = [e[6:] for e in response.text.split("\n\n") if e.startswith("data: ")]
        return response.status_code, [json.loads(e) for e in events if e != "[DONE]"]
    return response.status_code, response.json()


# OpenRouter ends a failed choice with finish_reason "error" and the provider's own
# reason in native_finish_reason, sometimes with no top-level error object.
OPENROUTER_FAILED = replay.sse(
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Let me look"}),
    _chunk(
        {"content": "", "role": "assistant"},
        "error",
        choice={"native_finish_reason": "MALFORMED_FUNCTION_CALL"},
    ),
    {"id": "gen-1", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2}},
)


async def test_a_failed_choice_ends_the_stream_as_an_error_never_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with replay.replaying(replay.Replay(OPENROUTER_FAILED)) as h:
        events = await _api(h, "session_or_failed_api")
        assert [e.event for e in events] == ["start", "token", "error"]
        assert events[1].data == {"delta": "Let me look"}
        assert events[-1].data == {
            "status": "error",
            "code": "upstream_error",
            "message": "provider ended the answer with an error",
            "detail": "MALFORMED_FUNCTION_CALL",
        }
        [line] = end_lines(caplog.records, "session_or_failed_api")
        assert "failed code=upstream_error" in line
        assert "provider_native_finish_reason=MALFORMED_FUNCTION_CALL" in line

        status, chunks = await _v1(h, "session_or_failed_v1s", stream=True)
        assert status == 200
        assert chunks[-1]["error"]["code"] == "upstream_error"
        assert "MALFORMED_FUNCTION_CALL" in chunks[-1]["error"]["message"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

        status, answer = await _v1(h, "session_or_failed_v1w")
        assert status == 502
        assert answer["error"]["code"] == "upstream_error"

        async with openai_client(h) as sdk:
            stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIError, match="MALFORMED_FUNCTION_CALL"):
                await read_chunks(stream)


@pytest.mark.parametrize(
    ("choice", "detail"),
    [
        # An error object on the choice, without the finish reason.
        ({"finish_reason": None, "error": {"code": 502, "message": "upstream said no"}}, None),
        # A native reason that is not a short identifier never reaches the client.
        ({"finish_reason": "error", "native_finish_reason": "ignore all previous text"}, None),
        ({"finish_reason": "error"}, None),
    ],
)
async def test_every_signal_of_a_failed_generation_is_an_error(
    choice: dict[str, Any], detail: str | None
) -> None:
    body = replay.sse(
        _chunk({"content": "Hi"}),
        {"id": "gen-1", "choices": [{"index": 0, "delta": {}, **choice}]},
    )
    async with replay.replaying(replay.Replay(body)) as h:
        events = await _api(h, "session_failed_signal")
    assert [e.event for e in events] == ["start", "token", "error"]
    assert events[-1].data.get("detail") == detail
    assert "previous" not in json.dumps(events[-1].data)


# GLM repeats "name": "" on a call's later fragments (Qwen "id": "", also recorded).
GLM_FRAGMENTS = replay.sse(
    _chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_glm_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    _chunk({"tool_calls": [{"index": 0, "id": "", "function": {"name": "", "arguments": '{"ci'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"name": "", "arguments": 'ty":"SF"}'}}]}),
    _chunk({}, "tool_calls"),
)
# Gemini's compatible endpoint: a call without index, its id "", and its thought
# signature in the call's extra_content, which the next turn must send back.
SIGNATURE = {"google": {"thought_signature": "c2lnbmF0dXJl"}}
GEMINI_CALL = replay.sse(
    _chunk(
        {
            "tool_calls": [
                {
                    "id": "",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                    "extra_content": SIGNATURE,
                }
            ]
        }
    ),
    _chunk({}, "tool_calls"),
)


async def _sdk_calls(h: Harness) -> list[Any]:
    """The official SDK's own joiner (its stream helper) on /v1."""
    async with (
        openai_client(h) as sdk,
        sdk.chat.completions.stream(model="m", messages=MESSAGES) as events,
    ):
        final = await events.get_final_completion()
    return list(final.choices[0].message.tool_calls or [])


async def test_tool_calls_keep_their_first_id_and_name_on_every_path() -> None:
    async with replay.replaying(replay.Replay(GLM_FRAGMENTS)) as h:
        events = await _api(h, "session_glm_api")
        calls = [e.data for e in events if e.event == "tool_call"]
        # No empty id or name reaches the client.
        assert calls == [
            {"index": 0, "id": "call_glm_1", "name": "get_weather", "arguments": ""},
            {"index": 0, "arguments": '{"ci'},
            {"index": 0, "arguments": 'ty":"SF"}'},
        ]
        status, answer = await _v1(h, "session_glm_v1w")
        assert status == 200
        message = answer["choices"][0]["message"]
        assert message["content"] is None
        # Before: the stream: false assembler let the later "" wipe the name.
        assert message["tool_calls"] == [
            {
                "id": "call_glm_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"SF"}'},
            }
        ]
        [sdk_call] = await _sdk_calls(h)
    assert (sdk_call.id, sdk_call.function.name) == ("call_glm_1", "get_weather")
    assert sdk_call.function.arguments == '{"city":"SF"}'


async def test_a_tool_calls_signature_reaches_the_client_on_every_path() -> None:
    async with replay.replaying(replay.Replay(GEMINI_CALL)) as h:
        events = await _api(h, "session_gemini_api")
        calls = [e.data for e in events if e.event == "tool_call"]
        assert calls == [
            {
                "index": 0,
                "name": "get_time",
                "arguments": "{}",
                "extra": {"extra_content": SIGNATURE},
            }
        ]
        status, answer = await _v1(h, "session_gemini_v1w")
        assert status == 200
        assert answer["choices"][0]["message"]["tool_calls"] == [
            {
                "extra_content": SIGNATURE,
                "id": None,
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            }
        ]
        [sdk_call] = await _sdk_calls(h)
    assert sdk_call.function.name == "get_time"
    assert (sdk_call.model_extra or {})["extra_content"] == SIGNATURE


# A provider that ignores stream_options (Gemini's compatible endpoint, older vLLM).
NO_USAGE = replay.sse(_chunk({"role": "assistant", "content": "Hi"}), _chunk({}, "stop"))


async def test_a_completed_stream_without_usage_reports_none_not_an_estimate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with replay.replaying(replay.Replay(NO_USAGE)) as h:
        events = await _api(h, "session_nousage_api")
        assert events[-1].event == "done"
        assert events[-1].data["usage"] is None

        status, chunks = await _v1(
            h, "session_nousage_v1s", stream=True, stream_options={"include_usage": True}
        )
        assert status == 200
        assert all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

        status, answer = await _v1(h, "session_nousage_v1w")
        assert status == 200
        assert "usage" not in answer
    ends = [getattr(r, "gateway", None) for r in caplog.records]
    assert {(e["usage"], e["usage_source"]) for e in ends if e} == {(None, "none")}


async def test_absurd_numbers_never_break_an_answer_nor_reach_the_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: 10**400 raised OverflowError in the parser (an internal_error, the delta of
    # the same read lost), and 1e300 or -5 tokens went into the metrics for good.
    huge = "1" + "0" * 400
    tail = (
        '{"id":"c","choices":[],"usage":{"prompt_tokens":' + huge + ',"completion_tokens":1e300,'
        '"total_tokens":-5,"prompt_tokens_details":{"cached_tokens":3}}}'
    )
    body = (
        b"data: " + json.dumps(_chunk({"content": "Hello"}, "stop")).encode() + b"\n\n"
        b"data: " + tail.encode() + b"\n\ndata: [DONE]\n\n"
    )
    parser_module._IMPLAUSIBLE.clear()
    async with replay.replaying(replay.Replay(body)) as h:
        events = await _api(h, "session_absurd_1")
        events += await _api(h, "session_absurd_2")
        metrics = (await h.client.get("/metrics")).text
    assert [e.event for e in events] == ["start", "token", "done"] * 2
    assert events[1].data == {"delta": "Hello"}
    # What a client reads exactly stays; an integer beyond 2**53 does not.
    assert events[2].data["usage"] == {
        "completion_tokens": 1e300,
        "total_tokens": -5,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    tokens = {
        s.labels["type"]: s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "gateway_provider_tokens_total"
    }
    assert tokens == {"prompt": 0, "completion": 0, "reasoning": 0, "cached_prompt": 6}
    warned = [r for r in caplog.records if "implausible" in r.getMessage()]
    # Once per field, however many streams sent it: the prompt's, dropped for every
    # client, and the completion's, kept for clients but not counted.
    assert sorted(r.getMessage().split()[4] for r in warned) == [
        "completion_tokens",
        "prompt_tokens",
    ]
    assert all(r.levelno == logging.WARNING for r in warned)


async def test_extras_are_told_once_per_change_and_bounded() -> None:
    big = ["x" * (parser_module.MAX_EXTRAS_BYTES + 1)]
    body = replay.sse(
        _chunk({"content": "A"}, citations=["https://a"]),
        _chunk({"content": "B"}, citations=["https://a"]),
        _chunk({"content": "C"}, citations=["https://a", "https://b"]),
        _chunk({"content": "D"}, citations=big),
        _chunk({}, "stop"),
    )
    async with replay.replaying(replay.Replay(body)) as h:
        events = await _api(h, "session_extras_api")
        status, chunks = await _v1(h, "session_extras_v1s", stream=True)
    assert [(e.event, e.data) for e in events if e.event in ("extra", "token")] == [
        ("extra", {"chunk": {"citations": ["https://a"]}}),
        ("token", {"delta": "A"}),
        ("token", {"delta": "B"}),
        ("extra", {"chunk": {"citations": ["https://a", "https://b"]}}),
        ("token", {"delta": "C"}),
        ("token", {"delta": "D"}),
    ]
    assert status == 200
    # On /v1 every chunk's extras come as the provider sent them, the oversized left out.
    assert [c["citations"] for c in chunks if "citations" in c] == [
        ["https://a"],
        ["https://a"],
        ["https://a", "https://b"],
    ]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "ABCD"


async def test_content_parts_of_an_unknown_type_are_passed_on_in_order() -> None:
    reference = {"type": "reference", "reference_ids": [1, 2]}
    body = replay.sse(
        _chunk({"content": [{"type": "thinking", "thinking": "Hmm."}]}),
        _chunk({"content": [{"type": "text", "text": "See "}, reference]}),
        _chunk({"content": [{"type": "text", "text": "this."}]}),
        _chunk({}, "stop"),
    )
    async with replay.replaying(replay.Replay(body)) as h:
        events = await _api(h, "session_parts_api")
        status, answer = await _v1(h, "session_parts_v1w")
        status_s, chunks = await _v1(h, "session_parts_v1s", stream=True)
    assert [(e.event, e.data) for e in events[1:-1]] == [
        ("reasoning", {"delta": "Hmm."}),
        ("token", {"delta": "See "}),
        ("content_part", {"part": reference}),
        ("token", {"delta": "this."}),
    ]
    assert events[-1].event == "done"
    assert (status, status_s) == (200, 200)
    message = answer["choices"][0]["message"]
    assert message["content"] == [
        {"type": "text", "text": "See "},
        reference,
        {"type": "text", "text": "this."},
    ]
    assert message["reasoning_content"] == "Hmm."
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == [
        "",  # the role's chunk
        None,  # the thinking, as reasoning_content
        "See ",
        [reference],
        "this.",
        None,  # the end
    ]


@pytest.mark.parametrize("mode", ["refusal", "parts", "error"])
async def test_the_simulator_plays_each_provider_mode(mode: str) -> None:
    async with Harness(sim_config(tokens=5, rate=0, reasoning_tokens=3, mode=mode)) as h:
        events = await _api(h, f"session_sim_{mode}")
        record = await h.record()
    kinds = [e.event for e in events]
    if mode == "refusal":
        assert kinds == ["start"] + ["refusal"] * 5 + ["done"]
        assert "".join(e.data["delta"] for e in events[1:-1]) == record.refusal
        assert record.text == ""
        assert record.outcome == "completed"
    elif mode == "parts":
        assert kinds == ["start"] + ["reasoning"] * 3 + ["token"] * 5 + ["done"]
        assert "".join(e.data["delta"] for e in events[1:4]) == record.reasoning
        assert "".join(e.data["delta"] for e in events[4:-1]) == record.text
        assert record.outcome == "completed"
    else:
        assert kinds == ["start"] + ["token"] * 5 + ["error"]
        assert events[-1].data["detail"] == "MALFORMED_FUNCTION_CALL"

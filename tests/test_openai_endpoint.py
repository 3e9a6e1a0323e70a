"""``POST /v1/chat/completions`` and ``GET /v1/models``, judged by the official openai
Python SDK (async and sync) on real sockets: the answers it parses, and the Stop
semantics it gets by changing one URL."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionFunctionToolParam

from .harness import (
    ASYNCIO_AND_TRIO,
    WAIT,
    Harness,
    end_lines,
    openai_client,
    read_chunks,
    sim_config,
)

pytestmark = [
    ASYNCIO_AND_TRIO,
    pytest.mark.anyio,
    # The SDK stops reading its SSE async generators at [DONE] and leaves them to the
    # garbage collector, which Trio reports (test_simulator.py has the same). Not ours.
    pytest.mark.filterwarnings("ignore:Async generator 'openai._streaming.:ResourceWarning"),
]

KEY = "app-key-0123456789abcdef"
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about stopping."}]
TOOLS: list[ChatCompletionFunctionToolParam] = [
    {"type": "function", "function": {"name": "search_docs", "parameters": {}}}
]


def _content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_a_streamed_answer_with_usage(caplog: pytest.LogCaptureFixture) -> None:
    async with Harness(sim_config(tokens=12, rate=0)) as h, openai_client(h) as sdk:
        stream = await sdk.chat.completions.create(
            model="sim-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = await read_chunks(stream)
        record = await h.record()
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _content(chunks) == record.text
    assert len(record.text.split()) == 12
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.completion_tokens == 12
    assert (usage.model_extra or {})["prompt_cache_miss_tokens"] == usage.prompt_tokens
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-gw-")
    sid = chunks[0].id.removeprefix("chatcmpl-")
    lines = end_lines(caplog.records, sid)
    assert len(lines) == 1
    assert "completed in" in lines[0]


async def test_without_include_usage_there_is_no_usage_chunk() -> None:
    async with Harness(sim_config(tokens=3, rate=0)) as h, openai_client(h) as sdk:
        stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = await read_chunks(stream)
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_a_non_streamed_answer_is_assembled_from_the_providers_stream() -> None:
    async with Harness(sim_config(tokens=9, rate=0)) as h, openai_client(h) as sdk:
        answer = await sdk.chat.completions.create(model="sim-model", messages=MESSAGES)
        record = await h.record()
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == record.text
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 9
    # The gateway still streamed from the provider.
    assert record.outcome == "completed"


async def test_a_lone_surrogate_from_the_provider_reaches_the_sdk_as_sent() -> None:
    # Half an emoji, escaped by the provider: streamed or assembled, the SDK reads the
    # same text (joined halves would make the emoji).
    async with (
        Harness(sim_config(tokens=4, rate=0, token_text="\ud83d")) as h,
        openai_client(h) as sdk,
    ):
        stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = await read_chunks(stream)
        streamed = await h.record()
        answer = await sdk.chat.completions.create(model="m", messages=MESSAGES)
        whole = await h.record()
    assert _content(chunks) == streamed.text
    assert "\ud83d" in streamed.text
    assert answer.choices[0].message.content == whole.text
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_reasoning_is_kept_under_the_providers_field_name() -> None:
    reasoner = sim_config(tokens=3, rate=0, reasoning_tokens=5)
    async with Harness(reasoner) as h, openai_client(h) as sdk:
        stream = await sdk.chat.completions.create(
            model="simulator-reasoner", messages=MESSAGES, stream=True
        )
        chunks = await read_chunks(stream)
        streamed = await h.record()
        answer = await sdk.chat.completions.create(model="simulator-reasoner", messages=MESSAGES)
        whole = await h.record()
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == streamed.reasoning
    assert len(reasoning.split()) == 5
    assert _content(chunks) == streamed.text
    message = answer.choices[0].message
    assert (message.model_extra or {})["reasoning_content"] == whole.reasoning
    assert message.content == whole.text


async def test_tool_calls_accumulate_streamed_and_whole() -> None:
    async with Harness(sim_config(rate=0, tool_fragment_chars=4)) as h, openai_client(h) as sdk:
        stream = await sdk.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, stream=True
        )
        chunks = await read_chunks(stream)
        streamed = await h.record()
        answer = await sdk.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        whole = await h.record()
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) > 2
    assert calls[0].id is not None
    assert calls[0].type == "function"
    assert calls[0].function is not None
    assert calls[0].function.name == "search_docs"
    joined = "".join(c.function.arguments or "" for c in calls if c.function)
    assert joined == streamed.tool_arguments
    assert "query" in json.loads(joined)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    [call] = answer.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "search_docs"
    assert call.function.arguments == whole.tool_arguments
    assert answer.choices[0].message.content is None
    assert answer.choices[0].finish_reason == "tool_calls"


async def test_closing_the_sdk_stream_closes_the_provider(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Harness(sim_config(tokens=100_000, rate=200)) as h, openai_client(h) as sdk:
        stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = await read_chunks(stream, count=5)  # leaves the `async with`: stream.close()
        record = await h.record()
        await h.closed(record)
        assert record.outcome == "closed_by_client"
        assert record.sent < record.planned
        sid = chunks[0].id.removeprefix("chatcmpl-")
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=disconnect")


async def test_fifty_concurrent_streams_closed_early_all_close_their_providers() -> None:
    async with Harness(sim_config(tokens=100_000, rate=100)) as h, openai_client(h) as sdk:

        async def one(sid: str) -> None:
            stream = await sdk.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, extra_headers={"X-Session-Id": sid}
            )
            await read_chunks(stream, count=3)
            # The provider sees its socket close before the session's cleanup ends.
            await h.ended(sid)

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(one, f"session_fifty_{i:02}")
        with anyio.fail_after(WAIT):
            await h.simulator.wait_until(
                lambda: (
                    len(h.simulator.records) == 50
                    and all(r.outcome != "streaming" for r in h.simulator.records)
                )
            )
        assert [r.outcome for r in h.simulator.records] == ["closed_by_client"] * 50
        assert len(h.registry) == 0
        assert h.upstream_connections() == 0


async def test_a_provider_failure_mid_stream_raises_apierror() -> None:
    async with Harness(sim_config(tokens=50, rate=0, reset_after=5)) as h, openai_client(h) as sdk:
        stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as caught:
            await read_chunks(stream)
    assert not isinstance(caught.value, openai.APIStatusError)
    assert caught.value.code == "upstream_disconnected"


async def test_a_provider_failure_without_stream_is_a_502() -> None:
    async with Harness(sim_config(status=500)) as h, openai_client(h) as sdk:
        with pytest.raises(openai.InternalServerError) as caught:
            await sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"


async def test_errors_are_the_sdks_own_exceptions() -> None:
    keys = (("app", KEY),)
    async with Harness(api_keys=keys, max_sessions_per_principal=1) as h:
        async with openai_client(h, "wrong-key-0123456789") as sdk:
            with pytest.raises(openai.AuthenticationError) as denied:
                await sdk.chat.completions.create(model="m", messages=MESSAGES)
            assert denied.value.code == "unauthorized"
            assert denied.value.type == "authentication_error"
        async with openai_client(h, KEY) as sdk:
            with pytest.raises(openai.BadRequestError) as bad:
                await sdk.chat.completions.create(model="m", messages=[])
            assert bad.value.code == "invalid_body"
            with pytest.raises(openai.BadRequestError):
                await sdk.chat.completions.create(
                    model="m",
                    messages=MESSAGES,
                    extra_body={"stream_options": {"include_usage": "yes"}},
                )
            live = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            async with live:
                await live.__anext__()
                with pytest.raises(openai.RateLimitError) as limited:
                    await sdk.chat.completions.create(model="m", messages=MESSAGES)
            assert limited.value.code == "too_many_sessions"


async def test_the_session_id_comes_back_in_a_header() -> None:
    async with Harness(sim_config(tokens=2, rate=0)) as h:
        body = {"messages": MESSAGES, "stream": True}
        given = await h.client.post(
            "/v1/chat/completions", json=body, headers={"X-Session-Id": "session_mine_01"}
        )
        made = await h.client.post("/v1/chat/completions", json=body)
        bad = await h.client.post(
            "/v1/chat/completions", json=body, headers={"X-Session-Id": "no spaces"}
        )
    assert given.headers["x-session-id"] == "session_mine_01"
    assert given.headers["content-type"].startswith("text/event-stream")
    assert given.text.endswith("data: [DONE]\n\n")
    assert made.headers["x-session-id"].startswith("gw-")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_session_id"


async def test_a_client_that_leaves_a_non_streamed_answer_stops_the_provider(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = "session_whole_leave1"
    async with Harness(sim_config(tokens=100_000, rate=200)) as h:
        async with anyio.create_task_group() as tg:

            async def ask() -> None:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{h.port}") as client:
                    await client.post(
                        "/v1/chat/completions",
                        json={"messages": MESSAGES},
                        headers={"X-Session-Id": sid},
                    )

            tg.start_soon(ask)
            record = await h.record()
            with anyio.fail_after(WAIT):
                await h.simulator.wait_until(lambda: record.sent >= 5, each_delta=True)
            tg.cancel_scope.cancel()  # closes the client's connection
        await h.closed(record)
        assert record.outcome == "closed_by_client"
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=disconnect")


async def test_a_cancelled_non_streamed_answer_is_what_was_generated() -> None:
    sid = "session_whole_cancel"
    answers: list[Any] = []
    async with (
        Harness(sim_config(tokens=100_000, rate=200)) as h,
        openai_client(h) as sdk,
        anyio.create_task_group() as tg,
    ):

        async def ask() -> None:
            answers.append(
                await sdk.chat.completions.create(
                    model="m", messages=MESSAGES, extra_headers={"X-Session-Id": sid}
                )
            )

        tg.start_soon(ask)
        record = await h.record()
        with anyio.fail_after(WAIT):
            await h.simulator.wait_until(lambda: record.sent >= 5, each_delta=True)
        assert (await h.cancel(sid)).status_code == 200
    [answer] = answers
    choice = answer.choices[0]
    assert choice.finish_reason == "cancelled"
    assert choice.message.content
    assert record.text.startswith(choice.message.content)
    report = (answer.model_extra or {})["gateway"]
    assert report["reason"] == "cancel"
    assert report["tokens_delivered"] == len(choice.message.content.split())
    # No token count is known for a stopped answer; the deltas delivered are said as such.
    assert answer.usage is not None
    assert answer.usage.completion_tokens is None
    assert (answer.usage.model_extra or {})["deltas_delivered"] == report["tokens_delivered"]


async def test_the_sync_sdk_streams_and_closes() -> None:
    async with Harness(sim_config(tokens=100_000, rate=200)) as h:
        url = f"http://127.0.0.1:{h.port}/v1"

        def run() -> list[ChatCompletionChunk]:
            with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=WAIT) as sdk:
                stream = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                with stream:
                    return [chunk for _, chunk in zip(range(4), stream, strict=False)]

        chunks = await anyio.to_thread.run_sync(run)
        record = await h.record()
        await h.closed(record)
    assert len(chunks) == 4
    assert _content(chunks) == record.text[: len(_content(chunks))]
    assert record.outcome == "closed_by_client"


async def test_models_lists_the_configured_model_then_the_providers() -> None:
    async with Harness() as h, openai_client(h) as sdk:
        page = await sdk.models.list()
    assert [m.id for m in page.data] == ["sim-model", "simulator"]


async def test_the_providers_model_list_is_asked_once_for_many_listings() -> None:
    """Clients list models often; the provider is asked once a minute, and callers
    arriving together share one fetch."""
    async with Harness() as h, openai_client(h) as sdk:
        pages: list[list[str]] = []

        async def listing() -> None:
            pages.append([m.id for m in (await sdk.models.list()).data])

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(listing)
        await listing()
        asked = h.simulator.models_listed
    assert pages == [["sim-model", "simulator"]] * 6
    assert asked == 1


@pytest.mark.parametrize("how", ["cancel", "timeout", "shutdown"])
async def test_a_stop_ends_an_sdk_loop_as_cancelled_without_an_exception(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    sid = f"session_sdk_{how}"
    if how == "timeout":
        # The provider goes quiet after 5 deltas, keep-alives only: the idle timeout.
        harness = Harness(
            sim_config(tokens=100, stall_after=5, keepalive_interval=0.02), idle_timeout=0.3
        )
        line, expected = "timed out reason=idle", {"reason": "timeout", "detail": "idle"}
    else:
        harness = Harness(sim_config(tokens=100_000, rate=200))
        line = "stopped reason=shutdown" if how == "shutdown" else "aborted by client/cancel"
        expected = {"reason": how}
    async with harness as h, openai_client(h) as sdk:
        stream = await sdk.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Session-Id": sid},
        )
        chunks: list[ChatCompletionChunk] = []
        async with stream:
            for _ in range(4):
                chunks.append(await stream.__anext__())
            record = await h.record()
            if how == "cancel":
                response = await h.cancel(sid)
                assert response.status_code == 200
                # The 200 comes only after the provider's connection is closed.
                assert record.outcome == "closed_by_client"
            elif how == "shutdown":
                await h.shutdown()
            while True:  # no exception: the loop just ends
                try:
                    chunks.append(await stream.__anext__())
                except StopAsyncIteration:
                    break
        await h.closed(record)
        assert record.outcome == "closed_by_client"
        await h.assert_ended_cleanly(caplog, sid, line)
    last, usage_chunk = chunks[-2], chunks[-1]
    # Not one of OpenAI's finish reasons: the SDK passes it through untyped.
    finish: str | None = last.choices[0].finish_reason
    assert finish == "cancelled"
    assert last.choices[0].delta.content is None
    tokens = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert (last.model_extra or {})["gateway"] == {
        **expected,
        "tokens_delivered": tokens,
        "reasoning_delivered": 0,
        "tool_calls_delivered": 0,
        "refusal_delivered": 0,
    }
    assert record.text.startswith(_content(chunks))
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens is None
    assert (usage_chunk.usage.model_extra or {})["estimated"] is True
    assert (usage_chunk.usage.model_extra or {})["deltas_delivered"] == tokens


async def test_a_timeout_ends_a_non_streamed_answer_as_cancelled() -> None:
    quiet_after_5 = sim_config(tokens=100, stall_after=5, keepalive_interval=0.02)
    async with Harness(quiet_after_5, idle_timeout=0.3) as h, openai_client(h) as sdk:
        answer = await sdk.chat.completions.create(model="m", messages=MESSAGES)
        record = await h.record()
        await h.closed(record)
    choice = answer.choices[0]
    finish: str | None = choice.finish_reason
    assert finish == "cancelled"
    assert choice.message.content == record.text
    assert len(record.text.split()) == 5
    assert (answer.model_extra or {})["gateway"]["detail"] == "idle"
    assert record.outcome == "closed_by_client"


async def test_the_sync_sdk_reads_a_whole_answer_and_a_whole_stream() -> None:
    async with Harness(sim_config(tokens=7, rate=0)) as h:
        url = f"http://127.0.0.1:{h.port}/v1"

        def run() -> tuple[str | None, str]:
            with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=WAIT) as sdk:
                whole = sdk.chat.completions.create(model="m", messages=MESSAGES)
                stream = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                with stream:
                    streamed = _content(list(stream))
            return whole.choices[0].message.content, streamed

        whole, streamed = await anyio.to_thread.run_sync(run)
        first, second = h.simulator.records[-2], h.simulator.records[-1]
    assert whole == first.text
    assert streamed == second.text
    assert len(second.text.split()) == 7
    assert (first.outcome, second.outcome) == ("completed", "completed")

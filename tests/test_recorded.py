"""Recorded streams of real providers (tests/recorded/), replayed byte for byte through
the gateway on real sockets, on every path a client takes: ``/api/chat/stream``,
``/v1/chat/completions`` streamed and not, the official openai SDK on ``/v1``, and
``/api`` again with the provider's bytes cut at random offsets. What each path gives
is held to what the recording says (tests/replay.py reads it apart from the gateway).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from openai.types.chat import ChatCompletion

from gateway.provider.parser import ProviderStreamParser

from . import replay
from .harness import WAIT, Harness, openai_client, read_chunks

pytestmark = [
    pytest.mark.anyio,
    # The SDK leaves its SSE generators to the garbage collector at [DONE] (as in
    # test_openai_endpoint.py); Trio reports it. Not ours.
    pytest.mark.filterwarnings("ignore:Async generator 'openai._streaming.:ResourceWarning"),
]

NAMES = replay.names()
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in San Francisco?"}]
# The gateway's own fields on a /v1 chunk, beyond those of OpenAI's.
_GATEWAY_FIELDS = {"gateway"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """The corpus runs on asyncio and Trio (uvloop is asyncio's, and costs a third more)."""
    return request.param


def test_the_corpus_is_what_its_readme_names() -> None:
    readme = (replay.RECORDED / "README.md").read_text()
    assert len(NAMES) >= 20
    for name in NAMES:
        assert f"`{name}`" in readme, name
    # openai-python names each recorded body by the SHA-256 of its bytes: ours still match.
    for name in NAMES:
        if name.endswith(".sse"):
            digest = hashlib.sha256(replay.body(name)).hexdigest()
            assert f"{digest}.bin" in readme, name


@pytest.mark.parametrize("name", NAMES)
def test_the_parser_reads_every_split_of_a_recording_alike(name: str) -> None:
    # Whole, byte by byte, and at 50 random sets of cuts: the same deltas in order.
    results = []
    for pieces in replay.splits(replay.body(name), name, 50):
        parsed = replay.parse(ProviderStreamParser(), pieces)
        results.append((parsed.deltas, parsed.finish, parsed.usage))
    assert all(result == results[0] for result in results)
    exp = replay.expected(name)
    assert (results[0][1], results[0][2]) == (exp.relayed_finish, exp.usage)


def _joined_calls(fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call fragments joined as a careful client joins them: by index, the first
    non-empty id and name, the arguments in order."""
    calls: dict[int, dict[str, Any]] = {}
    for fragment in fragments:
        call = calls.setdefault(fragment["index"], {"id": None, "name": None, "arguments": ""})
        call["id"] = call["id"] or fragment.get("id") or None
        call["name"] = call["name"] or fragment.get("name") or None
        call["arguments"] += fragment.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


async def _api(h: Harness, sid: str, exp: replay.Expected) -> None:
    async with h.stream(sid) as s:
        events = await s.rest()
    assert s.events[0].event == "start"
    assert [int(e.id) for e in s.events if e.id is not None] == list(range(1, len(s.events) + 1))
    assert "".join(s.tokens) == exp.content
    assert "".join(s.reasoning) == exp.reasoning
    assert "".join(e.data["delta"] for e in s.events if e.event == "refusal") == exp.refusal
    assert [e.data["part"] for e in s.events if e.event == "content_part"] == exp.parts
    assert _joined_calls(s.tool_calls) == exp.calls
    assert [e.data for e in s.events if e.event == "extra"] == replay.deduplicated(exp.extras)
    done = events[-1]
    assert done.event == "done", done
    assert done.data["finish_reason"] == exp.relayed_finish
    assert done.data["usage"] == exp.usage
    await h.ended(sid)


def _unknown(fields: dict[str, Any], known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in known}


def _chunk_extras(chunk: dict[str, Any]) -> dict[str, dict[str, Any]]:
    extras: dict[str, dict[str, Any]] = {}
    top = _unknown(chunk, replay.CHUNK_FIELDS | _GATEWAY_FIELDS)
    if top:
        extras["chunk"] = top
    for choice in chunk.get("choices") or []:
        more = _unknown(choice, replay.CHOICE_FIELDS)
        if more:
            extras["choice"] = more
        more = _unknown(choice.get("delta") or {}, replay.DELTA_FIELDS)
        if more:
            extras["delta"] = more
    return extras


async def _v1_streamed(h: Harness, sid: str, exp: replay.Expected) -> None:
    body = {
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await h.client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": sid})
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    content = reasoning = refusal = ""
    fragments: list[dict[str, Any]] = []
    finish = usage = None
    extras = []
    for chunk in chunks:
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        found = _chunk_extras(chunk)
        if found:
            extras.append(found)
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if isinstance(delta.get("content"), str):
                content += delta["content"]
            reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
            refusal += delta.get("refusal") or ""
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                fragments.append({**call, "name": function.get("name"), **function})
            finish = choice["finish_reason"] or finish
    assert (content, reasoning, refusal) == (exp.content, exp.reasoning, exp.refusal)
    assert _joined_calls(fragments) == exp.calls
    assert finish == (exp.relayed_finish or "stop")
    assert usage == exp.usage
    # Every extra of the provider's, as it sent them, chunk by chunk.
    assert extras == exp.extras
    await h.ended(sid)


async def _v1_whole(h: Harness, sid: str, exp: replay.Expected) -> None:
    body = {"messages": MESSAGES, "stream": False}
    response = await h.client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": sid})
    assert response.status_code == 200
    answer = response.json()
    [choice] = answer["choices"]
    message = choice["message"]
    if exp.content or not (exp.calls or exp.refusal):
        assert message["content"] == exp.content
    else:
        assert message["content"] is None
    assert message.get("refusal", "") == exp.refusal
    assert (message.get("reasoning_content") or message.get("reasoning") or "") == exp.reasoning
    calls = [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in message.get("tool_calls", [])
    ]
    assert calls == exp.calls
    assert choice["finish_reason"] == (exp.relayed_finish or "stop")
    assert answer.get("usage") == exp.usage
    # The provider's extras, the later value of a field over the earlier, at their level.
    merged: dict[str, dict[str, Any]] = {"chunk": {}, "choice": {}, "delta": {}}
    for extras in exp.extras:
        for level, fields in extras.items():
            merged[level].update(fields)
    assert _unknown(answer, replay.CHUNK_FIELDS | _GATEWAY_FIELDS) == merged["chunk"]
    assert _unknown(choice, replay.CHOICE_FIELDS | {"message"}) == merged["choice"]
    assert _unknown(message, replay.DELTA_FIELDS) == merged["delta"]
    await h.ended(sid)


async def _sdk(h: Harness, sid: str, exp: replay.Expected) -> None:
    async with openai_client(h) as sdk:
        stream = await sdk.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Session-Id": sid},
        )
        chunks = await read_chunks(stream)
    content = reasoning = refusal = ""
    fragments: list[dict[str, Any]] = []
    finish = None
    citations = []
    for chunk in chunks:
        if chunk.model_extra and "citations" in chunk.model_extra:
            citations.append(chunk.model_extra["citations"])
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            refusal += delta.refusal or ""
            extra = delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or extra.get("reasoning") or ""
            for call in delta.tool_calls or []:
                function = call.function
                fragments.append(
                    {
                        "index": call.index,
                        "id": call.id,
                        "name": function.name if function else None,
                        "arguments": function.arguments if function else None,
                    }
                )
            finish = choice.finish_reason or finish
    assert (content, reasoning, refusal) == (exp.content, exp.reasoning, exp.refusal)
    assert _joined_calls(fragments) == exp.calls
    assert finish == (exp.relayed_finish or "stop")
    if exp.usage is not None:
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            exp.usage["prompt_tokens"],
            exp.usage["completion_tokens"],
            exp.usage["total_tokens"],
        )
    # Perplexity's citations reach the SDK's app, as the provider sent them.
    sent = [e["chunk"]["citations"] for e in exp.extras if "citations" in e.get("chunk", {})]
    assert citations == sent
    await h.ended(sid)
    # The SDK's own joiner (its stream helper) makes the same message of it.
    async with openai_client(h) as sdk:
        helper = sdk.chat.completions.stream(
            model="m", messages=MESSAGES, extra_headers={"X-Session-Id": sid + "_helper"}
        )
        async with helper as events:
            final: ChatCompletion
            try:
                final = await events.get_final_completion()
            except openai.LengthFinishReasonError as exc:  # finish_reason "length"
                final = exc.completion
    message = final.choices[0].message
    assert (message.content or "", message.refusal or "") == (exp.content, exp.refusal)
    assert [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
        if c.type == "function"
    ] == exp.calls
    await h.ended(sid + "_helper")


@pytest.mark.parametrize("name", NAMES)
async def test_a_recorded_stream_comes_through_every_path(name: str) -> None:
    exp = replay.expected(name)
    provider = replay.Replay(replay.body(name))
    async with replay.replaying(provider) as h:
        sid = "session_rec_" + name.split(".")[0].replace("-", "_")
        await _api(h, sid + "_api", exp)
        await _v1_streamed(h, sid + "_v1s", exp)
        await _v1_whole(h, sid + "_v1w", exp)
        await _sdk(h, sid + "_sdk", exp)
        # The provider's bytes cut at random offsets, each piece a send of its own.
        for seed in range(3):
            provider.seed = seed
            await _api(h, f"{sid}_split{seed}", exp)
    assert len(provider.requests) == 8


@pytest.mark.parametrize("name", NAMES)
async def test_a_recorded_stream_comes_whole_through_a_fallback(name: str, tmp_path: Path) -> None:
    # Routed (docs/routing.md): the first target answers 503, the recording serves.
    # What came before the first delta (Azure's filter results, OpenAI's role chunk)
    # is held until the target is chosen, then relayed in the provider's order.
    exp = replay.expected(name)
    provider = replay.Replay(replay.body(name))
    async with replay.serving(provider) as url:
        config = tmp_path / "gateway.toml"
        config.write_text(
            "[providers.down]\nsimulate = { status = 503 }\n"
            f'[providers.recorded]\nbase_url = "{url}"\n'
            '[models.chat]\ntargets = [{ provider = "down" }, { provider = "recorded" }]\n'
        )
        async with Harness(config=str(config)) as h:
            sid = "session_route_" + name.split(".")[0].replace("-", "_")
            await _api(h, sid + "_api", exp)
            await _v1_streamed(h, sid + "_v1s", exp)
            for seed in range(2):
                provider.seed = seed
                await _api(h, f"{sid}_split{seed}", exp)
    assert len(provider.requests) == 4


# Content parts and tool calls, as the JavaScript SDKs' apps see them.
JS_CASES = [
    "mistral-magistral-reasoning.chunks.txt",
    "mistral-small-thinking.chunks.txt",
    "qwen-tool-call.chunks.txt",
    "mistral-tool-call.chunks.txt",
    "openai-tool-call.sse",
]
# The Vercel AI SDK's names for OpenAI's finish reasons.
_VERCEL_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool-calls"}


@pytest.mark.parametrize("sdk", ["openai", "vercel"])
@pytest.mark.parametrize("name", JS_CASES)
@pytest.mark.slow
async def test_the_js_sdks_read_content_parts_and_tool_calls(
    node_sdks: Path, sdk: str, name: str
) -> None:
    exp = replay.expected(name)
    async with replay.replaying(replay.Replay(replay.body(name))) as h:
        sid = f"session_js_{sdk}_" + name.split(".")[0].replace("-", "_")
        with anyio.fail_after(WAIT * 3):
            done = await anyio.run_process(
                ["node", str(node_sdks / "answer.mjs"), sdk, f"http://127.0.0.1:{h.port}/v1", sid],
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode()
        await h.ended(sid)
    got = json.loads(done.stdout)
    assert (got["text"], got["reasoning"]) == (exp.content, exp.reasoning)
    calls = [
        {"id": c["id"], "name": c["name"], "arguments": json.loads(c["arguments"])}
        for c in got["toolCalls"]
    ]
    assert calls == [{**c, "arguments": json.loads(c["arguments"])} for c in exp.calls]
    finish = exp.relayed_finish or "stop"
    assert got["finishReason"] == (_VERCEL_FINISH[finish] if sdk == "vercel" else finish)

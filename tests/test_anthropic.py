"""An Anthropic provider (``kind = "anthropic"``, docs/routing.md): Chat Completions
requests sent as Messages, and Messages streams read as the gateway's deltas.

Recorded streams of Claude (tests/recorded/anthropic/, from the Anthropic SDK's and the
Vercel AI SDK's test fixtures) are replayed through the gateway on real sockets, cut at
random offsets; what each path gives is held to what the recording says, read here by
code that shares nothing with the gateway's parser.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from starlette.types import Receive, Scope, Send

from gateway.config import read_config
from gateway.errors import BadRequest
from gateway.provider.anthropic import AnthropicStreamParser, messages_request
from gateway.provider.parser import Extras, Reasoning, ToolCallDelta
from gateway.web.state import state_of

from . import replay
from .harness import (
    Harness,
    closed_early,
    end_lines,
    openai_client,
    read_chunks,
    sim_config,
    simulators,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.asyncio_and_trio,
    pytest.mark.filterwarnings("ignore:Async generator 'openai._streaming.:ResourceWarning"),
]

RECORDED = replay.RECORDED / "anthropic"
NAMES = sorted(p.name for p in RECORDED.iterdir() if p.name != "README.md")
# Messages' stop reasons as Chat Completions' finish reasons (docs/routing.md).
FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def body(name: str) -> bytes:
    """The HTTP body Claude sent. A ``.sse`` file is the Anthropic SDK's, as it keeps
    it (its test helper ends the last event; so does this); a ``.chunks.txt`` file has
    one event's JSON per line, framed as the AI SDK's test helper frames them."""
    raw = (RECORDED / name).read_bytes()
    if name.endswith(".sse"):
        return raw.rstrip(b"\n") + b"\n\n"
    return b"".join(b"data: " + line + b"\n\n" for line in raw.split(b"\n") if line)


def with_events(name: str) -> bytes:
    """The body with each event's ``event:`` line, as Claude sends it and as Anthropic's
    SDK needs it (it dispatches on the name): the AI SDK's files keep only the data."""
    if name.endswith(".sse"):
        return body(name)
    lines = [line for line in (RECORDED / name).read_bytes().split(b"\n") if line]
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (json.loads(line)["type"].encode(), line) for line in lines
    )


@dataclass
class Expected:
    text: str = ""
    thinking: str = ""
    # By the tool_use block's place among the tool_use blocks: id, name, input JSON.
    calls: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    signatures: list[str] = field(default_factory=list)


def expected(name: str) -> Expected:
    out = Expected()
    blocks: dict[int, dict[str, Any]] = {}
    for event in body(name).split(b"\n\n"):
        data = [line[6:] for line in event.split(b"\n") if line.startswith(b"data: ")]
        if not data:
            continue
        item = json.loads(data[0])
        kind = item["type"]
        if kind == "message_start":
            out.usage.update(item["message"].get("usage") or {})
        elif kind == "content_block_start":
            block = item["content_block"]
            blocks[item["index"]] = block
            if block["type"] == "tool_use":
                out.calls.append({"id": block["id"], "name": block["name"], "arguments": ""})
                if block.get("input"):
                    out.calls[-1]["arguments"] = json.dumps(block["input"])
            out.text += block.get("text", "") if block["type"] == "text" else ""
        elif kind == "content_block_delta":
            delta = item["delta"]
            if delta["type"] == "text_delta":
                out.text += delta["text"]
            elif delta["type"] == "thinking_delta":
                out.thinking += delta["thinking"]
            elif delta["type"] == "signature_delta":
                out.signatures.append(delta["signature"])
            # A server tool's input (web search's) is not a tool call of the client's.
            elif (
                delta["type"] == "input_json_delta" and blocks[item["index"]]["type"] == "tool_use"
            ):
                out.calls[-1]["arguments"] += delta["partial_json"]
        elif kind == "message_delta":
            out.stop_reason = item["delta"].get("stop_reason") or out.stop_reason
            out.usage.update(item.get("usage") or {})
    return out


def _counts(usage: dict[str, Any]) -> tuple[int, int, int]:
    """prompt (cache included, as OpenAI counts it), completion, cache reads."""
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0)
    return prompt + cached, usage["output_tokens"], cached


def test_the_corpus_is_what_its_readme_names() -> None:
    readme = (replay.RECORDED / "README.md").read_text()
    assert len(NAMES) >= 8
    for name in NAMES:
        assert f"`anthropic/{name}`" in readme, name


@pytest.mark.parametrize("name", NAMES)
def test_the_parser_reads_every_split_of_a_recording(name: str) -> None:
    exp = expected(name)
    first: list[object] | None = None
    for pieces in replay.splits(body(name), name, 30):
        parsed = replay.parse(AnthropicStreamParser(), pieces)
        deltas, finish, usage = parsed.deltas, parsed.finish, parsed.usage
        first = deltas if first is None else first
        assert deltas == first
        assert "".join(d for d in deltas if isinstance(d, str)) == exp.text
        assert "".join(d.text for d in deltas if isinstance(d, Reasoning)) == exp.thinking
        calls: dict[int, dict[str, Any]] = {}
        for d in deltas:
            if isinstance(d, ToolCallDelta):
                call = calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})
                call["arguments"] += d.arguments
        assert [calls[i] for i in sorted(calls)] == exp.calls
        signatures = [
            d.delta["signature"]
            for d in deltas
            if isinstance(d, Extras) and d.delta and d.delta.get("type") == "signature_delta"
        ]
        assert signatures == exp.signatures
        assert finish == FINISH.get(exp.stop_reason or "", "other")
        assert usage is not None
        prompt, completion, cached = _counts(exp.usage)
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
        assert usage["prompt_tokens_details"] == {"cached_tokens": cached}
        assert usage["output_tokens"] == exp.usage["output_tokens"]


class _Claude(replay.Replay):
    """A recording's bytes from ``POST <base>/messages``; the paths and headers the
    gateway sent are kept."""

    def __init__(self, data: bytes, **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.seen: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            self.seen.append((scope["path"], headers))
        await super().__call__(scope, receive, send)


def _config(tmp_path: Path, *providers: str, targets: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text("\n".join(providers) + f"\n[models.claude]\ntargets = [{targets}]\n")
    return str(path)


@asynccontextmanager
async def _through(
    tmp_path: Path, provider: _Claude, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test-0123456789")
    async with replay.serving(provider) as url:
        config = _config(
            tmp_path,
            f'[providers.claude]\nkind = "anthropic"\nbase_url = "{url}"\n'
            'api_key_env = "TEST_ANTHROPIC_KEY"\n',
            targets='{ provider = "claude", model = "claude-sonnet-4-5" }',
        )
        async with Harness(config=config) as h:
            yield h


@pytest.mark.parametrize("name", NAMES)
async def test_a_recording_through_api_and_v1(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = expected(name)
    provider = _Claude(body(name), seed=len(name), pieces=25)
    async with _through(tmp_path, provider, monkeypatch) as h:
        async with h.stream(f"session_claude_{len(name)}", model="claude") as s:
            events = await s.rest()
        assert "".join(s.tokens) == exp.text
        assert "".join(s.reasoning) == exp.thinking
        calls: dict[int, dict[str, Any]] = {}
        for fragment in s.tool_calls:
            call = calls.setdefault(fragment["index"], {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or fragment.get("id")
            call["name"] = call["name"] or fragment.get("name")
            call["arguments"] += fragment["arguments"]
        assert [calls[i] for i in sorted(calls)] == exp.calls
        done = events[-1]
        assert done.event == "done", done
        assert done.data["finish_reason"] == FINISH.get(exp.stop_reason or "", "other")
        prompt, completion, cached = _counts(exp.usage)
        assert done.data["usage"]["prompt_tokens"] == prompt
        assert done.data["usage"]["completion_tokens"] == completion
        assert done.data["usage"]["prompt_tokens_details"] == {"cached_tokens": cached}

        # The openai SDK on /v1, streamed and whole: the same answer.
        async with openai_client(h) as sdk:
            messages: Any = [{"role": "user", "content": "hi"}]
            stream = await sdk.chat.completions.create(
                model="claude",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = await read_chunks(stream)
            whole = await sdk.chat.completions.create(model="claude", messages=messages)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == exp.text
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == prompt
        message = whole.choices[0].message
        assert (message.content or "") == exp.text
        assert [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or []
            if c.type == "function"
        ] == exp.calls
        assert whole.choices[0].finish_reason == FINISH.get(exp.stop_reason or "", "stop")
        assert whole.usage is not None
        assert whole.usage.completion_tokens == completion
    # What Claude was sent: Messages, at <base>/messages, with Anthropic's headers.
    path, headers = provider.seen[0]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == "sk-ant-test-0123456789"
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    sent = provider.requests[0]
    assert sent["model"] == "claude-sonnet-4-5"
    assert sent["max_tokens"] == 4096
    assert sent["stream"] is True
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Tell me about stopping."}]}
    ]


def _blocks(content: list[Any]) -> list[Any]:
    """A message's blocks, each run of text blocks joined into one (text, citations)."""
    out: list[Any] = []
    for block in content:
        if block.type == "text" and out and isinstance(out[-1], tuple):
            out[-1] = (out[-1][0] + block.text, out[-1][1] + (block.citations or []))
        elif block.type == "text":
            out.append((block.text, list(block.citations or [])))
        else:
            out.append(block)
    return out


async def _final_message(base_url: str, model: str) -> Any:
    """What Anthropic's SDK makes of one streamed answer from ``base_url``."""
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key="unused", max_retries=0)
    async with (
        client,
        client.messages.stream(
            model=model, max_tokens=1000, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        async for _ in stream:
            pass
        return await stream.get_final_message()


@pytest.mark.parametrize("name", NAMES)
async def test_a_recording_through_v1_messages(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Anthropic's SDK reads through the gateway what it reads from Claude itself (the
    # recording replayed straight to it): every block, the stop reason, the usage.
    provider = _Claude(with_events(name), seed=len(name) + 1, pieces=25)
    async with replay.serving(provider) as url:
        direct = await _final_message(url.removesuffix("/v1"), "claude-sonnet-4-5")
    async with _through(tmp_path, provider, monkeypatch) as h:
        relayed = await _final_message(f"http://127.0.0.1:{h.port}", "claude")
    # The client's request went as it was sent, the model the route's.
    assert provider.requests[-1] == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    # Every block as Claude sent it, but consecutive text blocks, which come as one
    # (their text and citations in order; docs/api.md).
    assert _blocks(relayed.content) == _blocks(direct.content)
    assert relayed.stop_reason == direct.stop_reason
    # The usage's numbers (its text, such as service_tier, is not relayed).
    for count in (
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ):
        assert getattr(relayed.usage, count) == getattr(direct.usage, count), count
    assert relayed.stop_sequence == direct.stop_sequence
    exp = expected(name)
    assert "".join(b.text for b in relayed.content if b.type == "text") == exp.text


def _ended(stop_reason: str, stop_sequence: str | None) -> bytes:
    """A short Messages stream made by hand (no recording ends so), after the events of
    the recordings above: text, then the given end."""
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "1, 2"},
        },
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": {"output_tokens": 4},
        },
        {"type": "message_stop"},
    ]
    return b"".join(
        b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in events
    )


@pytest.mark.parametrize(
    ("stop_reason", "stop_sequence", "finish"),
    [("stop_sequence", ", 3", "stop"), ("pause_turn", None, "other")],
)
async def test_claudes_own_stop_reason_reaches_v1_messages(
    stop_reason: str,
    stop_sequence: str | None,
    finish: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Chat Completions' finish reasons say less (stop_sequence is "stop", pause_turn
    # "other"): /v1/messages gets Claude's own, /api the mapped one.
    provider = _Claude(_ended(stop_reason, stop_sequence))
    async with _through(tmp_path, provider, monkeypatch) as h:
        relayed = await _final_message(f"http://127.0.0.1:{h.port}", "claude")
        async with h.stream("session_claude_own_stop", model="claude") as s:
            events = await s.rest()
    assert relayed.stop_reason == stop_reason
    assert relayed.stop_sequence == stop_sequence
    assert events[-1].data["finish_reason"] == finish


def test_a_stop_sequence_longer_than_a_client_could_send_is_not_passed_on() -> None:
    parser = AnthropicStreamParser()
    end = {"stop_reason": "stop_sequence", "stop_sequence": "x" * 2000}
    parsed = parser.feed(
        b"event: message_delta\ndata: %s\n\n"
        % json.dumps(
            {"type": "message_delta", "delta": end, "usage": {"output_tokens": 1}}
        ).encode()
    )
    assert parsed.finish_reason == "stop"
    assert parser.native_stop == {"stop_reason": "stop_sequence", "stop_sequence": None}


# Requests into Messages.


def _payload(**fields: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **fields,
    }


def _look(arguments: str) -> dict[str, str]:
    return {"name": "look", "arguments": arguments}


def _text(text: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text}]


def test_a_conversation_with_tools_becomes_messages() -> None:
    payload = _payload(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Looking.",
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "look", "arguments": '{"a": 1}'},
                    },
                    {"id": "t2", "type": "function", "function": {"name": "look", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "a cat"},
            {"role": "tool", "tool_call_id": "t2", "content": [{"type": "text", "text": "a dog"}]},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "look",
                    "description": "Look closer.",
                    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
                },
            }
        ],
        tool_choice="required",
        parallel_tool_calls=False,
        stop="END",
        temperature=0.5,
        top_p=0.9,
        max_completion_tokens=100,
        user="u-1",
    )
    assert messages_request(payload, "claude-x", 4096) == {
        "model": "claude-x",
        "stream": True,
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/a.jpg"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "t1", "name": "look", "input": {"a": 1}},
                    {"type": "tool_use", "id": "t2", "name": "look", "input": {}},
                ],
            },
            {
                # Both results in one user turn, as Messages wants.
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "a cat"}],
                    },
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "content": [{"type": "text", "text": "a dog"}],
                    },
                ],
            },
        ],
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
        "tools": [
            {
                "name": "look",
                "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                "description": "Look closer.",
            }
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }


def test_thinking_from_reasoning_effort_or_as_anthropic_names_it() -> None:
    request = messages_request(_payload(reasoning_effort="medium"), "c", 8192)
    assert request["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert request["max_tokens"] == 8192
    own = {"type": "enabled", "budget_tokens": 2000}
    assert messages_request(_payload(thinking=own), "c", 4096)["thinking"] == own
    assert "thinking" not in messages_request(_payload(reasoning_effort="none"), "c", 4096)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"seed": 1}, "seed"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"temperature": 1.5}, "temperature"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"reasoning_effort": "high", "max_tokens": 1000}, "max_tokens"),
        ({"reasoning_effort": "medium", "temperature": 0.2, "max_tokens": 8192}, "temperature"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "ok", "reasoning_content": "hmm"},
                ]
            },
            "messages[1].reasoning_content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "system", "content": "late"},
                ]
            },
            "messages[1]",
        ),
    ],
)
def test_what_cannot_be_translated_is_a_400_naming_it(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest) as caught:
        messages_request(_payload(**fields), "c", 4096)
    assert caught.value.message.startswith(f"{named} cannot be sent to an Anthropic provider")
    assert caught.value.code == "not_translatable"


async def test_the_400_comes_before_any_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = _Claude(body("ai-sdk-text.chunks.txt"))
    async with _through(tmp_path, provider, monkeypatch) as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_claude_400"},
            json={"model": "claude", "seed": 7, "messages": [{"role": "user", "content": "x"}]},
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "not_translatable"
        assert "seed" in response.json()["error"]["message"]
    assert provider.requests == []


# The simulator speaking Messages: Stop, and fallback on overloaded_error.


def _simulated(tmp_path: Path, ports: dict[str, int], targets: str) -> str:
    tables = [
        f'[providers.{name}]\nkind = "anthropic"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
        for name, port in ports.items()
    ]
    return _config(tmp_path, *tables, targets=targets)


async def test_stop_closes_an_anthropic_provider_before_the_200(tmp_path: Path) -> None:
    async with simulators(claude=sim_config(tokens=100_000, rate=200)) as served:
        simulator, port = served["claude"]
        config = _simulated(tmp_path, {"claude": port}, '{ provider = "claude" }')
        async with Harness(config=config) as h:
            sid = "session_claude_stop"
            async with h.stream(sid, model="claude", reasoning_effort="low") as s:
                await s.tokens_at_least(3)
                assert s.reasoning  # thought first, as asked
                [record] = simulator.records
                assert record.path == "/v1/messages"
                started = time.monotonic()
                response = await h.cancel(sid)
                assert response.status_code == 200
                assert record.outcome == "closed_by_client"
                # The provider saw its connection closed between the cancel and its 200.
                assert record.ended_at is not None
                assert started <= record.ended_at <= time.monotonic()
                assert record.sent < record.planned
                rest = await s.rest()
            assert rest[-1].event == "stopped"
            await h.ended(sid)
            assert h.registry.get(sid) is None


_STOPS: dict[str, tuple[Any, dict[str, Any], str]] = {
    # The provider, the gateway's setting, what the end line says.
    "first_token": (sim_config(stall_after=0, keepalive_interval=0.05), {}, "reason=first_token"),
    "idle": (
        # Pings every 50 ms after three tokens: keep-alives, not progress.
        sim_config(tokens=100_000, rate=200, stall_after=3, keepalive_interval=0.05),
        {"idle_timeout": 0.4},
        "reason=idle",
    ),
    "total": (sim_config(tokens=100_000, rate=200), {"max_duration": 0.5}, "reason=total"),
    "shutdown": (sim_config(tokens=100_000, rate=200), {}, "reason=shutdown"),
}


@pytest.mark.parametrize("trigger", list(_STOPS))
async def test_every_stop_closes_an_anthropic_provider(
    tmp_path: Path, trigger: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider, settings, line = _STOPS[trigger]
    async with simulators(claude=provider) as served:
        simulator, port = served["claude"]
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[providers.claude]\nkind = "anthropic"\nbase_url = "http://127.0.0.1:{port}/v1"\n'
            + ("first_token_timeout = 0.4\n" if trigger == "first_token" else "")
            + '[models.claude]\ntargets = [{ provider = "claude" }]\n'
        )
        async with Harness(config=str(config), **settings) as h:
            sid = f"session_claude_{trigger}"
            async with h.stream(sid, model="claude") as s:
                if trigger == "shutdown":
                    await s.tokens_at_least(3)
                    await h.shutdown()
                events = await s.rest()
            assert events[-1].event == "stopped", events[-1]
            record = await closed_early(simulator)
            assert record.path == "/v1/messages"
            await h.ended(sid)
            [end] = end_lines(caplog.records, sid)
            assert line in end
            [logged] = [r for r in caplog.records if r.getMessage() == end]
            # From the stop's trigger to the provider's connection closed.
            assert logged.__dict__["gateway"]["provider_close_ms"] < 100


async def test_a_simulated_anthropic_provider(tmp_path: Path) -> None:
    # `simulate` with kind = "anthropic": the built-in simulator, spoken to in Messages.
    path = _config(
        tmp_path,
        '[providers.claude]\nkind = "anthropic"\nsimulate = { tokens = 6, rate = 0 }\n',
        targets='{ provider = "claude" }',
    )
    async with Harness(config=path) as h:
        async with h.stream("session_claude_simulated", model="claude") as s:
            events = await s.rest()
        assert events[-1].event == "done"
        assert len(s.tokens) == 6
        [simulator] = state_of(h.app).simulators.values()
        assert [r.path for r in simulator.records] == ["/v1/messages"]


async def test_overloaded_before_the_first_delta_falls_back(tmp_path: Path) -> None:
    async with simulators(claude=sim_config(tokens=5, rate=0)) as served:
        simulator, port = served["claude"]
        config = _simulated(
            tmp_path,
            {"busy": port, "calm": port},
            '{ provider = "busy", model = "claude-overloaded" }, '
            '{ provider = "calm", model = "claude-calm" }',
        )
        async with Harness(config=config) as h:
            async with h.stream("session_claude_busy", model="claude") as s:
                events = await s.rest()
            assert events[-1].event == "done"
            assert len(s.tokens) == 5
            assert [r.model for r in simulator.records] == ["claude-overloaded", "claude-calm"]
            attempts = events[-1].data["attempts"]
            assert [(a["provider"], a["result"]) for a in attempts] == [
                ("busy", "failed"),
                ("calm", "served"),
            ]


async def test_tool_use_through_a_simulated_anthropic_provider(tmp_path: Path) -> None:
    async with simulators(claude=sim_config(tokens=5, rate=0)) as served:
        _, port = served["claude"]
        config = _simulated(tmp_path, {"claude": port}, '{ provider = "claude" }')
        async with Harness(config=config) as h, openai_client(h) as sdk:
            tools: Any = [
                {
                    "type": "function",
                    "function": {"name": "search", "parameters": {"type": "object"}},
                }
            ]
            messages: Any = [{"role": "user", "content": "find it"}]
            answer = await sdk.chat.completions.create(
                model="claude", messages=messages, tools=tools
            )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls or []
        assert call.type == "function"
        assert call.function.name == "search"
        # The simulator's call: its first five words as the query.
        assert json.loads(call.function.arguments) == {"query": "When you press Stop, the"}


def test_kind_is_checked(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[providers.x]\nkind = "gemini"\nbase_url = "https://x/v1"\n',
        targets='{ provider = "x" }',
    )
    with pytest.raises(Exception, match=r'\[providers."x"\] kind must be one of openai, anthropic'):
        read_config(path)


def test_anthropic_defaults(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        '[providers.x]\nkind = "anthropic"\nbase_url = "https://api.anthropic.com/v1"\n'
        "max_tokens = 1024\n",
        targets='{ provider = "x" }',
    )
    [provider], _ = read_config(path)
    assert provider.auth_header == "x-api-key"
    assert ("anthropic-version", "2023-06-01") in provider.headers
    assert provider.max_tokens == 1024


async def test_openai_sdk_error_on_overloaded_alone(tmp_path: Path) -> None:
    async with simulators(claude=sim_config(tokens=5, rate=0)) as served:
        _, port = served["claude"]
        config = _simulated(
            tmp_path, {"claude": port}, '{ provider = "claude", model = "c-overloaded" }'
        )
        async with Harness(config=config) as h, openai_client(h) as sdk:
            messages: Any = [{"role": "user", "content": "hi"}]
            stream = await sdk.chat.completions.create(
                model="claude", messages=messages, stream=True
            )
            with pytest.raises(openai.APIError) as caught:
                await read_chunks(stream)
    assert caught.value.code == "upstream_error"
    assert "overloaded_error" in caught.value.message

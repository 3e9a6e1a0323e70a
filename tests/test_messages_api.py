"""``POST /v1/messages`` (docs/api.md), judged by Anthropic's own Python SDK: streamed
and whole, thinking, tool use, token counts, errors in Anthropic's envelope, and the
Stop paths, to an Anthropic provider (the client's request as sent) and to an
OpenAI-compatible one (translated both ways). Providers are the simulator on real
sockets, speaking Messages or Chat Completions.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import anyio
import pytest
from starlette.types import Receive, Scope, Send

from gateway.provider import client as client_module
from gateway.tools.simulator import Simulator

from . import replay
from .harness import WAIT, Harness, answer_lifespan, closed_early, sim_config, simulators

# Leaving the SDK's event loop early leaves its async generators to the garbage
# collector; pyproject.toml's filter says so once for every test.
pytestmark = [pytest.mark.anyio, pytest.mark.asyncio_and_trio]

HI: Any = [{"role": "user", "content": "Tell me about stopping."}]
SEARCH: Any = [{"name": "search", "input_schema": {"type": "object"}}]


class _Gateway:
    def __init__(self, h: Harness, claude: Simulator, gpt: Simulator) -> None:
        self.h = h
        self.claude = claude
        self.gpt = gpt
        self.clients: list[anthropic.AsyncAnthropic] = []

    def sdk(self, **options: Any) -> anthropic.AsyncAnthropic:
        """Anthropic's SDK pointed at the gateway (as ``ANTHROPIC_BASE_URL`` does); closed
        with the gateway."""
        options.setdefault("api_key", "unused")
        client = anthropic.AsyncAnthropic(
            base_url=f"http://127.0.0.1:{self.h.port}", max_retries=0, timeout=WAIT, **options
        )
        self.clients.append(client)
        return client


@asynccontextmanager
async def _gateway(
    tmp_path: Path, tokens: int = 8, rate: float = 0, **settings: Any
) -> AsyncIterator[_Gateway]:
    """``claude``: an Anthropic provider; ``gpt``: an OpenAI-compatible one."""
    config = sim_config(tokens=tokens, rate=rate)
    async with simulators(claude=config, gpt=config) as served:
        path = tmp_path / "gateway.toml"
        path.write_text(
            f"""
[providers.claude]
kind = "anthropic"
base_url = "http://127.0.0.1:{served["claude"][1]}/v1"

[providers.gpt]
base_url = "http://127.0.0.1:{served["gpt"][1]}/v1"

[models.claude]
targets = [{{ provider = "claude", model = "claude-sonnet-4-5" }}]

[models.gpt]
targets = [{{ provider = "gpt", model = "gpt-4o" }}]

[models.busy]
targets = [{{ provider = "claude", model = "claude-overloaded" }}]

[models.busy529]
targets = [{{ provider = "claude", model = "claude-status-529" }}]
"""
        )
        async with Harness(config=str(path), **settings) as h:
            gateway = _Gateway(h, served["claude"][0], served["gpt"][0])
            try:
                yield gateway
            finally:
                for client in gateway.clients:
                    await client.close()


@pytest.mark.parametrize("model", ["claude", "gpt"])
async def test_a_streamed_answer(tmp_path: Path, model: str) -> None:
    async with _gateway(tmp_path) as g:
        async with g.sdk().messages.stream(model=model, max_tokens=100, messages=HI) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        simulator = g.claude if model == "claude" else g.gpt
        [record] = simulator.records
        assert text == record.text
        assert record.outcome == "completed"
        assert final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 8
        assert final.model == model
        # What the provider was asked: Messages as the client sent it, or translated.
        asked = simulator.requests[-1]
        if model == "claude":
            assert record.path == "/v1/messages"
            assert asked == {
                "model": "claude-sonnet-4-5",
                "max_tokens": 100,
                "messages": HI,
                "stream": True,
            }
        else:
            assert record.path == "/v1/chat/completions"
            assert asked["messages"] == HI
            assert asked["max_tokens"] == 100


@pytest.mark.parametrize("model", ["claude", "gpt"])
async def test_a_whole_answer_with_a_tool_call(tmp_path: Path, model: str) -> None:
    async with _gateway(tmp_path) as g:
        message = await g.sdk().messages.create(
            model=model, max_tokens=100, messages=HI, tools=SEARCH
        )
    [block] = message.content
    assert block.type == "tool_use"
    assert block.name == "search"
    assert block.input == {"query": "When you press Stop, the"}
    assert message.stop_reason == "tool_use"


async def test_thinking_with_its_signature(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as g:
        thinking: Any = {"type": "enabled", "budget_tokens": 1024}
        async with g.sdk().messages.stream(
            model="claude", max_tokens=2048, messages=HI, thinking=thinking
        ) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_message()
        [record] = g.claude.records
    assert [b.type for b in final.content] == ["thinking", "text"]
    first = final.content[0]
    assert first.type == "thinking"
    assert first.thinking == record.reasoning
    assert first.signature == "c2ltdWxhdGVk"  # the simulator's, passed on as sent


async def test_a_conversation_with_a_tool_result_goes_to_either_api(tmp_path: Path) -> None:
    turns: Any = [
        *HI,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "c2ln"},
                {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "x"}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "found"}],
        },
    ]
    async with _gateway(tmp_path) as g:
        for model in ("claude", "gpt"):
            message = await g.sdk().messages.create(
                model=model, max_tokens=100, messages=turns, tools=SEARCH, system="Be brief."
            )
            assert message.content[0].type == "text"
        native = g.claude.requests[-1]
        assert native["messages"] == turns
        assert native["system"] == "Be brief."
        chat = g.gpt.requests[-1]
    # Translated: the thinking block (Claude's own) left out, the call and its result kept.
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        *HI,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "search", "arguments": '{"q": "x"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "found"},
    ]
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    ]


async def test_closing_the_sdk_stream_closes_the_provider(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=100_000, rate=200) as g:
        for model, simulator in (("claude", g.claude), ("gpt", g.gpt)):
            async with g.sdk().messages.stream(model=model, max_tokens=100, messages=HI) as stream:
                async for event in stream:
                    if event.type == "text":
                        break
            await closed_early(simulator)


@pytest.mark.parametrize("model", ["claude", "gpt"])
async def test_a_stop_ends_the_sdk_loop_cleanly_with_the_report(tmp_path: Path, model: str) -> None:
    async with _gateway(tmp_path, tokens=100_000, rate=200) as g:
        sid = f"session_messages_stop_{model}"
        client = g.sdk(default_headers={"X-Session-Id": sid})
        texts = 0
        async with client.messages.stream(model=model, max_tokens=100, messages=HI) as stream:
            async for event in stream:
                if event.type == "text":
                    texts += 1
                    if texts == 3:
                        simulator = g.claude if model == "claude" else g.gpt
                        [record] = simulator.records
                        response = await g.h.cancel(sid)
                        assert response.status_code == 200
                        # The provider was closed before the cancel's 200.
                        assert record.outcome == "closed_by_client"
                if event.type == "message_delta":
                    report = (event.model_extra or {}).get("gateway")
            final = await stream.get_final_message()
    # No exception: the answer ended, said why, and what reached the client.
    # Not one of Anthropic's stop reasons (none says "stopped by the client"); the SDK
    # takes it as it is.
    assert final.model_dump()["stop_reason"] == "cancelled"
    assert report is not None
    assert report["reason"] == "cancel"
    assert report["tokens_delivered"] >= 3
    assert report["provider"] == model


@pytest.mark.parametrize("model", ["busy", "busy529"])
async def test_a_provider_error_is_anthropics_error_event(tmp_path: Path, model: str) -> None:
    # Claude overloaded: an error event in its stream, or HTTP 529 with its envelope.
    async with _gateway(tmp_path) as g:
        async with g.sdk().messages.stream(model=model, max_tokens=100, messages=HI) as s:
            with pytest.raises(anthropic.APIStatusError) as caught:
                await s.get_final_message()
        body: Any = caught.value.body
        assert body["type"] == "error"
        assert body["error"]["type"] == "overloaded_error"
        assert body["error"]["code"] == "upstream_error"
        with pytest.raises(anthropic.APIStatusError) as whole:
            await g.sdk().messages.create(model=model, max_tokens=100, messages=HI)
        assert whole.value.status_code == 502
        whole_body: Any = whole.value.body
        assert whole_body["error"]["type"] == "overloaded_error"


async def test_refusals_are_in_anthropics_envelope(tmp_path: Path) -> None:
    async with _gateway(tmp_path, api_keys=(("alice", "key-alice-0123456789"),)) as g:
        # The key as the SDK sends it: x-api-key.
        good = g.sdk(api_key="key-alice-0123456789")
        message = await good.messages.create(model="claude", max_tokens=10, messages=HI)
        assert message.content
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await g.sdk(api_key="wrong").messages.create(model="claude", max_tokens=10, messages=HI)
        assert caught.value.body == {
            "type": "error",
            "error": {
                "type": "authentication_error",
                "message": "the API key is not valid",
                "code": "unauthorized",
            },
        }
        with pytest.raises(anthropic.NotFoundError):
            await good.messages.create(model="nope", max_tokens=10, messages=HI)
        with pytest.raises(anthropic.BadRequestError) as bad:
            await good.messages.create(model="claude", max_tokens=0, messages=HI)
        assert "max_tokens" in str(bad.value)
        # What Chat Completions cannot take, for the OpenAI-compatible provider only.
        with pytest.raises(anthropic.BadRequestError) as untranslatable:
            await good.messages.create(
                model="gpt", max_tokens=10, messages=HI, extra_body={"top_k": 5}
            )
        assert untranslatable.value.body["error"]["code"] == "not_translatable"  # type: ignore[index]
        await good.messages.create(
            model="claude", max_tokens=10, messages=HI, extra_body={"top_k": 5}
        )
        # Shapes the translation reads are checked: a 400, not a 500.
        with pytest.raises(anthropic.BadRequestError) as shape:
            await good.messages.create(
                model="gpt",
                max_tokens=10,
                messages=HI,
                extra_body={"thinking": {"type": "enabled", "budget_tokens": "many"}},
            )
        assert "thinking.budget_tokens" in str(shape.value)
        assert g.claude.requests[-1]["top_k"] == 5


async def test_count_tokens(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as g:
        counted = await g.sdk().messages.count_tokens(model="claude", messages=HI)
        assert counted.input_tokens == 4  # the simulator counts words
        assert g.claude.requests[-1]["model"] == "claude-sonnet-4-5"
        with pytest.raises(anthropic.NotFoundError) as caught:
            await g.sdk().messages.count_tokens(model="gpt", messages=HI)
        assert caught.value.body["error"]["code"] == "count_tokens_unavailable"  # type: ignore[index]


async def test_the_session_id_is_returned(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as g:
        response = await g.h.client.post(
            "/v1/messages",
            json={"model": "claude", "max_tokens": 10, "messages": HI},
            headers={"X-Session-Id": "session_messages_id"},
        )
        assert response.headers["x-session-id"] == "session_messages_id"
        response = await g.h.client.post(
            "/v1/messages", json={"model": "claude", "max_tokens": 10, "messages": HI}
        )
        assert response.headers["x-session-id"].startswith("gw-")


async def test_a_whole_answer_over_the_bound_is_a_502_and_closes_the_provider(
    tmp_path: Path,
) -> None:
    # GATEWAY_MAX_ANSWER_BYTES holds on /v1/messages as on /v1/chat/completions.
    async with _gateway(tmp_path, tokens=100_000, rate=0, max_answer_bytes=2048) as g:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await g.sdk().messages.create(model="claude", max_tokens=100_000, messages=HI)
        assert caught.value.status_code == 502
        body: Any = caught.value.body
        assert body["error"]["code"] == "answer_too_large"
        record = await closed_early(g.claude)
    assert len(record.text.encode()) > 2048


class _CountTokens:
    """A provider's /messages/count_tokens that never answers (``hang``) or answers a
    200 longer than the gateway reads (``huge``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.asked = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        self.asked.set()
        if self.mode == "hang":
            await anyio.sleep_forever()
        body = json.dumps({"input_tokens": 3, "padding": "x" * (128 * 1024)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("mode", ["hang", "huge"])
async def test_count_tokens_is_bounded_in_time_and_size(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short bound for the test: the gateway's is 10 s (provider/client.py).
    monkeypatch.setattr(client_module, "_JSON_TIMEOUT", 0.3)
    provider = _CountTokens(mode)
    async with replay.serving(provider) as url:
        path = tmp_path / "gateway.toml"
        path.write_text(
            f'[providers.claude]\nkind = "anthropic"\nbase_url = "{url}"\n'
            '[models.claude]\ntargets = [{ provider = "claude" }]\n'
        )
        async with Harness(config=str(path)) as h:
            with anyio.fail_after(WAIT):
                response = await h.client.post(
                    "/v1/messages/count_tokens", json={"model": "claude", "messages": HI}
                )
    assert provider.asked.is_set()
    assert response.status_code == 502
    error = response.json()["error"]
    # Not reachable in time, or an answer over 64 KiB: never passed on, never a hang.
    assert error["code"] == ("upstream_unavailable" if mode == "hang" else "upstream_error")
    assert error["type"] == "api_error"


async def test_field_shapes_are_checked(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as g:
        for field, value in (("tools", {"name": "x"}), ("system", 5), ("metadata", [])):
            response = await g.h.client.post(
                "/v1/messages",
                json={"model": "claude", "max_tokens": 10, "messages": HI, field: value},
            )
            assert response.status_code == 400, field
            assert response.json()["error"]["message"].startswith(f"{field} must be")
        assert not g.claude.records

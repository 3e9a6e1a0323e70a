"""The JavaScript SDKs, under Node: on ``/v1/chat/completions`` the ``openai`` npm
package and the Vercel AI SDK (``ai`` with ``@ai-sdk/openai-compatible``), on
``/v1/messages`` ``@anthropic-ai/sdk`` and ``@ai-sdk/anthropic``; each reading an
answer whole and aborting one with an ``AbortController``. The packages are pinned in
tests/sdk/package.json and installed (``npm ci``) on first use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.tools.simulator import Simulator, SimulatorConfig

from .harness import ASYNCIO_AND_TRIO, WAIT, Harness, closed_early, sim_config, simulators

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO, pytest.mark.slow]


async def _run(
    sdks: Path, sdk: str, h: Harness, abort_after: int | str, session_id: str, model: str = "m"
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{h.port}/v1"
    with anyio.fail_after(WAIT * 3):
        done = await anyio.run_process(
            ["node", str(sdks / "stream.mjs"), sdk, url, str(abort_after), session_id, model],
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("sdk", ["openai", "vercel"])
async def test_a_js_sdk_reads_a_whole_answer(node_sdks: Path, sdk: str) -> None:
    async with Harness(sim_config(tokens=15, rate=0)) as h:
        result = await _run(node_sdks, sdk, h, 0, f"session_js_whole_{sdk}")
        record = await h.record()
    assert result["text"] == record.text
    assert len(record.text.split()) == 15
    assert record.outcome == "completed"


@pytest.mark.parametrize("sdk", ["openai", "vercel"])
async def test_a_js_sdk_abort_closes_the_provider(
    node_sdks: Path, sdk: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Harness(sim_config(tokens=100_000, rate=100)) as h:
        sid = f"session_js_abort_{sdk}"
        result = await _run(node_sdks, sdk, h, 5, sid)
        assert result["aborted"] is True
        record = await h.record()
        await h.closed(record)
        assert record.outcome == "closed_by_client"
        assert record.sent < record.planned
        assert record.text.startswith(result["text"])
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=disconnect")


@pytest.mark.parametrize("sdk", ["openai", "vercel"])
async def test_a_js_sdk_reads_a_routed_and_a_fallbacks_answer_with_no_seam(
    node_sdks: Path, sdk: str, tmp_path: Path
) -> None:
    # The route's first provider answers 429; the second serves (docs/routing.md).
    configs = {"busy": sim_config(status=429), "healthy": sim_config(tokens=12, rate=0)}
    async with simulators(**configs) as served:
        config = tmp_path / "gateway.toml"
        config.write_text(
            "".join(
                f'[providers.{name}]\nbase_url = "http://127.0.0.1:{port}/v1"\n'
                for name, (_, port) in served.items()
            )
            + '[models.chat]\ntargets = [{ provider = "busy" }, { provider = "healthy" }]\n'
            + '[models.solo]\ntargets = [{ provider = "healthy", model = "h-1" }]\n'
        )
        async with Harness(config=str(config)) as h:
            result = await _run(node_sdks, sdk, h, 0, f"session_js_route_{sdk}", "chat")
            routed = await _run(node_sdks, sdk, h, 0, f"session_js_solo_{sdk}", "solo")
        fallback_record, routed_record = served["healthy"][0].records
    assert result["text"] == fallback_record.text
    assert len(fallback_record.text.split()) == 12
    assert result["aborted"] is False
    assert len(served["busy"][0].requests) == 1
    # A routed model without a fallback: the provider asked for the target's model.
    assert routed["text"] == routed_record.text
    assert routed_record.model == "h-1"


@asynccontextmanager
async def _claude_and_gpt(
    tmp_path: Path, answer: SimulatorConfig
) -> AsyncIterator[tuple[Harness, dict[str, Simulator]]]:
    """A gateway whose model ``claude`` goes to a simulator speaking Messages and ``gpt``
    to one speaking Chat Completions; the simulators by model."""
    async with simulators(claude=answer, gpt=answer) as served:
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[providers.claude]\nkind = "anthropic"\n'
            f'base_url = "http://127.0.0.1:{served["claude"][1]}/v1"\n'
            f'[providers.gpt]\nbase_url = "http://127.0.0.1:{served["gpt"][1]}/v1"\n'
            '[models.claude]\ntargets = [{ provider = "claude" }]\n'
            '[models.gpt]\ntargets = [{ provider = "gpt" }]\n'
        )
        async with Harness(config=str(config)) as h:
            yield h, {model: simulator for model, (simulator, _) in served.items()}


@pytest.mark.parametrize("sdk", ["anthropic", "vercel-anthropic"])
async def test_the_anthropic_js_sdks_read_v1_messages(
    node_sdks: Path, sdk: str, tmp_path: Path
) -> None:
    # @anthropic-ai/sdk and @ai-sdk/anthropic on /v1/messages, to Claude (the simulator
    # speaking Messages) and to an OpenAI-compatible provider.
    async with _claude_and_gpt(tmp_path, sim_config(tokens=12, rate=0)) as (h, by_model):
        for model, simulator in by_model.items():
            result = await _run(node_sdks, sdk, h, 0, f"s_js_{sdk}_{model}", model)
            [record] = simulator.records
            assert result["text"] == record.text
            assert len(record.text.split()) == 12
            assert result["stopReason"] == ("end_turn" if sdk == "anthropic" else "stop")
            assert record.path.endswith("/messages" if model == "claude" else "/completions")


@pytest.mark.parametrize("sdk", ["anthropic", "vercel-anthropic"])
async def test_an_anthropic_js_sdk_abort_closes_the_provider(
    node_sdks: Path, sdk: str, tmp_path: Path
) -> None:
    endless = sim_config(tokens=100_000, rate=100)
    async with _claude_and_gpt(tmp_path, endless) as (h, by_model):
        for model, simulator in by_model.items():
            result = await _run(node_sdks, sdk, h, 5, f"s_js_abort_{sdk}_{model}", model)
            assert result["aborted"] is True
            record = await closed_early(simulator)
            assert record.text.startswith(result["text"])


@pytest.mark.parametrize("sdk", ["anthropic", "vercel-anthropic"])
async def test_a_stop_ends_an_anthropic_js_sdks_loop_cleanly(
    node_sdks: Path, sdk: str, tmp_path: Path
) -> None:
    # The cancel endpoint, called while the SDK reads: its loop ends without an error.
    endless = sim_config(tokens=100_000, rate=100)
    async with _claude_and_gpt(tmp_path, endless) as (h, by_model):
        result = await _run(node_sdks, sdk, h, "c3", f"s_js_stop_{sdk}", "claude")
        record = await closed_early(by_model["claude"])
    assert result["cancelled"] == 200
    assert result["aborted"] is False
    assert result["stopReason"] == ("cancelled" if sdk == "anthropic" else "other")
    assert record.text.startswith(result["text"])
    assert result["parts"] >= 3


async def test_anthropics_npm_sdk_reads_whole_answers_with_thinking_and_a_tool(
    node_sdks: Path, tmp_path: Path
) -> None:
    async with _claude_and_gpt(tmp_path, sim_config(tokens=6, rate=0)) as (h, by_model):
        for model, simulator in by_model.items():
            result = await _run(node_sdks, "anthropic-whole", h, 0, f"s_js_whole_{model}", model)
            thought, called = simulator.records
            thinking, tool = result["thinking"], result["tool"]
            text = [b["text"] for b in thinking["content"] if b["type"] == "text"]
            assert text == [thought.text]
            assert thinking["stop_reason"] == "end_turn"
            assert thinking["usage"]["output_tokens"] == thought.sent
            if model == "claude":
                # Claude's thinking, with its signature; an OpenAI-compatible model that
                # does not think has none to give.
                first = thinking["content"][0]
                assert first["type"] == "thinking"
                assert first["thinking"] == thought.reasoning
                assert first["signature"]
            [block] = tool["content"]
            assert block["type"] == "tool_use"
            assert block["name"] == "search"
            assert json.dumps(block["input"]) == called.tool_arguments
            assert tool["stop_reason"] == "tool_use"

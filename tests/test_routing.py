"""Several providers behind one gateway (docs/routing.md): GATEWAY_CONFIG read and
refused, routes by model, fallback before the first delta and never after it, a
provider's own first-token timeout, a stop during an attempt, and the bytes each
provider receives. Real sockets: simulators and scripted providers, asyncio and Trio."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from gateway import ConfigError, Settings
from gateway.config import read_config
from gateway.provider.routing import Cooldown
from gateway.tools.simulator import Simulator
from gateway.web import stream as stream_module
from support.processes import ROOT

from .harness import (
    WAIT,
    Harness,
    established_to,
    openai_client,
    read_chunks,
    read_request,
    sim_config,
    simulators,
)

pytestmark = [pytest.mark.anyio, pytest.mark.asyncio_and_trio]


# --- the file -------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


GOOD = """
[providers.deepseek]
base_url = "https://api.deepseek.com/v1/"
api_key_env = "DEEPSEEK_API_KEY"
[providers.azure]
base_url = "https://example.openai.azure.com/openai/deployments/gpt4o"
api_key_env = "AZURE_OPENAI_KEY"
auth_header = "api-key"
query = { "api-version" = "2024-10-21" }
headers = { "X-Team" = "chat" }
first_token_timeout = 30
[providers.local]
base_url = "http://127.0.0.1:8001/v1"

[models.chat]
targets = [
  { provider = "deepseek", model = "deepseek-chat" },
  { provider = "local", model = "qwen3" },
]
[models.fast]
targets = [{ provider = "azure", model = "gpt-4o" }, { provider = "deepseek" }]
strategy = "hedge"
hedge_after = 0.5
fall_through = [401]
[models."*"]
targets = [{ provider = "local" }]
"""

KEYS = {"DEEPSEEK_API_KEY": "sk-deep", "AZURE_OPENAI_KEY": "az-key"}


def test_a_config_file_is_read_into_typed_providers_and_routes(tmp_path: Path) -> None:
    providers, routes = read_config(_write(tmp_path, GOOD), KEYS)
    by_name = {p.name: p for p in providers}
    assert by_name["deepseek"].base_url == "https://api.deepseek.com/v1"
    assert by_name["deepseek"].api_key == "sk-deep"
    azure = by_name["azure"]
    assert azure.base_url == (
        "https://example.openai.azure.com/openai/deployments/gpt4o?api-version=2024-10-21"
    )
    assert (azure.auth_header, azure.headers, azure.first_token_timeout) == (
        "api-key",
        (("X-Team", "chat"),),
        30.0,
    )
    assert by_name["local"].api_key is None
    chat, fast, rest = routes
    assert [(t.provider, t.model) for t in chat.targets] == [
        ("deepseek", "deepseek-chat"),
        ("local", "qwen3"),
    ]
    # A target without a model sends the route's name; the catch-all, the client's.
    assert [(t.provider, t.model) for t in fast.targets] == [
        ("azure", "gpt-4o"),
        ("deepseek", "fast"),
    ]
    assert (fast.strategy, fast.hedge_after, fast.fall_through) == ("hedge", 0.5, frozenset({401}))
    assert rest.name == "*"
    assert rest.targets[0].model is None
    settings = Settings.from_env({"GATEWAY_CONFIG": _write(tmp_path, GOOD), **KEYS})
    assert settings.model == "chat"  # a request without "model": the first route


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("[providers.local]", "[providers.local]\nbase = 1"),
            "[providers.\"local\"] unknown key 'base'",
        ),
        (('base_url = "http://127.0.0.1:8001/v1"', ""), '[providers."local"] base_url is required'),
        (('"DEEPSEEK_API_KEY"', '"NOT_SET_ANYWHERE"'), "api_key_env names NOT_SET_ANYWHERE"),
        (('provider = "local", model = "qwen3"', 'provider = "nope"'), "provider 'nope' is not"),
        (('strategy = "hedge"', 'strategy = "random"'), "strategy must be fallback or hedge"),
        (
            ("first_token_timeout = 30", "first_token_timeout = -1"),
            "first_token_timeout must be a positive",
        ),
        (('"X-Team" = "chat"', '"X-Team" = "a\\r\\nb"'), "has a line break"),
        (("fall_through = [401]", "fall_through = [500]"), "fall_through must be"),
        (
            ("[providers.local]", "[providers.local]\ncooldown_failures = 0"),
            "cooldown_failures must be a whole number >= 1",
        ),
        (("first_token_timeout = 30", "cooldown = 0"), "cooldown must be a positive"),
        (("[models.chat]", "[models.chat"), "not valid TOML"),
        (
            ('"https://api.deepseek.com/v1/"', '"ftp://x/v1"'),
            '[providers."deepseek"] base_url must be an http(s) URL',
        ),
    ],
)
def test_a_bad_file_stops_the_start_naming_table_and_key(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"GATEWAY_CONFIG": path, **KEYS})
    assert message in str(raised.value)
    assert path in str(raised.value) or "cannot read" in str(raised.value)


def test_the_default_model_is_gateway_model_or_the_first_route(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace('[models."*"]\ntargets = [{ provider = "local" }]\n', ""))
    assert Settings.from_env({"GATEWAY_CONFIG": path, **KEYS}).model == "chat"
    providers, routes = read_config(path, KEYS)
    # Built directly too, as tests and embedding apps do.
    assert Settings(providers=providers, routes=routes).model == "chat"
    assert (
        Settings.from_env({"GATEWAY_CONFIG": path, "GATEWAY_MODEL": "fast", **KEYS}).model == "fast"
    )
    with pytest.raises(ConfigError, match="GATEWAY_MODEL 'gpt-5' names no"):
        Settings.from_env({"GATEWAY_CONFIG": path, "GATEWAY_MODEL": "gpt-5", **KEYS})
    # With a catch-all, any model is served.
    path = _write(tmp_path, GOOD)
    assert (
        Settings.from_env({"GATEWAY_CONFIG": path, "GATEWAY_MODEL": "gpt-5", **KEYS}).model
        == "gpt-5"
    )


def test_the_file_and_the_upstream_variables_are_not_mixed(tmp_path: Path) -> None:
    env = {"GATEWAY_CONFIG": _write(tmp_path, GOOD), "GATEWAY_UPSTREAM_URL": "http://x/v1", **KEYS}
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env({**env, "GATEWAY_MODEL": "m"})
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_env({"GATEWAY_CONFIG": str(tmp_path / "missing.toml")})


# --- on sockets -----------------------------------------------------------------------


def _config(
    tmp_path: Path, served: dict[str, tuple[Simulator, int]], routes: str, **extra: str
) -> str:
    tables = []
    for name, (_, port) in served.items():
        tables.append(
            f'[providers.{name}]\nbase_url = "http://127.0.0.1:{port}/v1"\n{extra.get(name, "")}'
        )
    return _write(tmp_path, "\n".join(tables) + "\n" + routes)


async def _events(h: Harness, sid: str, model: str) -> list[Any]:
    async with h.stream(sid, model=model) as s:
        events = await s.rest()
    await h.ended(sid)
    return events


async def _closed(simulator: Simulator) -> str:
    """How the simulator's last stream ended, once it has."""
    record = simulator.records[-1]
    with anyio.fail_after(WAIT):
        await simulator.wait_until(lambda: record.outcome != "streaming")
    return record.outcome


async def _asked_once(simulator: Simulator) -> None:
    with anyio.fail_after(WAIT):
        await simulator.wait_until(lambda: len(simulator.records) == 1)


def _models_asked(simulator: Simulator) -> list[object]:
    return [r.get("model") for r in simulator.requests]


async def test_a_429_falls_back_to_the_next_target_with_no_seam(tmp_path: Path) -> None:
    async with simulators(busy=sim_config(status=429), healthy=sim_config(tokens=5)) as served:
        routes = (
            '[models.chat]\ntargets = [{ provider = "busy", model = "b-1" }, '
            '{ provider = "healthy", model = "h-1" }]\n'
        )
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            events = await _events(h, "route_429_fallback", "chat")
            assert [e.event for e in events] == ["start"] + ["token"] * 5 + ["done"]
            done = events[-1].data
            assert (done["provider"], done["provider_model"]) == ("healthy", "h-1")
            assert [
                (a["provider"], a["result"], a.get("upstream_status")) for a in done["attempts"]
            ] == [
                ("busy", "failed", 429),
                ("healthy", "served", None),
            ]
            assert _models_asked(served["busy"][0]) == ["b-1"]
            assert _models_asked(served["healthy"][0]) == ["h-1"]
            assert established_to(served["busy"][1]) == 0
            metrics = (await h.client.get("/metrics")).text
            failed = 'gateway_provider_failures_total{code="upstream_error",provider="busy"} 1.0'
            assert failed in metrics


async def test_a_400_does_not_fall_through_unless_the_route_says_so(tmp_path: Path) -> None:
    async with simulators(bad=sim_config(status=400), healthy=sim_config(tokens=3)) as served:
        routes = (
            '[models.strict]\ntargets = [{ provider = "bad" }, { provider = "healthy" }]\n'
            '[models.lenient]\ntargets = [{ provider = "bad" }, { provider = "healthy" }]\n'
            "fall_through = [400]\n"
        )
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            events = await _events(h, "route_400_strict", "strict")
            assert events[-1].event == "error"
            assert events[-1].data["upstream_status"] == 400
            assert [a["provider"] for a in events[-1].data["attempts"]] == ["bad"]
            assert _models_asked(served["healthy"][0]) == []
            events = await _events(h, "route_400_lenient", "lenient")
            assert events[-1].event == "done"
            assert events[-1].data["provider"] == "healthy"


async def test_a_failure_after_a_delta_is_the_streams_error_never_a_second_model(
    tmp_path: Path,
) -> None:
    async with simulators(
        broken=sim_config(tokens=50, reset_after=2), healthy=sim_config()
    ) as served:
        routes = '[models.chat]\ntargets = [{ provider = "broken" }, { provider = "healthy" }]\n'
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            events = await _events(h, "route_after_delta", "chat")
            assert [e.event for e in events] == ["start", "token", "token", "error"]
            assert events[-1].data["provider"] == "broken"
            assert [a["result"] for a in events[-1].data["attempts"]] == ["failed"]
            assert _models_asked(served["healthy"][0]) == []


@asynccontextmanager
async def _scripted(answer: bytes) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A provider that answers every request with ``answer`` and closes; the requests
    it read, whole."""
    requests: list[bytes] = []

    async def handle(stream: SocketStream) -> None:
        async with stream:
            got = await read_request(stream, b"")
            if got is not None:
                requests.append(got[0])
                await stream.send(answer)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port), requests
        tg.cancel_scope.cancel()


def _sse(*events: str) -> bytes:
    body = "".join(f"data: {e}\n\n" for e in events).encode()
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )


async def test_an_error_after_a_content_free_chunk_still_falls_back(tmp_path: Path) -> None:
    # Bifrost #5395's case: the failure comes after a first, content-free event (here
    # OpenAI's role-only chunk), before any delta.
    answer = _sse(
        '{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        '{"error":{"message":"overloaded","type":"server_error","code":"overloaded"}}',
    )
    async with (
        _scripted(answer) as (port, requests),
        simulators(healthy=sim_config(tokens=4)) as served,
    ):
        tables = (
            f'[providers.flaky]\nbase_url = "http://127.0.0.1:{port}/v1"\n'
            f'[providers.healthy]\nbase_url = "http://127.0.0.1:{served["healthy"][1]}/v1"\n'
            '[models.chat]\ntargets = [{ provider = "flaky" }, { provider = "healthy" }]\n'
        )
        async with Harness(config=_write(tmp_path, tables)) as h:
            events = await _events(h, "route_role_then_error", "chat")
            assert [e.event for e in events] == ["start"] + ["token"] * 4 + ["done"]
            assert [a["result"] for a in events[-1].data["attempts"]] == ["failed", "served"]
            assert len(requests) == 1


async def test_a_provider_silent_past_its_first_token_timeout_falls_back(tmp_path: Path) -> None:
    async with simulators(silent=sim_config(stall_after=0), healthy=sim_config(tokens=3)) as served:
        routes = '[models.chat]\ntargets = [{ provider = "silent" }, { provider = "healthy" }]\n'
        config = _config(tmp_path, served, routes, silent="first_token_timeout = 0.3")
        async with Harness(config=config) as h:
            started = anyio.current_time()
            events = await _events(h, "route_silent_first", "chat")
            assert anyio.current_time() - started < WAIT
            assert events[-1].event == "done"
            first, second = events[-1].data["attempts"]
            assert (first["provider"], first["result"], first["code"]) == (
                "silent",
                "failed",
                "first_token_timeout",
            )
            assert second["started_ms"] >= 300
            record = served["silent"][0].records[-1]
            assert record.outcome == "closed_by_client"
            assert established_to(served["silent"][1]) == 0


async def test_a_stop_during_an_attempt_closes_it_and_starts_no_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with simulators(silent=sim_config(stall_after=0), healthy=sim_config()) as served:
        routes = '[models.chat]\ntargets = [{ provider = "silent" }, { provider = "healthy" }]\n'
        config = _config(tmp_path, served, routes, silent="first_token_timeout = 30")
        async with Harness(config=config) as h:
            sid = "route_stop_during_attempt"
            async with h.stream(sid, model="chat") as s:
                assert (await s.next()) is not None  # start
                simulator, port = served["silent"]
                await _asked_once(simulator)
                assert (await h.cancel(sid)).status_code == 200
                # Closed before the cancel's 200.
                assert established_to(port) == 0
                events = await s.rest()
            assert events[-1].event == "stopped"
            assert [(a["provider"], a["result"]) for a in events[-1].data["attempts"]] == [
                ("silent", "stopped")
            ]
            assert _models_asked(served["healthy"][0]) == []
            await h.assert_ended_cleanly(caplog, sid, "reason=cancel")


async def test_models_no_route_serves_are_a_404_on_both_surfaces(tmp_path: Path) -> None:
    async with simulators(healthy=sim_config(tokens=2)) as served:
        routes = (
            '[models.chat]\ntargets = [{ provider = "healthy" }]\n'
            '[models."deepseek/r1:8b"]\ntargets = [{ provider = "healthy" }]\n'
        )
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            body = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
            for path in ("/api/chat/stream", "/v1/chat/completions"):
                response = await h.client.post(
                    path, json=body, headers={"X-Session-Id": "route_404_model"}
                )
                assert response.status_code == 404
                assert response.json()["error"]["code"] == "model_not_found"
            listed = (await h.client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in listed] == ["chat", "deepseek/r1:8b"]
            # The route's name is what the provider is asked for, when no model is set.
            events = await _events(h, "route_model_name", "deepseek/r1:8b")
            assert events[-1].event == "done"
            assert _models_asked(served["healthy"][0]) == ["deepseek/r1:8b"]


async def test_v1_is_routed_the_same_way(tmp_path: Path) -> None:
    async with simulators(busy=sim_config(status=503), healthy=sim_config(tokens=3)) as served:
        routes = '[models.chat]\ntargets = [{ provider = "busy" }, { provider = "healthy" }]\n'
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            response = await h.client.post(
                "/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Session-Id": "route_v1_whole"},
            )
            assert response.status_code == 200
            answer = response.json()
            assert answer["choices"][0]["message"]["content"]
            assert [a["provider"] for a in answer["gateway"]["attempts"]] == ["busy", "healthy"]


async def test_each_provider_receives_its_own_headers_query_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTE_TEST_AZURE_KEY", "az-secret-key")
    answer = _sse(
        '{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}', "[DONE]"
    )
    async with _scripted(answer) as (port, requests):
        config = _write(
            tmp_path,
            f'[providers.azure]\nbase_url = "http://127.0.0.1:{port}/openai/deployments/gpt4o"\n'
            'api_key_env = "ROUTE_TEST_AZURE_KEY"\nauth_header = "api-key"\n'
            'query = { "api-version" = "2024-10-21" }\nheaders = { "X-Team" = "chat" }\n'
            '[models.fast]\ntargets = [{ provider = "azure", model = "gpt-4o" }]\n',
        )
        async with Harness(config=config) as h:
            events = await _events(h, "route_azure_bytes", "fast")
            assert [e.event for e in events] == ["start", "token", "done"]
    [request] = requests
    head, _, body = request.partition(b"\r\n\r\n")
    line, *fields = head.decode().split("\r\n")
    assert line == "POST /openai/deployments/gpt4o/chat/completions?api-version=2024-10-21 HTTP/1.1"
    headers = {k.lower(): v for k, v in (f.split(": ", 1) for f in fields)}
    assert headers["api-key"] == "az-secret-key"
    assert "authorization" not in headers
    assert headers["x-team"] == "chat"
    assert json.loads(body)["model"] == "gpt-4o"


async def test_a_hedge_starts_the_next_target_and_closes_the_loser(tmp_path: Path) -> None:
    async with simulators(silent=sim_config(stall_after=0), healthy=sim_config(tokens=3)) as served:
        routes = (
            '[models.fast]\ntargets = [{ provider = "silent" }, { provider = "healthy" }]\n'
            'strategy = "hedge"\nhedge_after = 0.2\n'
        )
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            events = await _events(h, "route_hedge_loser", "fast")
            assert [e.event for e in events] == ["start"] + ["token"] * 3 + ["done"]
            first, second = events[-1].data["attempts"]
            assert (first["provider"], first["result"]) == ("silent", "hedge_lost")
            assert (second["provider"], second["result"]) == ("healthy", "served")
            assert second["started_ms"] >= 200
            assert events[-1].data["provider"] == "healthy"
            # The loser's connection was closed when the winner's first delta came.
            simulator, port = served["silent"]
            assert await _closed(simulator) == "closed_by_client"
            assert established_to(port) == 0
            metrics = (await h.client.get("/metrics")).text
            for line in (
                'gateway_provider_attempts_total{provider="silent",result="hedge_lost"} 1.0',
                'gateway_provider_attempts_total{provider="healthy",result="served"} 1.0',
                'gateway_provider_attempts_total{provider="healthy",result="failed"} 0.0',
                'gateway_provider_responses_open{provider="silent"} 0.0',
                'gateway_provider_responses_open{provider="healthy"} 0.0',
                'gateway_provider_time_to_first_delta_seconds_count{provider="healthy"} 1.0',
                'gateway_provider_failures_total{code="first_token_timeout",provider="silent"} 0.0',
            ):
                assert line in metrics, line


async def test_a_hedge_whose_first_target_answers_in_time_starts_no_other(tmp_path: Path) -> None:
    async with simulators(healthy=sim_config(tokens=3), spare=sim_config()) as served:
        routes = (
            '[models.fast]\ntargets = [{ provider = "healthy" }, { provider = "spare" }]\n'
            'strategy = "hedge"\nhedge_after = 5\n'
        )
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            events = await _events(h, "route_hedge_in_time", "fast")
            assert [a["provider"] for a in events[-1].data["attempts"]] == ["healthy"]
            assert _models_asked(served["spare"][0]) == []


async def test_a_stop_closes_both_hedged_attempts_before_its_200(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with simulators(one=sim_config(stall_after=0), two=sim_config(stall_after=0)) as served:
        routes = (
            '[models.fast]\ntargets = [{ provider = "one" }, { provider = "two" }]\n'
            'strategy = "hedge"\nhedge_after = 0.1\n'
        )
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            sid = "route_hedge_stopped"
            async with h.stream(sid, model="fast") as s:
                assert (await s.next()) is not None  # start
                for simulator, _ in served.values():
                    await _asked_once(simulator)
                assert sum(established_to(port) for _, port in served.values()) == 2
                assert (await h.cancel(sid)).status_code == 200
                assert sum(established_to(port) for _, port in served.values()) == 0
                events = await s.rest()
            assert events[-1].event == "stopped"
            assert [a["result"] for a in events[-1].data["attempts"]] == ["stopped", "stopped"]
            await h.assert_ended_cleanly(caplog, sid, "reason=cancel")


def test_a_cooldown_opens_after_n_failures_in_its_window_and_probes_once() -> None:
    cooldown = Cooldown(failures=2, window=10.0, pause=30.0)
    assert cooldown.take(0.0) is False
    cooldown.settle(False, 0.0, False)
    # The first failure left the window before the second came.
    assert cooldown.take(11.0) is False
    cooldown.settle(False, 11.0, False)
    assert not cooldown.cooling(11.5)
    cooldown.settle(False, 12.0, False)
    assert cooldown.cooling(12.0)
    assert cooldown.take(41.9) is None
    # Past the pause: one probe, and the others still skip the provider.
    assert cooldown.take(42.0) is True
    assert cooldown.take(42.0) is None
    cooldown.settle(False, 43.0, True)
    assert cooldown.take(72.9) is None
    assert cooldown.take(73.0) is True
    # A probe that was stopped says nothing: the next stream probes.
    cooldown.settle(None, 73.5, True)
    assert cooldown.take(74.0) is True
    cooldown.settle(True, 75.0, True)
    assert not cooldown.cooling(75.0)
    assert cooldown.take(75.0) is False


async def test_a_provider_cooling_down_is_skipped_by_the_next_streams(tmp_path: Path) -> None:
    async with simulators(busy=sim_config(status=429), healthy=sim_config(tokens=2)) as served:
        routes = '[models.chat]\ntargets = [{ provider = "busy" }, { provider = "healthy" }]\n'
        extra = "cooldown_failures = 2\ncooldown_window = 60\ncooldown = 60"
        async with Harness(config=_config(tmp_path, served, routes, busy=extra)) as h:
            results = []
            for i in range(3):
                events = await _events(h, f"route_cooldown_{i}", "chat")
                assert events[-1].event == "done"
                results.append([a["result"] for a in events[-1].data["attempts"]])
            assert results == [["failed", "served"], ["failed", "served"], ["cooldown", "served"]]
            assert len(served["busy"][0].requests) == 2


def test_the_worked_example_of_the_docs_is_a_valid_file(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "routing.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    keys = {
        "DEEPSEEK_API_KEY": "k1",
        "OPENAI_API_KEY": "k2",
        "AZURE_OPENAI_KEY": "k3",
        "ANTHROPIC_API_KEY": "k4",
    }
    providers, routes = read_config(_write(tmp_path, example), keys)
    assert [p.name for p in providers] == ["deepseek", "openai", "vllm", "azure", "claude"]
    assert [r.name for r in routes] == ["chat", "fast", "claude", "deepseek-reasoner", "*"]
    assert providers[-1].kind == "anthropic"


@asynccontextmanager
async def _two_hedged_attempts(
    tmp_path: Path, sid: str, **settings: Any
) -> AsyncIterator[tuple[Harness, Any, dict[str, tuple[Simulator, int]]]]:
    """A stream whose route has two hedged attempts open, neither sending a delta."""
    async with simulators(one=sim_config(stall_after=0), two=sim_config(stall_after=0)) as served:
        routes = (
            '[models.fast]\ntargets = [{ provider = "one" }, { provider = "two" }]\n'
            'strategy = "hedge"\nhedge_after = 0.05\n'
        )
        async with (
            Harness(config=_config(tmp_path, served, routes), **settings) as h,
            h.stream(sid, model="fast") as s,
        ):
            assert (await s.next()) is not None  # start
            for simulator, _ in served.values():
                await _asked_once(simulator)
            yield h, s, served


def _closed_at(served: dict[str, tuple[Simulator, int]]) -> list[float]:
    return [simulator.records[-1].ended_at or 0.0 for simulator, _ in served.values()]


async def test_a_client_that_leaves_closes_both_hedged_attempts(tmp_path: Path) -> None:
    sid = "route_hedge_disconnect"
    async with _two_hedged_attempts(tmp_path, sid) as (h, s, served):
        await s.response.aclose()  # the client goes: a disconnect
        for simulator, port in served.values():
            assert await _closed(simulator) == "closed_by_client"
            assert established_to(port) == 0
        await h.ended(sid)
        assert h.registry.get(sid) is None


async def test_shutdown_closes_both_hedged_attempts(tmp_path: Path) -> None:
    sid = "route_hedge_shutdown"
    async with _two_hedged_attempts(tmp_path, sid) as (h, s, served):
        t0 = time.monotonic()
        await h.shutdown()
        events = await s.rest()
        assert events[-1].event == "stopped"
        assert events[-1].data["reason"] == "shutdown"
        for simulator, _ in served.values():
            assert await _closed(simulator) == "closed_by_client"
        assert max(_closed_at(served)) - t0 < 1.0


async def test_the_total_timeout_closes_both_hedged_attempts(tmp_path: Path) -> None:
    sid = "route_hedge_total"
    async with _two_hedged_attempts(tmp_path, sid, max_duration=0.5) as (_, s, served):
        events = await s.rest()
        assert events[-1].event == "stopped"
        assert (events[-1].data["reason"], events[-1].data["detail"]) == ("timeout", "total")
        assert [a["result"] for a in events[-1].data["attempts"]] == ["stopped", "stopped"]
        for simulator, port in served.values():
            assert await _closed(simulator) == "closed_by_client"
            assert established_to(port) == 0


async def test_one_target_keeps_the_watchdogs_first_token_timeout_with_its_own_value(
    tmp_path: Path,
) -> None:
    async with simulators(silent=sim_config(stall_after=0)) as served:
        routes = '[models.chat]\ntargets = [{ provider = "silent" }]\n'
        config = _config(tmp_path, served, routes, silent="first_token_timeout = 0.3")
        async with Harness(config=config) as h:
            started = time.monotonic()
            events = await _events(h, "route_one_first_token", "chat")
            assert 0.3 <= time.monotonic() - started < WAIT
            assert (events[-1].data["reason"], events[-1].data["detail"]) == (
                "timeout",
                "first_token",
            )


# The SDK leaves its own async generator to the garbage collector at [DONE]; Trio warns
# (as in tests/test_openai_endpoint.py).
@pytest.mark.filterwarnings("ignore:Async generator 'openai._streaming.:ResourceWarning")
async def test_the_openai_sdk_gets_a_fallbacks_answer_with_no_seam(tmp_path: Path) -> None:
    configs = {"busy": sim_config(status=503), "healthy": sim_config(tokens=6)}
    async with simulators(**configs) as served:
        routes = '[models.chat]\ntargets = [{ provider = "busy" }, { provider = "healthy" }]\n'
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            client = openai_client(h)
            messages: Any = [{"role": "user", "content": "hi"}]
            stream = await client.chat.completions.create(
                model="chat", messages=messages, stream=True
            )
            chunks = await read_chunks(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            whole = await client.chat.completions.create(model="chat", messages=messages)
            await client.close()
        streamed_record, whole_record = served["healthy"][0].records
        assert text == streamed_record.text
        assert whole.choices[0].message.content == whole_record.text
        assert len(served["busy"][0].requests) == 2


async def test_simulated_providers_play_a_fallback_and_only_they_hear_whose_session_it_is(
    tmp_path: Path,
) -> None:
    answer = _sse(
        '{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}', "[DONE]"
    )
    async with _scripted(answer) as (port, requests):
        config = _write(
            tmp_path,
            "[providers.busy]\nsimulate = { status = 429 }\n"
            "[providers.healthy]\nsimulate = { tokens = 3, rate = 200.0 }\n"
            f'[providers.real]\nbase_url = "http://127.0.0.1:{port}/v1"\n'
            '[models.chat]\ntargets = [{ provider = "busy" }, { provider = "healthy" }]\n'
            '[models.real]\ntargets = [{ provider = "real" }]\n',
        )
        async with Harness(config=config) as h:
            sid = "route_simulated_pair"
            events = await _events(h, sid, "chat")
            assert [e.event for e in events] == ["start"] + ["token"] * 3 + ["done"]
            assert [a["result"] for a in events[-1].data["attempts"]] == ["failed", "served"]
            demo = (await h.client.get(f"/api/demo/provider/{sid}")).json()
            assert (demo["generated"], demo["outcome"]) == (3, "completed")
            assert (await _events(h, "route_real_provider", "real"))[-1].event == "done"
    [request] = requests
    head = request.partition(b"\r\n\r\n")[0].lower()
    assert b"x-principal" not in head
    assert b"x-session-id" not in head


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('simulate = { status = "x" }', "simulate.status must be a int"),
        ("simulate = { colour = 1 }", "simulate has an unknown key 'colour'"),
        ('simulate = {}\nbase_url = "http://x/v1"', "not both"),
    ],
)
def test_a_bad_simulate_table_is_refused(tmp_path: Path, table: str, message: str) -> None:
    path = _write(
        tmp_path, f'[providers.p]\n{table}\n[models.m]\ntargets = [{{ provider = "p" }}]\n'
    )
    with pytest.raises(ConfigError, match=message):
        read_config(path, {})


async def test_a_stop_between_two_attempts_starts_no_further_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop lands exactly between the attempts: planted where the relay notes the
    # first one's failure, before the next target would start.
    async with simulators(busy=sim_config(status=503), healthy=sim_config()) as served:
        routes = '[models.chat]\ntargets = [{ provider = "busy" }, { provider = "healthy" }]\n'
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            sid = "route_stop_between"
            log_next = stream_module._log_next

            def stop_then_log(session: Any, provider: Any, why: str) -> None:
                assert session.cancel("cancel")
                log_next(session, provider, why)

            monkeypatch.setattr(stream_module, "_log_next", stop_then_log)
            events = await _events(h, sid, "chat")
            assert events[-1].event == "stopped"
            assert [a["result"] for a in events[-1].data["attempts"]] == ["failed"]
            assert _models_asked(served["healthy"][0]) == []
            assert len(served["busy"][0].requests) == 1


async def test_hedged_attempts_that_both_miss_their_first_token_end_the_stream_closed(
    tmp_path: Path,
) -> None:
    async with simulators(one=sim_config(stall_after=0), two=sim_config(stall_after=0)) as served:
        routes = (
            '[models.fast]\ntargets = [{ provider = "one" }, { provider = "two" }]\n'
            'strategy = "hedge"\nhedge_after = 0.05\n'
        )
        silent = "first_token_timeout = 0.3"
        config = _config(tmp_path, served, routes, one=silent, two=silent)
        async with Harness(config=config) as h:
            events = await _events(h, "route_hedge_first_token", "fast")
            assert (events[-1].data["reason"], events[-1].data["detail"]) == (
                "timeout",
                "first_token",
            )
            attempts = events[-1].data["attempts"]
            assert [(a["result"], a["code"]) for a in attempts] == [
                ("failed", "first_token_timeout"),
                ("failed", "first_token_timeout"),
            ]
            for simulator, port in served.values():
                assert await _closed(simulator) == "closed_by_client"
                assert established_to(port) == 0


async def test_a_stop_after_a_hedged_winners_first_delta_closes_the_winner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The winner then goes quiet: only the cancel path's own abort can close it now.
    quiet = sim_config(tokens=1000, stall_after=2, keepalive_interval=30)
    async with simulators(silent=sim_config(stall_after=0), healthy=quiet) as served:
        routes = (
            '[models.fast]\ntargets = [{ provider = "silent" }, { provider = "healthy" }]\n'
            'strategy = "hedge"\nhedge_after = 0.05\n'
        )
        async with Harness(config=_config(tmp_path, served, routes)) as h:
            sid = "route_hedge_winner_stopped"
            async with h.stream(sid, model="fast") as s:
                await s.tokens_at_least(2)
                simulator, port = served["healthy"]
                assert (await h.cancel(sid)).status_code == 200
                assert established_to(port) == 0
                assert await _closed(simulator) == "closed_by_client"
                events = await s.rest()
            assert events[-1].event == "stopped"
            assert events[-1].data["provider"] == "healthy"
            await h.assert_ended_cleanly(caplog, sid, "reason=cancel")

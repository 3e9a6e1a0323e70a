"""Faults at scale, on real processes and sockets: a SIGTERM with 500 live streams,
1,000 clients disconnecting at the same moment, and a slowloris client."""

from __future__ import annotations

import signal
import time
from typing import Any

import anyio
import httpx2 as httpx
import pytest

from gateway.server.serve import load_config
from gateway.tools.simulator import Simulator, SimulatorConfig

from .harness import (
    WAIT,
    Harness,
    end_lines_by_session,
    established_to,
    serve_until,
    sim_config,
    worker_class,
)
from .processes import Gateway

pytestmark = pytest.mark.anyio


@pytest.mark.slow
async def test_sigterm_with_500_live_streams(anyio_backend: Any) -> None:
    worker = worker_class(anyio_backend)  # the gateway's worker class follows the test's
    streams = 500
    provider = Simulator(SimulatorConfig(tokens=100_000, rate=2.0, keepalive_interval=1.0))
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        config = load_config(bind=["127.0.0.1:0"], graceful_timeout=1.0, accesslog=None)
        [(_, port)] = await tg.start(serve_until, provider, config, stop.wait)
        gateway = await anyio.to_thread.run_sync(
            lambda: Gateway(
                worker, GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{port}/v1", GATEWAY_MODEL="m"
            )
        )
        stopped_at: dict[str, float] = {}
        reasons: list[str] = []
        first_tokens = anyio.Event()
        got_first = 0
        try:
            limits = httpx.Limits(max_connections=streams + 10)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60, limits=limits) as c:

                async def one(i: int) -> None:
                    nonlocal got_first
                    sid = f"session_1_term{i:05d}"
                    body = {"messages": [{"role": "user", "content": "x"}]}
                    async with c.stream(
                        "POST", "/api/chat/stream", headers={"X-Session-Id": sid}, json=body
                    ) as response:
                        seen_token = False
                        async for line in response.aiter_lines():
                            if line == "event: token" and not seen_token:
                                seen_token = True
                                got_first += 1
                                if got_first == streams:
                                    first_tokens.set()
                            if line.startswith("data: {") and '"status":"stopped"' in line:
                                stopped_at[sid] = time.monotonic()
                                reasons.append(line)

                async with anyio.create_task_group() as clients:
                    with anyio.fail_after(60):
                        for i in range(streams):
                            clients.start_soon(one, i)
                            if i % 100 == 99:  # a hundred at a time: the listen backlog
                                await provider.wait_until(
                                    lambda n=i: provider.live > n  # type: ignore[misc]
                                )
                        await first_tokens.wait()
                    assert provider.live == streams
                    gateway.process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(lambda: gateway.process.wait(WAIT))
        finally:
            await anyio.to_thread.run_sync(gateway.stop)
            stop.set()
    assert code == 0
    assert len(stopped_at) == streams
    assert all('"reason":"shutdown"' in line for line in reasons)
    # Each provider stream was closed before its client was told it stopped: the
    # gateway closes the provider first, then writes the terminal event.
    records = {r.id: r for r in provider.records}
    assert len(records) == streams
    assert all(r.outcome == "closed_by_client" for r in records.values())
    latest_close = max(r.ended_at or 0.0 for r in records.values())
    assert latest_close <= max(stopped_at.values())
    shutdown_lines = [line for line in gateway.lines if "stopped reason=shutdown" in line]
    assert len(shutdown_lines) == streams
    assert not any("Traceback" in line for line in gateway.lines)


async def test_1000_clients_disconnecting_at_once(caplog: pytest.LogCaptureFixture) -> None:
    streams = 1000
    async with Harness(sim_config(tokens=100_000, rate=1.0, keepalive_interval=5.0)) as h:
        limits = httpx.Limits(max_connections=streams + 10)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{h.port}", timeout=60, limits=limits
        ) as client:
            all_started = anyio.Event()
            go = anyio.Event()
            started = 0

            async def one(i: int) -> None:
                nonlocal started
                body = {"messages": [{"role": "user", "content": "x"}]}
                headers = {"X-Session-Id": f"session_1_mass{i:05d}"}
                async with client.stream(
                    "POST", "/api/chat/stream", headers=headers, json=body
                ) as response:
                    lines = response.aiter_lines()
                    while await anext(lines) != "event: token":
                        pass
                    started += 1
                    if started == streams:
                        all_started.set()
                    await go.wait()
                # Leaving the block closes the connection: the disconnect.

            async with anyio.create_task_group() as tg:
                # Opened a hundred at a time (the listen backlog); closed all at once.
                # Under Trio, with the gateway, the simulator and 1000 clients on one
                # loop, opening them took 27-68 s on a loaded 2-core machine (at 2a0d629
                # as now): the bound catches a hang, not slowness.
                with anyio.fail_after(150):
                    for i in range(streams):
                        tg.start_soon(one, i)
                        if i % 100 == 99:
                            await h.simulator.wait_until(
                                lambda n=i: h.simulator.live > n  # type: ignore[misc]
                            )
                    await all_started.wait()
                assert len(h.registry) == streams
                sessions = [h.registry.get(f"session_1_mass{i:05d}") for i in range(streams)]
                go.set()
        with anyio.fail_after(WAIT):
            for session in sessions:
                assert session is not None
                await session.ended.wait()
            await h.simulator.wait_until(lambda: h.simulator.live == 0)
        assert len(h.registry) == 0
        assert established_to(h.sim_port) <= 100  # only idle pooled connections
        ends = end_lines_by_session(caplog.records)
        for i in range(streams):
            lines = ends.get(f"session_1_mass{i:05d}", [])
            assert len(lines) == 1
            assert "reason=disconnect" in lines[0]


async def test_a_slowloris_client_is_dropped_and_disturbs_nothing() -> None:
    # Headers sent a byte at a time, never finished: hypercorn closes the connection
    # at its keep-alive timeout, and streams meanwhile go on.
    async with Harness(sim_config(tokens=10_000, rate=100)) as h:
        slow = await anyio.connect_tcp("127.0.0.1", h.port)
        async with slow, h.stream("session_1_normal00") as s:
            await slow.send(b"POST /api/chat/stream HTTP/1.1\r\nhost: x\r\nx-pad: ")
            started = anyio.current_time()
            dropped_after = None
            with anyio.move_on_after(20):
                try:
                    while True:
                        await slow.send(b"x")
                        await anyio.sleep(0.05)  # the trickle is the attack
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    dropped_after = anyio.current_time() - started
            assert dropped_after is not None
            assert len(h.registry) == 1
            await s.tokens_at_least(5)
            assert (await h.cancel("session_1_normal00")).status_code == 200
            await s.rest()

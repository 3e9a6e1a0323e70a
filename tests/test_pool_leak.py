"""httpx or httpx2? Chosen by this test (docs/architecture.md).

Phase A: long streams share a small pool and are cancelled at random moments
(waiting for a slot, connecting, waiting for headers, reading the body). Every
stream the provider started must be closed, and no connection left open.

Phase B: short requests churn through the pool, each cancelled within a few
milliseconds; this hits the window where the pool has handed a fresh connection
to a request that is cancelled before it connects (encode/httpcore #1093, #830).
Then a full pool's worth of streams must be open at the same moment: a single
leaked slot makes one of them fail with PoolTimeout.

httpx 0.28.1 / httpcore 1.0.9 leaks every slot in phase B on each run (measured:
10 of 10 slots stuck CONNECTING after 2,000 requests, 8 of 8 runs); httpx2 leaks none.
The gateway's own transport (gateway/provider/transport.py), used on the hot path, must
pass the same test.
"""

from __future__ import annotations

import importlib
import random
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx
import pytest

from gateway.provider.transport import HTTP1Transport

from .harness import WAIT, Harness, sim_config

pytestmark = pytest.mark.anyio

POOL = 10
BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}


async def _storm(
    client: Any, url: str, rng: random.Random, count: int, max_delay: float, read: bool
) -> None:
    async def one(delay: float) -> None:
        with anyio.move_on_after(delay):
            async with client.stream("POST", url, json=BODY) as response:
                if read:
                    async for _ in response.aiter_raw():
                        pass
                else:
                    await response.aread()

    for _ in range(count // 20):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one, rng.uniform(0.0, max_delay))


async def _check_library(name: str, transport: Any = None) -> None:
    lib = importlib.import_module(name)
    rng = random.Random(7)
    async with Harness(sim_config(tokens=10_000, rate=500, headers_delay=0.005)) as h:
        url = f"http://127.0.0.1:{h.sim_port}/v1/chat/completions"
        client = lib.AsyncClient(
            limits=lib.Limits(max_connections=POOL, max_keepalive_connections=POOL),
            timeout=lib.Timeout(5.0, pool=1.0),
            transport=transport,
        )
        async with client:
            # Phase A
            await _storm(client, url, rng, count=200, max_delay=0.08, read=True)
            with anyio.fail_after(WAIT):
                await h.simulator.wait_until(lambda: h.simulator.live == 0)
            assert h.upstream_connections() == 0

            # Phase B
            h.simulator.config = sim_config(tokens=1, rate=0)
            await _storm(client, url, rng, count=2000, max_delay=0.004, read=False)
            h.simulator.config = sim_config(tokens=10_000, rate=10)
            async with AsyncExitStack() as stack:
                responses = [
                    await stack.enter_async_context(client.stream("POST", url, json=BODY))
                    for _ in range(POOL)
                ]
                assert [r.status_code for r in responses] == [200] * POOL


async def test_httpx2_leaks_no_slot_and_no_connection() -> None:
    await _check_library("httpx2")


async def test_the_gateway_transport_leaks_no_slot_and_no_connection() -> None:
    await _check_library("httpx2", HTTP1Transport(max_connections=POOL, max_keepalive=POOL))


@pytest.mark.xfail(
    raises=httpx.PoolTimeout,
    strict=True,
    reason="httpcore 1.0.9 leaks pool slots on cancellation (encode/httpcore#1093)",
)
async def test_httpx_leaks_slots_under_cancellation() -> None:
    await _check_library("httpx")

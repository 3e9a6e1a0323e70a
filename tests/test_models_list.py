"""``GET /v1/models`` against a hostile provider's model list (issue 33): a gzip bomb,
a body without end, nesting deeper than Python's stack. The list is read as sent and
bounded by ``GATEWAY_MAX_MODELS_BYTES``; what cannot be read is no list, cached like
one; a stream on the same worker goes on meanwhile."""

from __future__ import annotations

import contextlib
import gzip
import time
from typing import Any

import anyio
import anyio.lowlevel
import httpx2 as httpx
import pytest
from starlette.types import Receive, Scope, Send

from gateway.tools.simulator import Simulator, SimulatorConfig

from . import replay
from .harness import ASYNCIO_AND_TRIO, WAIT, traced_peak, worker_class
from .processes import rss_growth

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO]

# How long a stream on the same worker may go without a token while the list is read.
_GAP = 0.1


class HostileModels:
    """The simulator, but ``GET <base>/models`` answers ``body`` with ``headers``, or,
    with ``endless``, 1 MiB chunks until the reader goes or 64 MiB are written."""

    def __init__(
        self,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        endless: bool = False,
    ) -> None:
        self.simulator = Simulator(SimulatorConfig(tokens=100_000, rate=100))
        self.body = body
        self.headers = [(b"content-type", b"application/json"), *(headers or [])]
        self.endless = endless
        self.asked = 0
        self.written = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/models"):
            await self.simulator(scope, receive, send)
            return
        self.asked += 1
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        if not self.endless:
            await send({"type": "http.response.body", "body": self.body})
            return
        chunk = b" " * (1024 * 1024)
        gone = anyio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            # Until the reader goes: on asyncio hypercorn's send() does not fail after
            # it has, on Trio it raises.
            with contextlib.suppress(Exception):  # trio.ClosedResourceError, or anyio's
                while self.written < 64 * 1024 * 1024 and not gone.is_set():
                    body = {"type": "http.response.body", "body": chunk, "more_body": True}
                    await send(body)
                    self.written += len(chunk)
                    await anyio.lowlevel.checkpoint()
                if not gone.is_set():
                    await send({"type": "http.response.body", "body": b""})
            tg.cancel_scope.cancel()


async def _list_beside_a_stream(provider: HostileModels, **settings: Any) -> tuple[Any, float, int]:
    """List the models twice while a stream runs on the same gateway; the list, the
    longest gap between that stream's tokens meanwhile, and the peak of what Python
    allocated in this process (gateway, provider and clients) while listing."""
    async with (
        replay.replaying(provider, **settings) as h,
        h.stream("session_models_bystander") as s,
    ):
        await s.tokens_at_least(3)
        before = len(s.events)
        with traced_peak() as traced, anyio.fail_after(WAIT):
            first = await h.client.get("/v1/models")
            second = await h.client.get("/v1/models")
        await s.tokens_at_least(len(s.tokens) + 3)
        assert (await h.cancel("session_models_bystander")).status_code == 200
        await s.rest()
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    return first.json(), s.longest_token_gap(before), traced.bytes


# Timed against a bound (100 ms): alone on the machine, in make test's serial half.
@pytest.mark.slow
async def test_a_gzip_bombed_model_list_is_not_decoded(caplog: pytest.LogCaptureFixture) -> None:
    # A valid list hidden in 64 MiB of spaces, gzipped to a few hundred KB. Before, such
    # a list was decoded: with 256 MiB the gateway went to 844 MiB and every stream on
    # the worker stalled 1.4 s.
    bomb = gzip.compress(b'{"data": [{"id": "x"}]' + b" " * (64 * 1024 * 1024) + b"}", 1)
    provider = HostileModels(bomb, [(b"content-encoding", b"gzip")])
    started = time.monotonic()
    listing, gap, peak = await _list_beside_a_stream(provider)
    assert time.monotonic() - started < WAIT
    assert [m["id"] for m in listing["data"]] == ["sim-model"]
    assert gap < _GAP, gap
    # The default bound is 1 MiB and the bomb is never inflated.
    print(f"peak {peak / 2**20:.1f} MiB traced while listing a gzip bomb")
    assert peak < 8 * 1024 * 1024, peak
    assert provider.asked == 1  # the failure is cached like a list
    assert any("gzip-encoded" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
async def test_the_gateway_process_lists_a_gzip_bomb_within_its_bound(anyio_backend: Any) -> None:
    # What the issue measured (844 MiB before): the resident memory of a `gateway serve`
    # process, from /proc, with the default bound.
    bomb = gzip.compress(b'{"data": [{"id": "x"}]' + b" " * (256 * 1024 * 1024) + b"}", 1)
    provider = HostileModels(bomb, [(b"content-encoding", b"gzip")])

    async def ask(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/v1/models")

    async with replay.serving(provider) as url:
        listing, growth = await rss_growth(worker_class(anyio_backend), url, ask)
    assert listing.status_code == 200
    assert [m["id"] for m in listing.json()["data"]] == ["sim-model"]
    assert provider.asked == 1
    assert growth < 4 * 1024 * 1024, growth


# Timed against a bound (100 ms): alone on the machine, in make test's serial half.
@pytest.mark.slow
async def test_a_model_list_without_end_is_read_up_to_its_bound() -> None:
    # Before: read whole (a 1 GiB body took the gateway to 1,085 MiB).
    provider = HostileModels(endless=True)
    listing, gap, peak = await _list_beside_a_stream(provider, max_models_bytes=256 * 1024)
    assert [m["id"] for m in listing["data"]] == ["sim-model"]
    assert gap < _GAP, gap
    # The provider's own 1 MiB writes and the sockets' buffers included.
    print(f"peak {peak / 2**20:.1f} MiB traced while listing an endless body")
    assert peak < 16 * 1024 * 1024, peak
    assert provider.asked == 1
    # The gateway stopped reading at the bound and closed: the provider could write
    # no more than the bound and the sockets' buffers took.
    assert provider.written < 32 * 1024 * 1024, provider.written


async def test_a_model_list_nested_past_the_stack_is_no_list_not_a_500() -> None:
    # Before: RecursionError escaped, a 500 with a traceback on every call, not cached.
    provider = HostileModels(b"[" * 100_000 + b"]" * 100_000)
    listing, _, _ = await _list_beside_a_stream(provider)
    assert [m["id"] for m in listing["data"]] == ["sim-model"]
    assert provider.asked == 1

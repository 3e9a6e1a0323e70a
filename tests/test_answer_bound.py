"""``stream: false`` holds the whole answer: it is bounded by
``GATEWAY_MAX_ANSWER_BYTES`` (issue 33). Before, a 400 MiB answer took the gateway from
55 MiB to 2 GiB, and joining 300 MiB stalled every other stream on the worker for 3 s."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx2 as httpx
import pytest

from .harness import (
    ASYNCIO_AND_TRIO,
    WAIT,
    Harness,
    end_lines,
    sim_config,
    traced_peak,
    worker_class,
)
from .processes import rss_growth

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO]

_PIECE = 64 * 1024
_GAP = 0.1
# The answer the provider would write if it were left to: the 400 MiB.
_ANSWER = 400 * 1024 * 1024


class LongAnswer:
    """A provider on a raw socket (hypercorn's Trio worker raises in its own connection
    task when its client closes in the middle of long writes, which the gateway does
    here by design): every request is answered with up to 400 MiB of content, in 64 KiB
    deltas of two-byte characters, until the reader goes."""

    def __init__(self) -> None:
        self.written = 0
        self.ended = anyio.Event()
        self.port = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._answer)

    async def _answer(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head.lower()).group(1))  # type: ignore[union-attr]
            while len(body) < length:
                body += await stream.receive()
            chunk = {"choices": [{"index": 0, "delta": {"content": "é" * (_PIECE // 2)}}]}
            event = b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
            framed = b"%x\r\n%s\r\n" % (len(event), event)
            try:
                await stream.send(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                while self.written < _ANSWER:
                    await stream.send(framed)
                    self.written += len(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the reader went
            finally:
                self.ended.set()


@asynccontextmanager
async def _long_answers(**settings: Any) -> AsyncIterator[tuple[LongAnswer, Harness]]:
    provider = LongAnswer()
    async with anyio.create_task_group() as tg:
        await tg.start(provider.serve)
        try:
            async with Harness(
                upstream_url=f"http://127.0.0.1:{provider.port}/v1", **settings
            ) as h:
                yield provider, h
        finally:
            tg.cancel_scope.cancel()


# Timed against a bound (100 ms): alone on the machine, in make test's serial half.
@pytest.mark.slow
async def test_a_whole_answer_over_the_bound_is_an_error_and_the_provider_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bound = 2 * 1024 * 1024
    async with (
        _long_answers(max_answer_bytes=bound) as (provider, h),
        Harness(sim_config(tokens=100_000, rate=100)) as other,
        other.stream("session_bound_bystander") as bystander,
    ):
        await bystander.tokens_at_least(3)
        before = len(bystander.events)
        # Everything Python allocates in this process while the answer is refused (the
        # gateway, the bystander's and the client's buffers): the bound, not the answer.
        with traced_peak() as traced, anyio.fail_after(WAIT):
            response = await h.client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Write long."}]},
                headers={"X-Session-Id": "session_bound_whole"},
            )
        peak = traced.bytes
        await bystander.tokens_at_least(len(bystander.tokens) + 3)
        assert (await other.cancel("session_bound_bystander")).status_code == 200
        await bystander.rest()
        with anyio.fail_after(WAIT):
            await provider.ended.wait()
        await h.assert_ended_cleanly(caplog, "session_bound_whole", "failed code=answer_too_large")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "answer_too_large"
    assert "GATEWAY_MAX_ANSWER_BYTES" in error["message"]
    # The provider was closed at the bound: it wrote the bound, a delta, and what the
    # sockets' buffers took, not its 400 MiB.
    assert provider.written < bound + 16 * 1024 * 1024, provider.written
    print(f"peak {peak / 2**20:.1f} MiB traced while a {bound / 2**20:.0f} MiB bound refused")
    assert peak < 4 * bound, peak
    gap = bystander.longest_token_gap(before)
    assert gap < _GAP, gap
    [line] = end_lines(caplog.records, "session_bound_whole")
    assert "failed code=answer_too_large" in line


@pytest.mark.slow
async def test_the_gateway_process_refuses_a_400_mib_answer_within_its_default_bound(
    anyio_backend: Any,
) -> None:
    # What the issue measured: the resident memory of a `gateway serve` process (55 MiB
    # to 2 GiB before), here with the default bound, measured from /proc.
    bound = 8 * 1024 * 1024
    provider = LongAnswer()

    async def ask(client: httpx.AsyncClient) -> httpx.Response:
        response = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Write long."}]},
            headers={"X-Session-Id": "session_bound_process"},
        )
        await provider.ended.wait()
        return response

    async with anyio.create_task_group() as tg:
        await tg.start(provider.serve)
        url = f"http://127.0.0.1:{provider.port}/v1"
        response, growth = await rss_growth(worker_class(anyio_backend), url, ask)
        tg.cancel_scope.cancel()
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "answer_too_large"
    # The provider was closed at the bound, not after its 400 MiB.
    assert provider.written < 2 * bound, provider.written
    assert growth < 3 * bound, growth


async def test_a_streamed_answer_is_not_bounded() -> None:
    # Streamed, nothing is held: the same answer goes on past the bound.
    async with (
        _long_answers(max_answer_bytes=1024 * 1024) as (_, h),
        h.stream("session_bound_streamed") as s,
    ):
        with anyio.fail_after(WAIT):
            while sum(len(t.encode()) for t in s.tokens) < 4 * 1024 * 1024:
                await s.next()
        # The client reads on while its Stop is answered, as a browser does: one that
        # stops reading holds a Trio relay in its (shielded) write up to the send
        # timeout, and the cancel's answer with it (tests/test_shutdown.py).
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.rest)
            assert (await h.cancel("session_bound_streamed")).status_code == 200
    assert s.events[-1].event == "stopped"

"""``stream: false`` holds the whole answer: it is bounded by
``GATEWAY_MAX_ANSWER_BYTES`` (issue 33). Before, a 400 MiB answer took the gateway from
55 MiB to 2 GiB, and joining 300 MiB stalled every other stream on the worker for 3 s."""

from __future__ import annotations

import itertools
import json

import anyio
import anyio.lowlevel
import pytest
from starlette.types import Receive, Scope, Send

from . import replay
from .harness import WAIT, Harness, end_lines, sim_config

pytestmark = pytest.mark.anyio

_PIECE = 64 * 1024
_GAP = 0.1


class LongAnswer:
    """A provider whose answer is up to 64 MiB of content, in 64 KiB deltas of
    two-byte characters; it stops writing when the reader goes."""

    def __init__(self) -> None:
        self.written = 0
        self.ended = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        chunk = {"choices": [{"index": 0, "delta": {"content": "é" * (_PIECE // 2)}}]}
        event = b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
        gone = anyio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                # Until the reader goes: hypercorn's send() does not fail after it has.
                while self.written < 64 * 1024 * 1024 and not gone.is_set():
                    body = {"type": "http.response.body", "body": event, "more_body": True}
                    await send(body)
                    self.written += len(event)
                    await anyio.lowlevel.checkpoint()
                if not gone.is_set():
                    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
                tg.cancel_scope.cancel()
        finally:
            self.ended.set()


async def test_a_whole_answer_over_the_bound_is_an_error_and_the_provider_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = LongAnswer()
    bound = 2 * 1024 * 1024
    async with (
        replay.replaying(provider, max_answer_bytes=bound) as h,
        Harness(sim_config(tokens=100_000, rate=100)) as other,
        other.stream("session_bound_bystander") as bystander,
    ):
        await bystander.tokens_at_least(3)
        before = len(bystander.events)
        with anyio.fail_after(WAIT):
            response = await h.client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Write long."}]},
                headers={"X-Session-Id": "session_bound_whole"},
            )
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
    # sockets' buffers took, not its 64 MiB.
    assert provider.written < bound + 16 * 1024 * 1024, provider.written
    times = [e.at for e in bystander.events[before - 1 :] if e.event == "token"]
    gap = max(b - a for a, b in itertools.pairwise(times))
    assert gap < _GAP, gap
    [line] = end_lines(caplog.records, "session_bound_whole")
    assert "failed code=answer_too_large" in line


async def test_a_streamed_answer_is_not_bounded() -> None:
    # Streamed, nothing is held: the same answer goes on past the bound.
    provider = LongAnswer()
    async with (
        replay.replaying(provider, max_answer_bytes=1024 * 1024) as h,
        h.stream("session_bound_streamed") as s,
    ):
        with anyio.fail_after(WAIT):
            while sum(len(t.encode()) for t in s.tokens) < 4 * 1024 * 1024:
                await s.next()
        assert (await h.cancel("session_bound_streamed")).status_code == 200
        await s.rest()
    assert s.events[-1].event == "stopped"

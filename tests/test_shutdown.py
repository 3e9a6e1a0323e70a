"""Server shutdown and clients that stop reading: the provider is always closed."""

from __future__ import annotations

import time

import anyio
import pytest

from .harness import WAIT, Harness, sim_config, without_timings

pytestmark = pytest.mark.anyio


async def test_shutdown_stops_every_stream_first(caplog: pytest.LogCaptureFixture) -> None:
    async with Harness(sim_config(tokens=10_000)) as h:
        async with h.stream("session_shut_a") as a, h.stream("session_shut_b") as b:
            await a.tokens_at_least(2)
            await b.tokens_at_least(2)
            records = list(h.simulator.records)
            t0 = time.monotonic()
            await h.shutdown()
            rest_a, rest_b = await a.rest(), await b.rest()
        for reader, rest in ((a, rest_a), (b, rest_b)):
            assert rest[-1].event == "stopped"
            assert without_timings(rest[-1].data) == {
                "status": "stopped",
                "reason": "shutdown",
                "tokens_delivered": len(reader.tokens),
                "reasoning_delivered": 0,
                "tool_calls_delivered": 0,
                "refusal_delivered": 0,
            }
        for record in records:
            await h.closed(record)
            assert record.outcome == "closed_by_client"
            assert record.ended_at is not None
            assert record.ended_at - t0 < 0.1
        with anyio.fail_after(WAIT):
            await h.served.wait()
        for sid in ("session_shut_a", "session_shut_b"):
            await h.assert_ended_cleanly(caplog, sid, "stopped reason=shutdown")


async def test_server_hard_cancel_goes_through_the_same_cleanup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Plain hypercorn cancels the request task itself at graceful_timeout: the
    provider is closed, the client still gets `stopped`, one line is logged."""
    sid = "session_hard_cancel"
    async with Harness(
        sim_config(tokens=10_000), graceful_timeout=0.3, stop_streams_first=False
    ) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(2)
            record = await h.record()
            await h.shutdown()
            rest = await s.rest()
        assert rest[-1].event == "stopped"
        assert rest[-1].data["reason"] == "shutdown"
        assert rest[-1].data["tokens_delivered"] == len(s.tokens)
        await h.closed(record)
        assert record.outcome == "closed_by_client"
        with anyio.fail_after(WAIT):
            await h.served.wait()
        await h.assert_ended_cleanly(caplog, sid, "stopped reason=shutdown")


async def test_new_stream_while_shutting_down_is_503() -> None:
    async with Harness() as h:
        h.registry.closing = True
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_late_1"},
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "shutting_down"
        assert (await h.client.get("/healthz")).status_code == 503
        h.registry.closing = False


async def test_client_that_stops_reading_releases_the_provider(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The provider is closed once a send has been stuck for send_timeout.

    On asyncio the stuck send is interrupted and the client's connection closed.
    Under Trio, hypercorn shields socket writes, so the request task stays in its
    send until the client reads or goes away; the provider is closed all the same.
    """
    sid = "session_no_reader"
    big = "x" * 8192
    async with Harness(sim_config(tokens=5000, rate=0, token_text=big), send_timeout=0.5) as h:
        with h.stalled_reader(sid):
            record = await h.record()
            await h.closed(record)
            assert record.outcome == "closed_by_client"
            assert 0 < record.sent < record.planned
            assert record.ended_at is not None
            assert record.last_token_at is not None
            # The provider stalls when the pipe fills; the send times out 0.5 s later.
            assert record.ended_at - record.last_token_at < 0.5 + 0.4
            await h.assert_ended_cleanly(caplog, sid, "timed out reason=send")


async def test_a_stuck_send_is_not_taken_for_a_quiet_provider(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the relay is blocked writing to a client that stopped reading, it reads
    nothing from the provider: that silence is the send timeout's, even when the idle
    timeout is the shorter of the two."""
    sid = "session_slow_reader"
    big = "x" * 8192
    async with Harness(
        sim_config(tokens=5000, rate=0, token_text=big), idle_timeout=0.3, send_timeout=0.8
    ) as h:
        with h.stalled_reader(sid):
            record = await h.closed(await h.record())
            assert record.outcome == "closed_by_client"
            assert 0 < record.sent < record.planned
            await h.assert_ended_cleanly(caplog, sid, "timed out reason=send")


async def test_a_client_that_reads_nothing_while_the_provider_is_quiet_ends_at_idle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that has vanished without a FIN (half-open) reads nothing. While the
    provider is quiet nothing fills the socket buffer, so no send gets stuck: the idle
    timeout ends the stream, and the provider is closed then."""
    sid = "session_half_open"
    async with Harness(
        sim_config(tokens=100, stall_after=2, keepalive_interval=0.05),
        idle_timeout=0.4,
        ping_interval=0.1,
    ) as h:
        with h.stalled_reader(sid):
            record = await h.closed(await h.record())
            assert record.outcome == "closed_by_client"
            assert record.sent == 2
            assert record.ended_at is not None
            assert record.last_token_at is not None
            late = record.ended_at - (record.last_token_at + 0.4)
            assert -0.02 < late < 0.2
            await h.assert_ended_cleanly(caplog, sid, "timed out reason=idle")

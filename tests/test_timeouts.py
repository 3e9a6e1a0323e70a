"""Every timeout goes through the one cancellation path and closes the provider on time."""

from __future__ import annotations

import time

import anyio
import pytest

from .harness import Harness, sim_config, without_timings

pytestmark = pytest.mark.anyio


def _closed_on_time(closed: float, asked: float, reached: float, timeout: float) -> None:
    """The gateway's clock for a stream starts between the test sending the request
    (``asked``) and the provider receiving it (``reached``); on a busy machine the two
    can be 100 ms apart. So the provider must be closed no earlier than the earliest
    possible deadline, and within 100 ms of the latest."""
    assert closed >= asked + timeout - 0.005, closed - (asked + timeout)
    assert closed < reached + timeout + 0.1, closed - (reached + timeout)


async def test_idle_timeout_fires_despite_keepalives(caplog: pytest.LogCaptureFixture) -> None:
    sid = "session_idle_1"
    # After 5 tokens the provider stalls but keeps sending `: keep-alive` comments.
    async with Harness(
        sim_config(tokens=100, stall_after=5, keepalive_interval=0.02), idle_timeout=0.3
    ) as h:
        async with h.stream(sid) as s:
            events = await s.rest()
        record = await h.closed(await h.record())
        assert record.outcome == "closed_by_client"
        assert record.sent == 5
        assert record.last_token_at is not None
        assert record.ended_at is not None
        # The trigger is the idle deadline: last delta + idle_timeout.
        late = record.ended_at - (record.last_token_at + 0.3)
        assert -0.02 < late < 0.1
        assert events[-1].event == "stopped"
        assert without_timings(events[-1].data) == {
            "status": "stopped",
            "reason": "timeout",
            "detail": "idle",
            "tokens_delivered": 5,
            "reasoning_delivered": 0,
            "tool_calls_delivered": 0,
            "refusal_delivered": 0,
        }
        await h.assert_ended_cleanly(caplog, sid, "timed out reason=idle")


async def test_first_token_timeout(caplog: pytest.LogCaptureFixture) -> None:
    sid = "session_first_1"
    async with Harness(
        sim_config(queue_seconds=30, keepalive_interval=0.02),
        first_token_timeout=0.3,
        idle_timeout=0.05,
    ) as h:
        asked_at = time.monotonic()
        async with h.stream(sid) as s:
            events = await s.rest()
        record = await h.closed(await h.record())
        assert record.sent == 0
        assert record.ended_at is not None
        _closed_on_time(record.ended_at, asked_at, record.started_at, 0.3)
        assert events[-1].data == {
            "status": "stopped",
            "reason": "timeout",
            "detail": "first_token",
            "tokens_delivered": 0,
            "reasoning_delivered": 0,
            "tool_calls_delivered": 0,
            "refusal_delivered": 0,
            "first_delta_ms": {},
        }
        await h.assert_ended_cleanly(caplog, sid, "timed out reason=first_token")


async def test_total_timeout(caplog: pytest.LogCaptureFixture) -> None:
    sid = "session_total_1"
    async with Harness(sim_config(tokens=10_000, rate=100), max_duration=0.5) as h:
        asked_at = time.monotonic()
        async with h.stream(sid) as s:
            events = await s.rest()
        record = await h.closed(await h.record())
        assert record.ended_at is not None
        _closed_on_time(record.ended_at, asked_at, record.started_at, 0.5)
        assert 0 < record.sent < record.planned
        stopped = events[-1]
        assert stopped.data["reason"] == "timeout"
        assert stopped.data["detail"] == "total"
        assert stopped.data["tokens_delivered"] == len(s.tokens)
        await h.assert_ended_cleanly(caplog, sid, "timed out reason=total")


async def test_pings_are_sent_while_the_provider_is_quiet() -> None:
    async with (
        Harness(sim_config(queue_seconds=0.5, keepalive_interval=0.02), ping_interval=0.1) as h,
        h.stream("session_pings_1") as s,
    ):
        await s.until(lambda e: e.event == "token")
        assert s.comments.count("ping") >= 2
        await s.rest()


async def test_first_token_before_timeout_switches_to_idle_deadline() -> None:
    """A first token at 0.1 s moves the deadline to idle (0.2 s later), not first_token (5 s)."""
    async with Harness(
        sim_config(tokens=100, queue_seconds=0.1, stall_after=1, keepalive_interval=0.02),
        first_token_timeout=5,
        idle_timeout=0.2,
    ) as h:
        async with h.stream("session_switch") as s:
            with anyio.fail_after(2):
                events = await s.rest()
        assert events[-1].data["detail"] == "idle"


async def test_idle_timeout_fires_when_the_provider_goes_silent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = "session_idle_silent"
    # keepalive_interval=0: no keep-alive comments at all, plain silence.
    async with Harness(
        sim_config(tokens=100, stall_after=3, keepalive_interval=0), idle_timeout=0.3
    ) as h:
        async with h.stream(sid) as s:
            events = await s.rest()
        record = await h.closed(await h.record())
        assert record.outcome == "closed_by_client"
        assert record.sent == 3
        assert events[-1].data["detail"] == "idle"
        await h.assert_ended_cleanly(caplog, sid, "timed out reason=idle")

"""Resume after a dropped connection (GATEWAY_RESUME_WINDOW > 0): no event lost or
doubled, the window's end stops the provider, a Stop still works, a newer client
supersedes an older one; on asyncio, uvloop and Trio."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from .harness import EventReader, Harness, LogWatch, SSEEvent, end_lines, sim_config

pytestmark = pytest.mark.anyio

WINDOW = 5.0


@asynccontextmanager
async def _resume(h: Harness, sid: str, after: int, **headers: str) -> AsyncIterator[EventReader]:
    async with h.client.stream(
        "GET",
        f"/api/chat/stream/{sid}",
        headers={"Last-Event-ID": str(after), **headers},
    ) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        yield EventReader(response)


def _last_id(events: list[SSEEvent]) -> int:
    ids = [int(e.id) for e in events if e.id is not None]
    return ids[-1] if ids else 0


async def test_two_hundred_drops_lose_and_double_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = "session_resume_many"
    rng = random.Random(20261123)
    async with Harness(sim_config(tokens=3000, rate=1000), resume_window=WINDOW) as h:
        seen: list[SSEEvent] = []
        async with h.stream(sid) as s:
            await s.until(lambda e: e.event == "token" and rng.random() < 0.2)
            seen += s.events
        cycles = 0
        while seen[-1].event not in ("done", "stopped", "error"):
            cycles += 1
            async with _resume(h, sid, _last_id(seen)) as s:
                if cycles < 200:
                    # Leave after a few events, or at once: a drop at any point.
                    for _ in range(rng.randrange(0, 12)):
                        if await s.next() is None:
                            break
                else:
                    await s.rest()
                seen += s.events
        record = await h.closed(await h.record())
    ids = [int(e.id) for e in seen if e.id is not None]
    assert ids == list(range(1, len(ids) + 1)), "an event lost or doubled"
    assert cycles >= 200
    assert seen[-1].event == "done"
    assert "".join(e.data["delta"] for e in seen if e.event == "token") == record.text
    assert record.outcome == "completed"
    assert len(end_lines(caplog.records, sid)) == 1


async def test_the_window_ending_closes_the_provider_on_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = "session_resume_expire"
    window = 0.4
    async with Harness(sim_config(tokens=100_000, rate=50), resume_window=window) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(3)
            left = time.monotonic()
        record = await h.closed(await h.record())
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=disconnect")
        assert record.ended_at is not None
        # The gateway sees the close a moment after the client makes it.
        late = record.ended_at - (left + window)
        assert 0 <= late < 0.1, late
        gone = await h.client.get(f"/api/chat/stream/{sid}", headers={"Last-Event-ID": "1"})
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "not_resumable"
    assert any(f"[SSE] {sid} parked" in r.getMessage() for r in caplog.records)


async def test_a_stop_while_parked_closes_the_provider_before_the_200() -> None:
    sid = "session_resume_stop"
    async with Harness(sim_config(tokens=100_000, rate=50), resume_window=WINDOW) as h:
        with LogWatch(f"[SSE] {sid} parked") as parked:
            async with h.stream(sid) as s:
                await s.tokens_at_least(3)
                seen = list(s.events)
            await parked.wait()
        record = await h.record()
        response = await h.cancel(sid)
        answered = time.monotonic()
        assert response.status_code == 200
        assert record.outcome == "closed_by_client"
        assert record.ended_at is not None
        assert record.ended_at <= answered
        # Within the window, the rest replays up to the stop.
        async with _resume(h, sid, _last_id(seen)) as s:
            rest = await s.rest()
    assert rest[-1].event == "stopped"
    assert rest[-1].data["reason"] == "cancel"
    tokens = [e for e in seen + rest if e.event == "token"]
    assert rest[-1].data["tokens_delivered"] == len(tokens)


async def test_a_newer_client_supersedes_the_older_and_a_stop_ends_it() -> None:
    sid = "session_resume_newer"
    harness = Harness(sim_config(tokens=100_000, rate=100), resume_window=WINDOW)
    async with harness as h, h.stream(sid) as old:
        await old.tokens_at_least(3)
        async with _resume(h, sid, _last_id(old.events)) as new:
            await new.tokens_at_least(2)
            ended = await old.rest()
            assert ended[-1].event == "stopped"
            assert ended[-1].data == {"status": "stopped", "reason": "superseded"}
            assert ended[-1].id is None
            record = await h.record()
            response = await h.cancel(sid)
            answered = time.monotonic()
            assert response.status_code == 200
            assert record.ended_at is not None
            assert record.ended_at <= answered
            rest = await new.rest()
    assert rest[-1].event == "stopped"
    assert rest[-1].data["reason"] == "cancel"
    ids = [int(e.id) for e in old.events + new.events if e.id is not None]
    # The older client's events, then the newer one's from where the older stopped
    # reading when it resumed: each once.
    assert ids == sorted(set(ids))


async def test_a_full_buffer_while_parked_stops_the_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = "session_resume_full"
    async with Harness(
        sim_config(tokens=100_000, rate=1000), resume_window=WINDOW, resume_buffer_bytes=4096
    ) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(1)
        record = await h.closed(await h.record())
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=disconnect")
        gone = await h.client.get(f"/api/chat/stream/{sid}")
    assert record.outcome == "closed_by_client"
    assert gone.status_code == 404


async def test_a_stream_that_ended_in_the_window_replays_to_its_end() -> None:
    sid = "session_resume_ended"
    async with Harness(sim_config(tokens=40, rate=100), resume_window=WINDOW) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(2)
            seen = list(s.events)
        record = await h.closed(await h.record())
        assert record.outcome == "completed"
        await h.ended(sid)
        async with _resume(h, sid, _last_id(seen)) as s:
            rest = await s.rest()
    assert rest[-1].event == "done"
    tokens = "".join(e.data["delta"] for e in seen + rest if e.event == "token")
    assert tokens == record.text


async def test_resume_is_refused_when_off_unknown_or_another_principals() -> None:
    keys = (("alice", "alice-key-0123456789"), ("bob", "bob-key-01234567890"))
    alice = {"Authorization": f"Bearer {keys[0][1]}"}
    bob = {"Authorization": f"Bearer {keys[1][1]}"}
    async with (
        Harness(sim_config(tokens=100_000, rate=50), resume_window=WINDOW, api_keys=keys) as h,
        h.stream("session_resume_owned", headers=alice) as s,
    ):
        await s.tokens_at_least(1)
        other = await h.client.get("/api/chat/stream/session_resume_owned", headers=bob)
        unknown = await h.client.get("/api/chat/stream/session_resume_nobody", headers=alice)
        bad = await h.client.get(
            "/api/chat/stream/session_resume_owned",
            headers={**alice, "Last-Event-ID": "x1"},
        )
        ahead = await h.client.get(
            "/api/chat/stream/session_resume_owned",
            headers={**alice, "Last-Event-ID": "999999"},
        )
    async with Harness(sim_config(tokens=3, rate=0)) as h, h.stream("session_resume_off0") as s:
        await s.tokens_at_least(1)
        off = await h.client.get("/api/chat/stream/session_resume_off0")
    for response in (other, unknown, ahead, off):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_resumable"
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_last_event_id"

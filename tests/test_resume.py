"""Resume after a dropped connection (GATEWAY_RESUME_WINDOW > 0): no event lost or
doubled, the window's end stops the provider, a Stop still works, a newer client
supersedes an older one; on asyncio, uvloop and Trio."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.session import Mark, Session
from gateway.resume.log import EventLog, ResumeStore
from gateway.tools.simulator import SimulatorConfig

from .harness import (
    ASYNCIO_AND_TRIO,
    WAIT,
    EventReader,
    Harness,
    LogWatch,
    SSEEvent,
    end_lines,
    sim_config,
)
from .test_cluster import BODY, _cluster

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
            read = len(s.tokens)
            left = time.monotonic()
        record = await h.closed(await h.record())
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=disconnect")
        # Counted: what was written to the client, not what the provider made meanwhile.
        [line] = end_lines(caplog.records, sid)
        logged = int(line.split(" tokens=")[1].split()[0])
        assert read <= logged < record.sent
        assert record.ended_at is not None
        # The gateway sees the close a moment after the client makes it, on its loop's
        # clock: uvloop's is libuv's, cached each iteration in whole milliseconds, so it
        # can read up to 1 ms behind time.monotonic().
        late = record.ended_at - (left + window)
        assert -0.002 <= late < 0.1, late
        gone = await h.client.get(f"/api/chat/stream/{sid}", headers={"Last-Event-ID": "1"})
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "not_resumable"
    assert any(f"[SSE] {sid} parked" in r.getMessage() for r in caplog.records)


async def test_a_resumable_stream_pings_its_client_while_the_provider_is_quiet() -> None:
    """The follower writes its own pings (the log keeps none), as a stream that is not
    resumable does (test_timeouts.py)."""
    async with (
        Harness(
            sim_config(queue_seconds=0.5, keepalive_interval=0.02),
            ping_interval=0.1,
            resume_window=WINDOW,
        ) as h,
        h.stream("session_resume_pings") as s,
    ):
        await s.until(lambda e: e.event == "token")
        assert s.comments.count("ping") >= 2
        await s.rest()


async def test_a_resumable_stream_does_not_ping_while_its_tokens_flow() -> None:
    """A ping is for a quiet stream: the watchdog counts the interval from the
    follower's last write. With a token every 20 ms and pings every 0.2 s, a ping
    takes a stall of 0.2 s; counting from the stream's start, there would be six."""
    async with (
        Harness(sim_config(tokens=60, rate=50), ping_interval=0.2, resume_window=WINDOW) as h,
        h.stream("session_resume_no_pings") as s,
    ):
        await s.rest()
    assert s.events[-1].event == "done"
    assert s.comments.count("ping") <= 1, s.comments


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
        after = _last_id(old.events)
        async with _resume(h, sid, after) as new:
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
    old_ids = [int(e.id) for e in old.events if e.id is not None]
    new_ids = [int(e.id) for e in new.events if e.id is not None]
    # Each client's events once and in order: the older's from the start, the newer's
    # from the id it resumed after. (The older may read a few past that id before it
    # is told it was superseded: both then have those.)
    assert old_ids == list(range(1, old_ids[-1] + 1))
    assert new_ids == list(range(after + 1, new_ids[-1] + 1))


async def test_a_client_superseded_while_the_provider_is_quiet_is_told_at_once() -> None:
    """Not at the provider's next token: that one comes ten seconds later."""
    sid = "session_resume_newer_quiet"
    harness = Harness(sim_config(tokens=2, rate=0.1), resume_window=WINDOW)
    async with harness as h, h.stream(sid) as old:
        await old.tokens_at_least(1)
        async with _resume(h, sid, _last_id(old.events)) as new:
            ended = await old.rest()
            record = await h.record()
            assert record.sent == 1
            assert (await h.cancel(sid)).status_code == 200
            rest = await new.rest()
    assert ended[-1].data == {"status": "stopped", "reason": "superseded"}
    assert rest[-1].data["reason"] == "cancel"


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


# -- across instances: two `gateway serve` processes and one redis-server ---------------


@asynccontextmanager
async def _get(
    client: httpx.AsyncClient, url: str, sid: str, after: int
) -> AsyncIterator[EventReader]:
    async with client.stream(
        "GET", f"{url}/api/chat/stream/{sid}", headers={"Last-Event-ID": str(after)}
    ) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        yield EventReader(response)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")
@pytest.mark.slow
async def test_resumes_on_either_instance_lose_and_double_nothing(anyio_backend: Any) -> None:
    rng = random.Random(11)
    sid = "session_resume_cluster"
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        c.provider.config = SimulatorConfig(tokens=2500, rate=500)
        a = await c.gateway(GATEWAY_RESUME_WINDOW="10")
        b = await c.gateway(GATEWAY_RESUME_WINDOW="10")
        seen: list[SSEEvent] = []
        async with client.stream(
            "POST", f"{a.url}/api/chat/stream", headers={"X-Session-Id": sid}, json=BODY
        ) as response:
            reader = EventReader(response)
            await reader.until(lambda e: e.event == "token")
            seen += reader.events
        cycles = 0
        while seen[-1].event not in ("done", "stopped", "error"):
            cycles += 1
            url = rng.choice([a.url, b.url])
            async with _get(client, url, sid, _last_id(seen)) as s:
                for _ in range(rng.randrange(0, 10) if cycles < 200 else 100_000):
                    if await s.next() is None:
                        break
                seen += s.events
            assert cycles < 400, "the answer never ended"
        record = c.provider.records[-1]
    ids = [int(e.id) for e in seen if e.id is not None]
    assert ids == list(range(1, len(ids) + 1)), "an event lost or doubled"
    assert seen[-1].event == "done"
    assert "".join(e.data["delta"] for e in seen if e.event == "token") == record.text
    assert cycles >= 200
    assert any(f"{sid} resumed after id" in line and "another instance" in line for line in b.lines)


@ASYNCIO_AND_TRIO
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")
@pytest.mark.slow
async def test_resumes_elsewhere_after_a_redis_stall_are_whole_or_a_503(anyio_backend: Any) -> None:
    """Redis paused mid-stream (SIGSTOP) past GATEWAY_REDIS_TIMEOUT, so the owner's
    appends time out and are retried while the ones that timed out are applied when it
    wakes. Before: overlapping entries, and resumes elsewhere got 200 with ids 1-22 and
    no end, or a 404. Now each of 200 resumes on the other instance replays every event
    after its Last-Event-ID exactly once, in order, to the end, or answers 503."""
    rng = random.Random(33)
    sid = "session_resume_stall"
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        c.provider.config = SimulatorConfig(tokens=600, rate=150)
        a = await c.gateway(GATEWAY_RESUME_WINDOW="10")
        b = await c.gateway(GATEWAY_RESUME_WINDOW="10")
        assert c.redis.process is not None
        async with client.stream(
            "POST", f"{a.url}/api/chat/stream", headers={"X-Session-Id": sid}, json=BODY
        ) as response:
            reader = EventReader(response)
            await reader.until(lambda e: e.event == "token")
            c.redis.process.send_signal(signal.SIGSTOP)
            try:
                # 2.7 s: past the bound on every Redis answer (0.5 s; the mirror's own
                # was 2 s before), so the owner's appends time out and are retried.
                await reader.tokens_at_least(len(reader.tokens) + 400)
            finally:
                c.redis.process.send_signal(signal.SIGCONT)
            await reader.rest()
        assert reader.events[-1].event == "done"
        last = int(reader.events[-1].id or 0)
        answers: dict[int, int] = {}
        for _ in range(200):
            after = rng.randrange(0, last)
            response = await client.get(
                f"{b.url}/api/chat/stream/{sid}", headers={"Last-Event-ID": str(after)}
            )
            answers[response.status_code] = answers.get(response.status_code, 0) + 1
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "resume_unavailable"
                assert response.headers["retry-after"] == "1"
                continue
            assert response.status_code == 200, response.text
            ids = [int(line[4:]) for line in response.text.split("\n") if line.startswith("id: ")]
            assert ids == list(range(after + 1, last + 1)), (after, ids[:5], ids[-5:])
            assert "event: done" in response.text
    assert set(answers) <= {200, 503}
    assert answers.get(200, 0) > 0


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")
@pytest.mark.slow
async def test_a_follower_on_another_instance_pings_its_client_between_tokens(
    anyio_backend: Any,
) -> None:
    sid = "session_resume_remote_pings"
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        # A token every half second; the instance resumed on pings every tenth.
        c.provider.config = SimulatorConfig(tokens=6, rate=2)
        a = await c.gateway(GATEWAY_RESUME_WINDOW="10")
        b = await c.gateway(GATEWAY_RESUME_WINDOW="10", GATEWAY_PING_INTERVAL="0.1")
        async with client.stream(
            "POST", f"{a.url}/api/chat/stream", headers={"X-Session-Id": sid}, json=BODY
        ) as response:
            reader = EventReader(response)
            await reader.until(lambda e: e.event == "token")
        async with _get(client, b.url, sid, _last_id(reader.events)) as s:
            await s.rest()
    assert s.events[-1].event == "done"
    assert s.comments.count("ping") >= 2


@ASYNCIO_AND_TRIO
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")
@pytest.mark.slow
async def test_a_follower_on_another_instance_that_stops_reading_is_let_go(
    anyio_backend: Any,
) -> None:
    """A resume on b of a's stream whose client then reads nothing: b lets it go after
    its GATEWAY_SEND_TIMEOUT and tells a, which parks the stream for a resume. Before,
    nothing watched it: b's heartbeat kept the stream a's follower's for as long as the
    client held its socket."""
    sid = "session_resume_remote_stalled"
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        # 8 KiB tokens, 100 a second: the client's small buffer fills at once.
        c.provider.config = SimulatorConfig(tokens=3000, rate=100, token_text="x" * 8192)
        # A buffer that holds the whole answer: a parked stream's overflow would end it.
        big = str(64 << 20)
        a = await c.gateway(GATEWAY_RESUME_WINDOW="10", GATEWAY_RESUME_BUFFER_BYTES=big)
        b = await c.gateway(
            GATEWAY_RESUME_WINDOW="10", GATEWAY_RESUME_BUFFER_BYTES=big, GATEWAY_SEND_TIMEOUT="0.5"
        )
        async with client.stream(
            "POST", f"{a.url}/api/chat/stream", headers={"X-Session-Id": sid}, json=BODY
        ) as response:
            reader = EventReader(response)
            await reader.until(lambda e: e.event == "token")
        parked = rf"\[SSE\] {sid} parked: the client left"
        await anyio.to_thread.run_sync(a.wait_for, parked)
        port = int(b.url.rsplit(":", 1)[1])
        request = (
            f"GET /api/chat/stream/{sid} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Last-Event-ID: {_last_id(reader.events)}\r\n\r\n"
        ).encode()
        with socket.socket() as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.connect(("127.0.0.1", port))
            stalled.sendall(request)
            await anyio.to_thread.run_sync(a.wait_for, rf"\[SSE\] {sid} followed from instance")
            await anyio.to_thread.run_sync(
                b.wait_for, rf"\[SSE\] {sid} follower let go: its client stopped reading"
            )
            # The owner parked the stream again (b's heartbeat would have kept it)
            await anyio.to_thread.run_sync(a.wait_for, parked, 2)
            # and it is resumable: on a, from where the first client was.
            async with _get(client, a.url, sid, _last_id(reader.events)) as again:
                await again.tokens_at_least(2)
            assert (await client.post(f"{a.url}/api/chat/cancel/{sid}")).status_code == 200
        assert not any("Traceback" in line for line in a.lines + b.lines)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")
@pytest.mark.slow
async def test_across_instances_newer_wins_a_stop_works_and_redis_down_is_503(
    anyio_backend: Any,
) -> None:
    sid = "session_resume_cluster2"
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        a = await c.gateway(GATEWAY_RESUME_WINDOW="10")
        b = await c.gateway(GATEWAY_RESUME_WINDOW="10")
        async with client.stream(
            "POST", f"{a.url}/api/chat/stream", headers={"X-Session-Id": sid}, json=BODY
        ) as response:
            first = EventReader(response)
            await first.tokens_at_least(2)
        record = c.provider.records[-1]
        async with _get(client, b.url, sid, _last_id(first.events)) as on_b:
            await on_b.tokens_at_least(3)
            # The owner knows a client follows on b: no park expiry meanwhile.
            await anyio.to_thread.run_sync(a.wait_for, rf"\[SSE\] {sid} followed from instance")
            async with _get(client, a.url, sid, _last_id(first.events + on_b.events)) as on_a:
                await on_a.tokens_at_least(2)
                ended = await on_b.rest()
                assert ended[-1].data == {"status": "stopped", "reason": "superseded"}
                # A stop sent to b reaches the owner: provider closed before the 200.
                response = await client.post(f"{b.url}/api/chat/cancel/{sid}")
                answered = time.monotonic()
                assert response.status_code == 200
                assert record.ended_at is not None
                assert record.ended_at <= answered
                rest = await on_a.rest()
        assert rest[-1].event == "stopped"
        assert rest[-1].data["reason"] == "cancel"

        # Redis down: a resume of another instance's stream is a 503, the owner's works.
        sid2 = "session_resume_cluster3"
        async with client.stream(
            "POST", f"{a.url}/api/chat/stream", headers={"X-Session-Id": sid2}, json=BODY
        ) as response:
            second = EventReader(response)
            await second.tokens_at_least(2)
        await anyio.to_thread.run_sync(c.redis.stop)
        for gateway in (a, b):
            await anyio.to_thread.run_sync(gateway.wait_for, r"\[cluster\] Redis unreachable")
        elsewhere = await client.get(
            f"{b.url}/api/chat/stream/{sid2}", headers={"Last-Event-ID": "1"}
        )
        assert elsewhere.status_code == 503
        assert elsewhere.json()["error"]["code"] == "resume_unavailable"
        async with _get(client, a.url, sid2, _last_id(second.events)) as here:
            await here.tokens_at_least(2)
        last = await client.post(f"{a.url}/api/chat/cancel/{sid2}")
        assert last.status_code == 200, a.lines[-20:]


# -- the log itself -------------------------------------------------------------------


def _event(n: int) -> bytes:
    return b'id: %d\nevent: token\ndata: {"delta":"w%d"}\n\n' % (n, n)


def test_the_log_splits_a_chunk_trims_what_was_written_and_always_takes_the_terminal() -> None:
    seq = [0]
    overflowed: list[bool] = []
    log = EventLog(3 * len(_event(1)), lambda: seq[0], lambda: overflowed.append(True))

    def put(*ids: int) -> None:
        seq[0] = ids[-1]
        log.put_nowait(b"".join(_event(n) for n in ids), (ids[-1], 0, 0, 0))

    put(1, 2, 3)  # one chunk of three events
    got = log.since(1)
    assert got is not None
    assert got[0] == _event(2) + _event(3)
    assert got[1] == 3
    # Full, and nothing written to a client yet: the next event overflows.
    put(4)
    assert overflowed == [True]
    assert log.last_id == 3
    # Once written, the oldest chunk may go to make room.
    log.written_id = 3
    put(4)
    assert log.first_id == 4
    assert not log.resumable_after(2)
    assert log.resumable_after(3)
    # The terminal event goes in over the limit, and closes the log.
    seq[0] = 5
    log.put_terminal(b"id: 5\nevent: done\ndata: {}\n\n", None)
    assert log.closed
    got = log.since(4)
    assert got is not None
    assert got[0].endswith(b"event: done\ndata: {}\n\n")
    assert overflowed == [True]


@given(
    chunks=st.lists(st.tuples(st.integers(1, 3), st.booleans(), st.booleans()), max_size=30),
    limit=st.integers(2, 12),
)
def test_the_log_gives_every_event_after_any_id_it_holds_with_the_newest_mark(
    chunks: list[tuple[int, bool, bool]], limit: int
) -> None:
    """``since(after)`` for every ``after`` the log can still answer: the events after it,
    in order, and the mark of the newest chunk among them that has one."""
    seq = [0]
    overflowed: list[bool] = []
    log = EventLog(limit * len(_event(1)), lambda: seq[0], lambda: overflowed.append(True))
    # The mark each event id arrived with (None: its chunk had none).
    marks: dict[int, Mark | None] = {}
    for events, marked, written in chunks:
        ids = range(seq[0] + 1, seq[0] + events + 1)
        seq[0] = ids[-1]
        mark = (ids[-1], 0, 0, 0) if marked else None
        log.put_nowait(b"".join(_event(n) for n in ids), mark)
        if overflowed:
            break
        marks.update(dict.fromkeys(ids, mark))
        if written:
            log.written_id = log.last_id
        for after in range(log.first_id - 1, log.last_id + 1):
            got = log.since(after)
            if after == log.last_id:
                assert got is None
                continue
            assert got is not None
            newer = range(after + 1, log.last_id + 1)
            assert got[0] == b"".join(_event(n) for n in newer)
            assert got[1] == log.last_id
            assert got[2] == next((marks[n] for n in reversed(newer) if marks[n]), None)


# -- the store ------------------------------------------------------------------------

_KEYS = ["a", "b", "c"]
# ("add", key) starts a stream; ("end", key, until, stale) ends the key's stream (or,
# stale, the one it had before), its log kept: not at all (None), until a time already
# past ("past"), or for a while (an int: the larger, the longer).
_STORE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(_KEYS)),
        st.tuples(
            st.just("end"),
            st.sampled_from(_KEYS),
            st.one_of(st.none(), st.just("past"), st.integers(0, 5)),
            st.booleans(),
        ),
    ),
    max_size=40,
)


@settings(max_examples=500)
@given(ops=_STORE_OPS, max_ended=st.integers(0, 3))
# A key ended, then started again: its old expiry must not drop the new stream.
@example(
    ops=[
        ("add", "a"),
        ("end", "a", 0, False),
        ("add", "a"),
        ("add", "b"),
        ("end", "b", 1, False),
        ("add", "c"),
        ("end", "c", 2, False),
    ],
    max_ended=1,
)
# A stream ended twice: its first expiry no longer holds.
@example(
    ops=[
        ("add", "a"),
        ("end", "a", 0, False),
        ("end", "a", 5, False),
        ("add", "b"),
        ("end", "b", 1, False),
    ],
    max_ended=1,
)
async def test_the_store_keeps_live_streams_and_the_latest_ended_within_the_window(
    ops: list[tuple[Any, ...]], max_ended: int
) -> None:
    """Against a model of what it keeps: every live stream; every ended one until its
    window is over, at most ``max_ended`` of them, those expiring soonest dropped first."""
    store = ResumeStore(WINDOW, max_ended)
    session = Session("s", "m")
    logs: dict[str, list[EventLog]] = {}
    live: set[str] = set()
    ended: dict[str, float] = {}
    now = anyio.current_time()
    for i, op in enumerate(ops):
        if op[0] == "add":
            key = op[1]
            log = EventLog(1024, lambda: 0, lambda: None)
            logs.setdefault(key, []).append(log)
            store.add("p", key, log, session)
            ended.pop(key, None)
            live.add(key)
            continue
        _, key, until, stale = op
        if key not in logs or (stale and len(logs[key]) < 2):
            continue
        # Distinct expiries (by the op's index), so that which goes first is defined.
        expires = (
            None if until is None else now + (-1 - i if until == "past" else 1000 + 100 * until + i)
        )
        store.ended("p", key, logs[key][-2 if stale else -1], expires)
        if not stale and (key in live or key in ended):
            live.discard(key)
            ended.pop(key, None)
            if isinstance(until, int):
                ended[key] = now + 1000 + 100 * until + i
        while len(ended) > max_ended:
            del ended[min(ended, key=ended.__getitem__)]
        for key in _KEYS:
            found = store.get("p", key)
            if key in live or key in ended:
                assert found is not None, key
                # A live stream's session; None once it ended.
                assert found[1] is (session if key in live else None), key
            else:
                assert found is None, key
        # Nothing kept that no one can resume: memory is bounded by the window.
        assert {key for _, key in store._entries} == live | set(ended)


def _kib_log(events: int, written: int) -> EventLog:
    """A log of ``events`` events of about 1 KiB, ``written`` of them written to a client."""
    seq = [0]
    log = EventLog(1 << 24, lambda: seq[0], lambda: pytest.fail("overflow"))
    for n in range(1, events + 1):
        seq[0] = n
        log.put_nowait(b"id: %d\nevent: token\ndata: %s\n\n" % (n, b"x" * 1000))
    log.written_id = written
    return log


async def test_ended_logs_keep_a_tail_of_what_was_written_within_a_total_bound() -> None:
    # Before: an ended stream kept its whole log (1 MiB) for the window even when its
    # client had read everything; 600 streams held 590 MiB.
    store = ResumeStore(60.0, max_ended=1000, max_ended_bytes=300 * 1024)
    until = anyio.current_time() + 60
    for i in range(10):
        log = _kib_log(1024, written=1024)
        store.add("p", f"s{i}", log, Session(f"s{i}", "m"))
        store.ended("p", f"s{i}", log, until)
        # What a resume of the last events needs, not the whole answer.
        assert 60 * 1024 <= log.size <= 66 * 1024
        assert log.resumable_after(1024)
        assert log.resumable_after(1000)
        assert not log.resumable_after(10)
    # Ten such tails are over the total: the oldest went first.
    assert store.ended_bytes <= 300 * 1024
    assert store.get("p", "s9") is not None
    assert store.get("p", "s0") is None
    # A stream whose client left before reading it all keeps what it has not written.
    log = _kib_log(200, written=50)
    store.add("p", "parked", log, Session("parked", "m"))
    store.ended("p", "parked", log, until)
    assert log.resumable_after(50)
    assert log.since(50) is not None

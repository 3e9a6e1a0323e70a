"""A resumable stream's events through a real redis-server: the owner's mirror appends
its log, a follower on another instance reads it (gateway/resume/shared.py)."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import coredis
import pytest

from gateway.cluster.link import RedisTimeout
from gateway.resume import shared as shared_log
from gateway.resume.log import EventLog
from gateway.resume.shared import RemoteLog, events_key, mirror

from .processes import WAIT, RedisServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="Debian's redis-server is not installed (make test does)",
    ),
]


_T = TypeVar("_T")


class _Reachable:
    """The cluster as the mirror and the reader see it, Redis up throughout."""

    def __init__(self, client: coredis.Redis[str]) -> None:
        self.client = client

    async def call(self, command: Callable[[], Awaitable[_T]]) -> _T:
        return await command()

    def down(self, exc: BaseException) -> None:
        raise AssertionError(f"Redis reported down: {exc!r}")


class _LateAnswers(_Reachable):
    """Redis applies each of the first ``late`` commands, but its answer comes too late
    for the caller, as with a Redis that hung: the caller sees a timeout."""

    def __init__(self, client: coredis.Redis[str], late: int) -> None:
        super().__init__(client)
        self.late = late
        self.downs = 0

    async def call(self, command: Callable[[], Awaitable[_T]]) -> _T:
        result = await command()
        if self.late > 0:
            self.late -= 1
            raise RedisTimeout("Redis did not answer within 0.5 s")
        return result

    def down(self, exc: BaseException) -> None:
        self.downs += 1


def _event(n: int) -> bytes:
    return b'id: %d\nevent: token\ndata: {"delta":"w%d"}\n\n' % (n, n)


async def test_a_follower_elsewhere_gets_each_event_once_and_holds_only_what_it_has_not_written(
    anyio_backend: Any, redis: RedisServer
) -> None:
    client = coredis.Redis.from_url(redis.url, decode_responses=True)
    async with client:
        cluster = _Reachable(client)
        seq = [0]
        log = EventLog(1 << 20, lambda: seq[0], lambda: pytest.fail("overflow"))
        key = events_key("p", "s")
        written: list[bytes] = []
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(mirror, cluster, key, log, 60.0)
                remote = RemoteLog(cluster, key)
                cursor = 0
                for _ in range(20):
                    # Five chunks of one event each, as the relay writes tokens.
                    for _ in range(5):
                        seq[0] += 1
                        log.put_nowait(_event(seq[0]))
                    if cursor == 0:
                        # Once the mirror's first append is in, as a resume would.
                        assert await remote.load(1, WAIT)
                    while cursor < seq[0]:
                        got = remote.since(cursor)
                        if got is None:
                            await remote.wait(cursor)
                            # What the follower has written is no longer held.
                            assert remote.first_id - 1 >= remote.written_id
                            continue
                        data, cursor, _ = got
                        written.append(data)
                        remote.written_id = cursor
                seq[0] += 1
                log.put_terminal(_event(seq[0]), None)
                await remote.wait(cursor)
                got = remote.since(cursor)
                assert got is not None
                written.append(got[0])
                assert remote.closed
        assert b"".join(written) == b"".join(_event(n) for n in range(1, 102))
        assert not remote.broken


async def test_the_mirror_batches_what_comes_within_its_interval_and_appends_the_end_at_once(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch, redis: RedisServer
) -> None:
    # An interval far longer than the test may take: only the log's close can end it.
    monkeypatch.setattr(shared_log, "_BATCH_INTERVAL", 10 * WAIT)
    client = coredis.Redis.from_url(redis.url, decode_responses=True)
    async with client:
        seq = [0]
        log = EventLog(1 << 20, lambda: seq[0], lambda: pytest.fail("overflow"))
        key = events_key("p", "s")
        remote = RemoteLog(_Reachable(client), key)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(mirror, _Reachable(client), key, log, 60.0)
                seq[0] = 1
                log.put_nowait(_event(1))
                # The first append goes at once.
                assert await remote.load(1, WAIT)
                for n in range(2, 51):
                    seq[0] = n
                    log.put_nowait(_event(n))
                    await anyio.lowlevel.checkpoint()
                seq[0] = 51
                log.put_terminal(_event(51), None)
        # The rest went in one append, when the log closed.
        assert await client.xlen(key) == 2
        remote = RemoteLog(_Reachable(client), key)
        assert await remote.load(51, WAIT)
        got = remote.since(0)
        assert got is not None
        assert got[0] == b"".join(_event(n) for n in range(1, 52))
        assert remote.closed


async def test_an_append_applied_after_its_timeout_is_not_appended_twice(
    anyio_backend: Any, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the mirror retried a batch whose timed-out XADD had been applied after
    # all, and a resume elsewhere got events twice, or a 404, or gaps.
    monkeypatch.setattr(shared_log, "_RETRY", 0.01)
    client = coredis.Redis.from_url(redis.url, decode_responses=True)
    async with client:
        seq = [0]
        log = EventLog(1 << 20, lambda: seq[0], lambda: pytest.fail("overflow"))
        key = events_key("p", "late")
        late = _LateAnswers(client, late=3)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(mirror, late, key, log, 60.0)
                for n in range(1, 31):
                    seq[0] = n
                    log.put_nowait(_event(n))
                    await anyio.lowlevel.checkpoint()
                seq[0] = 31
                log.put_terminal(_event(31), None)
        assert late.late == 0
        assert late.downs == 3
        remote = RemoteLog(_Reachable(client), key)
        assert await remote.load(31, WAIT)
        assert not remote.broken
        got = remote.since(0)
        assert got is not None
        # Every event once, in order, and the end once.
        assert got[0] == b"".join(_event(n) for n in range(1, 32))
        assert remote.closed
        ends = [e for e in await client.xrange(key, "-", "+") if e.field_values["end"] == "1"]
        assert len(ends) == 1


@pytest.mark.parametrize(
    "garbage",
    [
        {"first": "1"},  # fields missing
        {"first": "one", "last": "2", "data": "x", "end": "0"},  # not a number
    ],
)
async def test_an_entry_that_cannot_be_read_breaks_the_log_not_the_reader(
    anyio_backend: Any, redis: RedisServer, garbage: dict[str, str]
) -> None:
    # Before: KeyError or ValueError escaped: a 500 with a traceback on every resume of
    # that stream elsewhere, and a follower cut off mid-chunk.
    client = coredis.Redis.from_url(redis.url, decode_responses=True)
    async with client:
        key = events_key("p", "garbage")
        await client.xadd(key, {"first": "1", "last": "1", "data": "ok", "end": "0"})
        await client.xadd(key, garbage)
        remote = RemoteLog(_Reachable(client), key)
        with anyio.fail_after(WAIT):
            assert await remote.load(1, 0)
        assert remote.broken
        assert remote.closed

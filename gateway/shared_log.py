"""A resumable stream's events in Redis, for a resume that lands on another instance
(docs/resume.md).

The owner appends its ``EventLog`` to a Redis Stream per session (``XADD``, capped,
expiring a window after the last append), batching whatever came since the last
append. Another instance replays the stream from the resume's ``Last-Event-ID`` and
follows it with ``XREAD`` from the last entry read: an entry cannot slip by between
the replay and the follow, as a pub/sub message can. Every entry carries the
first and last event id it holds, and the reader checks they follow on: an append
that failed (Redis away) is retried by the owner, never skipped.
"""

from __future__ import annotations

import math
from typing import Protocol

import anyio
import coredis
from coredis.response.types import StreamEntry

from .cluster import is_redis_failure
from .resume import ChunkLog, EventLog

__all__ = ["RemoteLog", "events_key", "mirror"]

# XADD, trim, expire: one round trip per batch.
_APPEND = """
redis.call('xadd', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
           'first', ARGV[2], 'last', ARGV[3], 'data', ARGV[4], 'end', ARGV[5])
return redis.call('pexpire', KEYS[1], ARGV[6])
"""
# Entries kept per stream; a batch is usually many events, so this is generous.
_MAX_ENTRIES = 100_000
# How often a follower here asks Redis for new entries. Not XREAD BLOCK: coredis gives
# each blocking command a connection of its own, and one cancelled mid-block (the
# client left) is not given back, so clients coming and going fill the pool (64) and
# every Redis call of the instance then waits. A plain XREAD is multiplexed.
_POLL = 0.05
# The longest any one Redis call here may take.
_CALL_BOUND = 2.0
# While Redis is away, how often the owner tries its append again.
_RETRY = 0.25
# The least time between two appends of one stream, but for its last. A token comes
# every 50 ms or so, and an append costs the owner more CPU than relaying a token:
# appending each as it came took a core at 200 streams (docs/benchmarks.md, step 16).
# A follower elsewhere polls every _POLL anyway.
_BATCH_INTERVAL = 0.1


def events_key(principal: str, session_id: str) -> str:
    return f"gw:events:{principal.encode().hex()}:{session_id}"


class _Client(Protocol):
    """What the mirror and the reader need of the cluster: its client while Redis is
    reachable, and where to report an error."""

    @property
    def client(self) -> coredis.Redis[str] | None: ...

    def down(self, exc: BaseException) -> None: ...


async def mirror(cluster: _Client, key: str, log: EventLog, window: float) -> None:
    """Append ``log``'s events to ``key`` as they come, until the log is closed and
    all of it appended. While Redis is away the batch waits; it is never dropped."""
    cursor = 0
    ttl_ms = str(max(1, round(window * 1000)))
    next_at = -math.inf
    while True:
        got = log.since(cursor)
        ended = log.closed
        if got is None and not ended:
            await log.wait(cursor)
            continue
        if not ended and (wait := next_at - anyio.current_time()) > 0:
            # The batch grows until then, or until the log closes.
            with anyio.move_on_after(wait):
                await log.wait_closed()
            continue
        data, last, _ = got if got is not None else (b"", cursor, None)
        client = cluster.client
        if client is None:
            # Redis is away: the whole batch (and what joins it) is tried again.
            await anyio.sleep(_RETRY)
            continue
        try:
            # Shielded: a Redis call cancelled half-way costs coredis its connection.
            with anyio.fail_after(_CALL_BOUND, shield=True):
                await client.eval(
                    _APPEND,
                    keys=[key],
                    args=[
                        str(_MAX_ENTRIES),
                        str(cursor + 1),
                        str(last),
                        data.decode(),
                        "1" if ended else "0",
                        ttl_ms,
                    ],
                )
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            cluster.down(exc)
            await anyio.sleep(_RETRY)
            continue
        cursor = last
        if ended:
            return
        next_at = anyio.current_time() + _BATCH_INTERVAL


class RemoteLog(ChunkLog):
    """Another instance's stream, read from Redis: the reading side of ``EventLog``.
    What its follower has written is let go: a resume starts a log of its own."""

    def __init__(self, cluster: _Client, key: str) -> None:
        super().__init__()
        self._cluster = cluster
        self._key = key
        self._entry = "0-0"
        # Events were missing between two entries (cannot happen unless Redis lost
        # data): the follower ends without a terminal event, the client resumes again.
        self.broken = False

    async def load(self, after: int, wait: float) -> bool:
        """Read what the stream holds, waiting up to ``wait`` for its owner to have
        appended event ``after`` (a client may resume here before the owner's last
        append is in); False if there is no such stream."""
        client = self._cluster.client
        if client is None:
            raise OSError("Redis is not reachable")
        with anyio.fail_after(_CALL_BOUND, shield=True):
            self._add(await client.xrange(self._key, "-", "+"))
        with anyio.move_on_after(wait):
            while self.last_id < after and not self.closed:
                await anyio.sleep(_POLL)
                with anyio.fail_after(_CALL_BOUND, shield=True):
                    found = await client.xread({self._key: self._entry})
                for entries in (found or {}).values():
                    self._add(entries)
        return self._entry != "0-0"

    def _add(self, entries: tuple[StreamEntry, ...]) -> None:
        for entry in entries:
            fields = entry.field_values
            first, last = int(fields["first"]), int(fields["last"])
            if self._entry == "0-0":
                # The oldest entry kept: events before it were trimmed.
                self.first_id, self.last_id = first, first - 1
            if first != self.last_id + 1:
                self.broken = self.closed = True
                return
            if last >= first:
                self._append(last, str(fields["data"]).encode(), None)
            self._entry = str(entry.identifier)
            if fields.get("end") == "1":
                self.closed = True
        while self._chunks and self._chunks[0].last <= self.written_id:
            self._drop_oldest()

    async def changed(self) -> None:
        """One look at Redis for new entries, and if there were none, a pause of the
        poll interval: a follower here wakes that often. Redis going away ends the log
        (``broken``): the client resumes again."""
        client = self._cluster.client
        try:
            if client is None:
                raise OSError("Redis is not reachable")
            # Shielded (and bounded): a Redis call cancelled half-way costs coredis
            # its connection, and the pool does not get it back.
            with anyio.fail_after(_CALL_BOUND, shield=True):
                found = await client.xread({self._key: self._entry})
                expired = not found and not await client.exists([self._key])
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            if client is not None:
                self._cluster.down(exc)
            self.broken = self.closed = True
            return
        if not found:
            if expired:
                # Expired: the owner stopped appending a window ago.
                self.broken = self.closed = True
            else:
                await anyio.sleep(_POLL)
            return
        for entries in found.values():
            self._add(entries)

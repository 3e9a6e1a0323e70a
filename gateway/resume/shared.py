"""A resumable stream's events in Redis, for a resume that lands on another instance
(docs/resume.md).

The owner appends its ``EventLog`` to a Redis Stream per session (``XADD``, capped,
expiring a window after the last append), batching whatever came since the last
append. Another instance replays the stream from the resume's ``Last-Event-ID`` and
follows it with ``XREAD`` from the last entry read: an entry cannot slip by between
the replay and the follow, as a pub/sub message can. Every entry carries the
first and last event id it holds, and the reader checks they follow on: an append
that failed (Redis away) is retried by the owner, never skipped.

Appends are idempotent: a companion key holds the last event id appended (and whether
the end was), and the script appends a batch only if it starts right after it. An
append whose answer did not come in time (a Redis that hung) may still be applied
later, so its retry, or the next batch, may find its events there already: it is then
skipped, or resent from where Redis is. A reader treats an entry it cannot read
(fields missing, not numbers) or a gap between entries as a log it cannot be sure of.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol, TypeVar

import anyio
import coredis
from coredis.response.types import StreamEntry

from ..cluster.link import is_redis_failure
from .log import ChunkLog, EventLog

__all__ = ["RemoteLog", "events_key", "mirror"]

_T = TypeVar("_T")

# XADD, trim, expire, one round trip per batch, if the batch starts right after the last
# event appended (KEYS[2]: that id, and "!" once the end is in). Returns what is in now.
_APPEND = """
local v = redis.call('get', KEYS[2]) or '0'
local ended = string.sub(v, -1) == '!'
local have = tonumber(ended and string.sub(v, 1, -2) or v)
local first, last, fin = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5] == '1'
if ended or first ~= have + 1 or (last == have and not fin) then
  return v
end
redis.call('xadd', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
           'first', ARGV[2], 'last', ARGV[3], 'data', ARGV[4], 'end', ARGV[5])
v = ARGV[3] .. (fin and '!' or '')
redis.call('set', KEYS[2], v, 'PX', ARGV[6])
redis.call('pexpire', KEYS[1], ARGV[6])
return v
"""
# Entries kept per stream; a batch is usually many events, so this is generous.
_MAX_ENTRIES = 100_000
# How often a follower here asks Redis for new entries. Not XREAD BLOCK: coredis gives
# each blocking command a connection of its own, and one cancelled mid-block (the
# client left) is not given back, so clients coming and going fill the pool (64) and
# every Redis call of the instance then waits. A plain XREAD is multiplexed.
_POLL = 0.05
# While Redis is away, how often the owner tries its append again.
_RETRY = 0.25
# The least time between two appends of one stream, but for its last. A token comes
# every 50 ms or so, and an append costs the owner more CPU than relaying a token:
# appending each as it came took a core at 200 streams (docs/benchmarks.md, step 16).
# A follower elsewhere polls every _POLL anyway.
_BATCH_INTERVAL = 0.1


def events_key(principal: str, session_id: str) -> str:
    return f"gw:events:{principal.encode().hex()}:{session_id}"


def _appended_key(key: str) -> str:
    """The companion of an events key: the last event id appended, "!" after the end."""
    return f"{key}:appended"


class _Client(Protocol):
    """What the mirror and the reader need of the cluster: its client while Redis is
    reachable, a bounded call (``Cluster.call``: the answer awaited at most
    ``GATEWAY_REDIS_TIMEOUT``, the command never cancelled half-way), and where to
    report an error."""

    @property
    def client(self) -> coredis.Redis[str] | None: ...

    async def call(self, command: Callable[[], Awaitable[_T]]) -> _T: ...

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
        args = [
            str(_MAX_ENTRIES),
            str(cursor + 1),
            str(last),
            data.decode(),
            "1" if ended else "0",
            ttl_ms,
        ]
        try:
            stored = await cluster.call(
                partial(client.eval, _APPEND, [key, _appended_key(key)], args)
            )
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            cluster.down(exc)
            await anyio.sleep(_RETRY)
            continue
        text = str(stored)
        have = int(text.rstrip("!"))
        if text.endswith("!"):
            return  # the end is in: this batch, or a retry's earlier twin, put it there
        if have < log.first_id - 1:
            # What Redis holds stops before what the log still has (its copy expired):
            # nothing can be appended that a reader could join on.
            return
        # This batch, or events a timed-out append put in after all: go on from there.
        cursor = have
        if have == last:
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
        call = self._cluster.call
        self._add(await call(partial(client.xrange, self._key, "-", "+")))
        with anyio.move_on_after(wait):
            while self.last_id < after and not self.closed:
                await anyio.sleep(_POLL)
                found = await call(partial(client.xread, {self._key: self._entry}))
                for entries in (found or {}).values():
                    self._add(entries)
        return self._entry != "0-0"

    def _add(self, entries: tuple[StreamEntry, ...]) -> None:
        for entry in entries:
            fields = entry.field_values
            try:
                first, last = int(fields["first"]), int(fields["last"])
                data = fields["data"]
            except (KeyError, ValueError, TypeError):
                # Not an entry of ours (or damaged): nothing after it can be trusted.
                self.broken = self.closed = True
                return
            if self._entry == "0-0":
                # The oldest entry kept: events before it were trimmed.
                self.first_id, self.last_id = first, first - 1
            if first != self.last_id + 1:
                self.broken = self.closed = True
                return
            if last >= first:
                self._append(last, str(data).encode(), None)
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
            # Bounded without being cancelled half-way: coredis does not give back the
            # connection of a command cancelled mid-way.
            call = self._cluster.call
            found = await call(partial(client.xread, {self._key: self._entry}))
            expired = not found and not await call(partial(client.exists, [self._key]))
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

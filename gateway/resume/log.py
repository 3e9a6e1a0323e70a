"""Resume after a dropped connection (``GATEWAY_RESUME_WINDOW`` > 0; docs/resume.md).

A resumable stream's events go into an ``EventLog`` instead of straight to the client: every
event with an id, in order, kept (up to ``GATEWAY_RESUME_BUFFER_BYTES``) so that a
client coming back with ``Last-Event-ID: n`` gets each event after ``n`` exactly once.
The client attached to the stream is a *follower* of the log; a newer one replaces it.
The ``ResumeStore`` keeps the logs of this process's streams, live or ended within the
window, by principal and session id.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from ..core.events import PING
from ..core.session import Mark, Session

__all__ = ["ChunkLog", "EventLog", "ResumeStore"]


@dataclass(slots=True)
class _Chunk:
    first: int
    last: int
    data: bytes
    mark: Mark | None


class ChunkLog:
    """A stream's events by id, in chunks as they were written: what a follower reads,
    from this process's ``EventLog`` or from Redis (``shared.RemoteLog``)."""

    def __init__(self) -> None:
        self._chunks: deque[_Chunk] = deque()
        # Events before ``first_id`` are gone; ``last_id`` is the newest held.
        self.first_id = 1
        self.last_id = 0
        # The newest id any follower has written to its client.
        self.written_id = 0
        self.closed = False
        # The follower is to write a ping at its next wake (``EventLog.put_nowait``).
        self.pinged = False

    def since(self, after: int) -> tuple[bytes, int, Mark | None] | None:
        """The events with an id above ``after``, joined, with the last id and mark;
        ``None`` when there are none yet. ``after`` must be ``>= first_id - 1``."""
        if after >= self.last_id:
            return None
        # From the newest back: a follower that keeps up asks for the last few chunks
        # of a log that can hold thousands, at every token.
        parts: list[bytes] = []
        mark: Mark | None = None
        for chunk in reversed(self._chunks):
            if chunk.last <= after:
                break
            data = chunk.data
            if chunk.first <= after:
                # A chunk of several events, some of them already seen: every event
                # ends with a blank line, and no event holds one.
                data = b"\n\n".join(data.split(b"\n\n")[after - chunk.first + 1 :])
            parts.append(data)
            if mark is None:
                mark = chunk.mark
        parts.reverse()
        return b"".join(parts), self.last_id, mark

    def resumable_after(self, after: int) -> bool:
        return self.first_id - 1 <= after <= self.last_id

    async def changed(self) -> None:
        """Until something may have changed: an event in, the log closed, a ping asked
        for, ``wake()``. A follower looks again after each."""
        raise NotImplementedError

    async def wait(self, after: int) -> None:
        """Until an event with an id above ``after`` is in, or the log is closed."""
        while after >= self.last_id and not self.closed:
            await self.changed()

    def wake(self) -> None:
        """Ends a follower's wait in ``changed()`` (it was superseded)."""

    def _append(self, last: int, data: bytes, mark: Mark | None) -> None:
        """The events after ``last_id`` up to ``last``."""
        self._chunks.append(_Chunk(self.last_id + 1, last, data, mark))
        self.last_id = last

    def _drop_oldest(self) -> _Chunk:
        oldest = self._chunks.popleft()
        self.first_id = oldest.last + 1
        return oldest


class EventLog(ChunkLog):
    """A stream's events for its followers; the relay writes into it through
    ``ResumableStream`` (stream.py), its ``Sink``.

    ``put_nowait`` never waits: a resumable stream keeps relaying while nobody reads
    (parked).
    When the events held exceed ``limit`` bytes, those a client has written go first;
    if that is not enough, the event is dropped and ``on_overflow`` called (it stops
    the stream). Pings are not logged: the watchdog's ping asks the follower to write
    one (``pinged``).
    """

    def __init__(
        self, limit: int, current_id: Callable[[], int], on_overflow: Callable[[], None]
    ) -> None:
        super().__init__()
        self._limit = limit
        self._current_id = current_id
        self._on_overflow = on_overflow
        self._bytes = 0
        self._changed: anyio.Event | None = None
        self._closing: anyio.Event | None = None

    def put_nowait(self, data: bytes, mark: Mark | None = None) -> None:
        if self.closed:
            raise anyio.ClosedResourceError
        if data == PING:
            # The stream's watchdog asks: the client has heard nothing for the ping
            # interval. The follower writes it, each its own; no timer per wait.
            self.pinged = True
            self._notify()
            return
        last = self._current_id()
        if last <= self.last_id:
            return  # no event with an id (nothing the protocol writes today)
        size = len(data)
        while self._bytes + size > self._limit and self._chunks:
            if self._chunks[0].last > self.written_id:
                break
            self._bytes -= len(self._drop_oldest().data)
        if self._bytes + size > self._limit:
            self._on_overflow()
            return
        self._append(last, data, mark)
        self._bytes += size
        self._notify()

    @property
    def size(self) -> int:
        """The bytes of events held."""
        return self._bytes

    def compact(self, keep: int) -> None:
        """Let go of the events a client has written but the newest ``keep`` bytes of
        them: an ended stream whose client read everything needs only what a resume of
        its last events asks for (the client may not have received what was last
        written to it), not the whole answer for the whole window."""
        held = sum(len(c.data) for c in self._chunks if c.last <= self.written_id)
        while self._chunks and self._chunks[0].last <= self.written_id and held > keep:
            size = len(self._drop_oldest().data)
            held -= size
            self._bytes -= size

    def put_terminal(self, data: bytes, mark: Mark | None) -> None:
        """The terminal event, then close: it always goes in, over the limit if need
        be, so whoever follows learns how the stream ended."""
        self._limit += len(data)
        self.put_nowait(data, mark)
        self.close()

    def close(self) -> None:
        """The terminal event is in: followers end after it."""
        self.closed = True
        self._notify()
        if self._closing is not None:
            self._closing.set()

    async def wait_closed(self) -> None:
        """Until the log is closed: what the Redis mirror waits for while a batch grows,
        woken once at the end instead of at every event (shared.py)."""
        if not self.closed:
            if self._closing is None:
                self._closing = anyio.Event()
            await self._closing.wait()

    async def changed(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def wake(self) -> None:
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


@dataclass(slots=True)
class _Entry:
    log: EventLog
    # Set while the stream runs; None once it ended (its log kept until ``expires``).
    session: Session | None
    expires: float
    # An ended log's bytes, as counted in ``ResumeStore.ended_bytes``.
    size: int = 0


# What an ended stream's log keeps of the events its client has written.
_WRITTEN_KEPT = 64 * 1024


class ResumeStore:
    """This process's resumable streams: live ones, and ended ones until their window
    is over (at most ``max_ended`` of those, and at most ``max_ended_bytes`` of their
    events, the soonest to expire dropped first). An ended log keeps of what its client
    has written only the last ``_WRITTEN_KEPT`` bytes.

    A stream's start and end each purge, so the purge takes the ended entries from a
    heap by expiry: its cost does not grow with the thousands an hour's window can
    hold (a scan and sort of them all stalled the loop: docs/benchmarks.md, step 14)."""

    def __init__(self, window: float, max_ended: int, max_ended_bytes: int = 1 << 62) -> None:
        self.window = window
        self._max_ended = max_ended
        self._max_ended_bytes = max_ended_bytes
        # The bytes of events the ended logs held when they ended (less what was
        # compacted), while they are kept.
        self.ended_bytes = 0
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Every ended entry, by expiry; one replaced or removed since is skipped
        # when it comes up.
        self._expiring: list[tuple[float, int, tuple[str, str], _Entry]] = []
        self._pushed = 0
        self._ended = 0

    def add(self, principal: str, session_id: str, log: EventLog, session: Session) -> None:
        key = (principal, session_id)
        self._drop(key)
        self._entries[key] = _Entry(log, session, math.inf)
        self._purge()

    def ended(self, principal: str, session_id: str, log: EventLog, until: float | None) -> None:
        """The stream is over: its log stays resumable ``until`` then (None: not at all)."""
        key = (principal, session_id)
        entry = self._entries.get(key)
        if entry is not None and entry.log is log:
            if until is None:
                self._drop(key)
            else:
                if entry.session is not None:
                    self._ended += 1
                    log.compact(_WRITTEN_KEPT)
                    entry.size = log.size
                    self.ended_bytes += entry.size
                entry.session = None
                entry.expires = until
                self._pushed += 1
                heapq.heappush(self._expiring, (until, self._pushed, key, entry))
        self._purge()

    def get(self, principal: str, session_id: str) -> tuple[EventLog, Session | None] | None:
        entry = self._entries.get((principal, session_id))
        if entry is None or entry.expires <= anyio.current_time():
            return None
        return entry.log, entry.session

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.session is None:
            self._ended -= 1
            self.ended_bytes -= entry.size

    def _purge(self) -> None:
        now = anyio.current_time()
        expiring = self._expiring
        while expiring and (
            expiring[0][0] <= now
            or self._ended > self._max_ended
            or self.ended_bytes > self._max_ended_bytes
        ):
            expires, _, key, entry = heapq.heappop(expiring)
            if self._entries.get(key) is entry and entry.expires == expires:
                self._drop(key)

"""A resumable stream (docs/resume.md): the relay writes into the stream's log instead
of to the client, and the client follows the log (follow.py); with a cluster, the log
is mirrored to Redis for a resume on another instance (shared.py). The relay and its
watchdog are the plain stream's (``web/stream.py``): to them this is one more
``Sink``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import anyio
from anyio.abc import TaskGroup
from starlette.types import Receive, Send

from ..cluster.instance import Cluster
from ..core.session import Mark, Session, Stopped
from ..core.sink import Sink
from ..settings import Settings
from .follow import follow
from .log import EventLog, ResumeStore
from .shared import events_key, mirror

__all__ = ["ResumableStream"]

# At a resumable stream's end, how long its last events may take to reach Redis.
_MIRROR_WAIT = 2.0


class ResumableStream:
    """The ``Sink`` of a resumable stream: its log, its first client and its mirror."""

    def __init__(
        self, session: Session, settings: Settings, store: ResumeStore, cluster: Cluster | None
    ) -> None:
        self._session = session
        self._settings = settings
        self._store = store
        self._cluster = cluster
        self._log = EventLog(
            settings.resume_buffer_bytes,
            lambda: session.seq,
            lambda: session.client_left("disconnect"),
        )
        # Set once the stream's events are all in Redis (with a cluster only: made
        # then, as nothing else waits for it).
        self._mirrored: anyio.Event | None = None

    async def run(
        self,
        receive: Receive,
        send: Send,
        body_send: Send | None,
        relay: Callable[[Sink, TaskGroup], Awaitable[None]],
    ) -> None:
        """The stream, ``relay`` writing into the log while the client follows it."""
        session, log = self._session, self._log
        session.resumable = True
        self._store.add(session.principal, session.id, log, session)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(follow, body_send=body_send), self._settings, session, log, receive, send, 0
            )
            if self._cluster is not None:
                # For a resume on another instance: the events, in Redis.
                key = events_key(session.principal, session.id)
                self._mirrored = anyio.Event()
                tg.start_soon(self._mirror, self._cluster, key, self._mirrored)
            await relay(self, tg)
            tg.cancel_scope.cancel()

    async def start(self, first: bytes) -> None:
        # The follower starts the client's response. The relay has run only up to its
        # first wait for the provider (web/stream.py lets it go first for one round):
        # no delta of its can be in the log before this, the first event.
        if first:
            self._log.put_nowait(first, None)

    async def write(self, data: bytes, mark: Mark | None = None) -> None:
        # Never waits: a resumable stream keeps relaying while nobody reads (parked).
        self._log.put_nowait(data, mark)

    def write_nowait(self, data: bytes, mark: Mark | None = None) -> None:
        self._log.put_nowait(data, mark)

    async def finish(self, terminal: Callable[[], bytes], relayed: bool) -> None:
        """The terminal event goes into the log for whoever follows it, now or by a
        resume within the window. A stream stopped because its client was gone too
        long (or the buffer overflowed) has no one to tell."""
        session, log = self._session, self._log
        outcome = session.outcome
        abandoned = isinstance(outcome, Stopped) and outcome.reason == "disconnect"
        if abandoned:
            session.count_only_sent()
            log.close()
        else:
            log.put_terminal(terminal(), session.delivered())
        follower = session.attached
        if follower is not None:
            with anyio.move_on_after(self._settings.send_timeout):
                await follower.done.wait()
        cluster = self._cluster
        if cluster is not None:
            if self._mirrored is not None:
                # A follower on another instance gets the terminal event through Redis.
                with anyio.move_on_after(_MIRROR_WAIT):
                    await self._mirrored.wait()
            if abandoned:
                await cluster.forget(events_key(session.principal, session.id))
        if abandoned:
            until = None
        else:
            start = session.parked_at if session.parked_at is not None else anyio.current_time()
            until = start + self._store.window
        self._store.ended(session.principal, session.id, log, until)

    async def _mirror(self, cluster: Cluster, key: str, done: anyio.Event) -> None:
        try:
            await mirror(cluster, key, self._log, self._settings.resume_window)
        finally:
            done.set()

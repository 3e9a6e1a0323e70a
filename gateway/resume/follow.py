"""Clients following a resumable stream's log: the stream's first client, a client
that resumed, on this instance or another (docs/resume.md). A newer client supersedes
an older one; a client that leaves parks the stream for the window."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import anyio
from starlette.types import Receive, Send

from ..core.events import PING, SSE_MEDIA_TYPE, SUPERSEDED
from ..core.registry import Registry
from ..core.session import Session
from ..errors import CLIENT_GONE
from ..settings import Settings
from .log import EventLog
from .messages import FollowMessages
from .shared import RemoteLog

__all__ = ["ClientFollower", "follow", "follow_messages", "log_parked"]

logger = logging.getLogger(__name__)


class ClientFollower:
    """A client following a resumable stream's log: the first one, or a resume."""

    def __init__(self) -> None:
        self.superseded = False
        self.done = anyio.Event()
        # Cancelled when the follower is let go (a stuck send).
        self.scope = anyio.CancelScope()
        # Ends its wait for the log to change, to see that it was superseded.
        self.wake: Callable[[], None] | None = None
        # When its write under way began, for a follower of a stream on another
        # instance: no watchdog here watches it (web/resume_routes.py's _RemoteResumeResponse does).
        self.send_started: float | None = None

    def supersede(self) -> None:
        self.superseded = True
        if self.wake is not None:
            self.wake()

    def abandon(self) -> None:
        self.scope.cancel()

    def expired(self, now: float) -> bool:
        return False


class _RemoteFollower:
    """A client following this stream from another instance, where its resume landed:
    it reads the stream's events from Redis (resume/shared.py), and its instance says so
    every third of the claim TTL."""

    def __init__(
        self,
        messages: FollowMessages,
        principal: str,
        session_id: str,
        follower_id: str,
        now: float,
    ) -> None:
        self._messages = messages
        self._about = (principal, session_id, follower_id)
        self.id = follower_id
        self.seen = now
        # Nothing here waits for its writes: the terminal event reaches it through Redis.
        self.done = anyio.Event()
        self.done.set()

    def supersede(self) -> None:
        self._messages.supersede(*self._about)

    def abandon(self) -> None:
        pass

    def expired(self, now: float) -> bool:
        return now - self.seen > self._messages.cluster.claim_ttl


def follow_messages(
    registry: Registry,
    settings: Settings,
    messages: FollowMessages,
    followers: dict[str, ClientFollower],
) -> Callable[[str, str, str, str], None]:
    """What this instance does with a message about a follower (messages.on_follow)."""

    def on_follow(kind: str, principal: str, session_id: str, follower_id: str) -> None:
        now = anyio.current_time()
        if kind == "supersede":
            local = followers.get(follower_id)
            if local is not None:
                local.supersede()
            return
        session = registry.get(session_id, principal)
        if session is None or not session.resumable or session.outcome is not None:
            return
        current = session.attached
        if kind == "attach":
            if isinstance(current, _RemoteFollower) and current.id == follower_id:
                current.seen = now
                return
            session.attach(_RemoteFollower(messages, principal, session_id, follower_id, now))
            logger.info("[SSE] %s followed from instance %s", session.id, follower_id.split("/")[0])
        elif isinstance(current, _RemoteFollower) and current.id == follower_id:
            session.detach(current, now)
            log_parked(session, settings.resume_window)

    return on_follow


def log_parked(session: Session, window: float) -> None:
    logger.info("[SSE] %s parked: the client left, resumable for %gs", session.id, window)


async def follow(
    settings: Settings,
    session: Session | None,
    log: EventLog | RemoteLog,
    receive: Receive,
    send: Send,
    after: int,
    *,
    body_send: Send | None = None,
    session_id: str = "",
    follower: ClientFollower | None = None,
) -> None:
    """Write ``log``'s events with ids above ``after`` to this client, then the new ones
    as they come, to the terminal event. ``session`` is None if the stream has ended.
    A newer client on the session supersedes this one; this one leaving parks the
    stream until a resume or the window's end (docs/resume.md). The body goes to
    ``body_send`` if given: the server's own (writer.SERVER_SEND)."""
    if follower is None:
        follower = ClientFollower()
    if session is not None:
        session.attach(follower)
    try:
        with follower.scope:
            async with anyio.create_task_group() as tg:

                async def listen() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(listen)
                if session is not None:
                    session_id = session.id
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", SSE_MEDIA_TYPE),
                            (b"cache-control", b"no-store"),
                            (b"x-accel-buffering", b"no"),
                            (b"x-session-id", session_id.encode()),
                            (b"x-resume-window", b"%g" % settings.resume_window),
                        ],
                    }
                )
                body = body_send or send
                await _follow(settings, session, log, body, after, follower)
                await body({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
    except CLIENT_GONE:
        pass
    finally:
        follower.done.set()
        parked = session is not None and session.detach(follower, anyio.current_time())
        if parked and session is not None and session.outcome is None:
            log_parked(session, settings.resume_window)


async def _follow(
    settings: Settings,
    session: Session | None,
    log: EventLog | RemoteLog,
    send: Send,
    after: int,
    follower: ClientFollower,
) -> None:
    ping = settings.ping_interval or math.inf
    # The loop's own clock, read at every token (see Session.clock).
    clock = anyio.current_time if session is None else session.clock
    cursor = after
    follower.wake = log.wake
    # When the client last heard from the stream. With the stream on this instance,
    # its watchdog asks for the pings (``log.pinged``). A follower of a stream on
    # another instance (``session`` None) has no watchdog here: it keeps the time
    # itself, woken by its log at every poll.
    heard_at = clock()
    while not follower.superseded:
        got = log.since(cursor)
        if got is not None:
            data, cursor, mark = got
            heard_at = clock()
            if session is not None:
                session.send_started_at = heard_at
            else:
                follower.send_started = heard_at
            await send({"type": "http.response.body", "body": data, "more_body": True})
            follower.send_started = None
            log.written_id = max(log.written_id, cursor)
            log.pinged = False  # needless after a write
            if session is not None:
                if mark is not None:
                    session.sent = mark
                session.send_started_at = None
                # The watchdog's next ping counts from here. Not ``last_write_at``:
                # that defers the provider's idle timeout, and a follower's writes do
                # not hold the provider up.
                session.last_ping_at = heard_at
            continue
        if log.closed:
            return
        if log.pinged or (session is None and clock() >= heard_at + ping):
            log.pinged = False
            follower.send_started = clock()
            await send({"type": "http.response.body", "body": PING, "more_body": True})
            follower.send_started = None
            heard_at = clock()
            continue
        await log.changed()
    await send({"type": "http.response.body", "body": SUPERSEDED, "more_body": True})

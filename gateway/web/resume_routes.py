"""The resume endpoint, ``GET /api/chat/stream/{session_id}`` with ``Last-Event-ID``:
a resumable stream picked up again on this instance, or followed from another through
Redis (docs/resume.md). The log and the followers are the resume part's
(gateway/resume/)."""

from __future__ import annotations

import contextlib
import logging

import anyio
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..cluster.link import is_redis_failure
from ..core.registry import SESSION_ID_RE
from ..core.session import Session
from ..errors import NotResumable, ResumeUnavailable
from ..logs import loggable
from ..resume.follow import ClientFollower, follow
from ..resume.log import EventLog
from ..resume.messages import FollowMessages
from ..resume.shared import RemoteLog, events_key
from .state import GatewayState, principal_of, state_of
from .validation import last_event_id_from
from .writer import SERVER_SEND

__all__ = ["chat_resume"]

logger = logging.getLogger(__name__)


async def chat_resume(request: Request) -> ASGIApp:
    """Pick a resumable stream up again after ``Last-Event-ID`` (docs/resume.md)."""
    state = state_of(request)
    principal = principal_of(request)
    session_id = request.path_params["session_id"]
    after = last_event_id_from(request.headers.get("last-event-id"))
    found = None
    if state.resume is not None and SESSION_ID_RE.fullmatch(session_id):
        found = state.resume.get(principal, session_id)
    if found is None and state.follow is not None:
        return await _resume_elsewhere(state, state.follow, principal, session_id, after)
    if found is None:
        # Another principal's stream answers exactly like an unknown one.
        raise NotResumable("no resumable stream has this id (unknown, ended, or expired)")
    log, session = found
    if not log.resumable_after(after):
        raise NotResumable(
            f"the events after id {after} are not held (they are {log.first_id}-{log.last_id})"
        )
    logger.info("[SSE] %s resumed after id %d", loggable(session_id), after)
    return _ResumeResponse(state, session, log, after)


async def _resume_elsewhere(
    state: GatewayState, messages: FollowMessages, principal: str, session_id: str, after: int
) -> ASGIApp:
    """A stream of another instance: its events from Redis, and its owner told that
    this client follows it (or the client gets a 503 if Redis cannot be reached)."""
    cluster = messages.cluster
    if cluster.client is None or not cluster.available:
        raise _resume_unavailable("the stream may live on another instance; Redis is unreachable")
    log = RemoteLog(cluster, events_key(principal, session_id))
    try:
        # Only a live stream's owner may still be appending what the client has seen.
        live = await cluster.owner(principal, session_id) is not None
        held = await log.load(after, _CATCH_UP if live else 0)
    except Exception as exc:
        if not is_redis_failure(exc):
            raise
        cluster.down(exc)
        raise _resume_unavailable("Redis failed while reading the stream") from exc
    if log.broken:
        # A gap or an entry that cannot be read: what would be replayed is not sure.
        raise _resume_unavailable("the stream's events in Redis cannot be read whole")
    if live and after > log.last_id:
        # Live, and its owner has not appended the client's events yet: not gone.
        raise _resume_unavailable("the stream's newest events have not reached Redis yet")
    if not held or not log.resumable_after(after):
        raise NotResumable("no resumable stream has this id (unknown, ended, or expired)")
    follower_id = messages.new_follower_id()
    if not log.closed:
        await messages.tell_owner("attach", principal, session_id, follower_id)
    logger.info(
        "[SSE] %s resumed after id %d (its stream lives on another instance)",
        loggable(session_id),
        after,
    )
    about = (principal, session_id, follower_id)
    return _RemoteResumeResponse(state, messages, log, about, after)


# How long a resume on another instance waits for the owner's last events to reach Redis.
_CATCH_UP = 1.0


def _resume_unavailable(message: str) -> ResumeUnavailable:
    """503: the answer is "try again", not "gone"; a second is about how long the
    owner's next append, or Redis coming back, takes."""
    return ResumeUnavailable(message, headers={"Retry-After": "1"})


class _RemoteResumeResponse:
    def __init__(
        self,
        state: GatewayState,
        messages: FollowMessages,
        log: RemoteLog,
        about: tuple[str, str, str],
        after: int,
    ) -> None:
        self._state, self._messages, self._log = state, messages, log
        self._about = about
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal, session_id, follower_id = self._about
        follower = ClientFollower()
        self._state.followers[follower_id] = follower
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._watch, follower, tg.cancel_scope)
                await follow(
                    self._state.settings,
                    None,
                    self._log,
                    receive,
                    send,
                    self._after,
                    body_send=scope.get(SERVER_SEND),
                    session_id=session_id,
                    follower=follower,
                )
                tg.cancel_scope.cancel()
        finally:
            del self._state.followers[follower_id]
            with anyio.move_on_after(1.0, shield=True), contextlib.suppress(ResumeUnavailable):
                await self._messages.tell_owner("detach", principal, session_id, follower_id)

    async def _watch(self, follower: ClientFollower, scope: anyio.CancelScope) -> None:
        """A client that stops reading, as the owner's watchdog does for its own: after
        GATEWAY_SEND_TIMEOUT on one write, it is let go and the owner told, which parks
        the stream for a resume. Under Trio the write itself may stay stuck (hypercorn
        shields it) until the client reads or goes; nothing waits for it."""
        bound = self._state.settings.send_timeout
        while True:
            started = follower.send_started
            if started is None:
                await anyio.sleep(bound)
                continue
            await anyio.sleep_until(started + bound)
            if follower.send_started == started:
                break
        principal, session_id, follower_id = self._about
        logger.info("[SSE] %s follower let go: its client stopped reading", session_id)
        follower.abandon()
        scope.cancel()  # the heartbeat, so that the owner's detach is the last word
        with anyio.move_on_after(1.0, shield=True), contextlib.suppress(ResumeUnavailable):
            await self._messages.tell_owner("detach", principal, session_id, follower_id)

    async def _heartbeat(self) -> None:
        """The owner lets a follower go that it has not heard of for a claim TTL."""
        while True:
            await anyio.sleep(self._messages.cluster.claim_ttl / 3)
            with contextlib.suppress(ResumeUnavailable):
                await self._messages.tell_owner("attach", *self._about)


class _ResumeResponse:
    def __init__(
        self, state: GatewayState, session: Session | None, log: EventLog, after: int
    ) -> None:
        self._args = (state, session, log)
        self._after = after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state, session, log = self._args
        await follow(
            state.settings,
            session,
            log,
            receive,
            send,
            self._after,
            body_send=scope.get(SERVER_SEND),
        )

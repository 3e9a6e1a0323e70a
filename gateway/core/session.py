"""A Session: one stream's cancel scope, its outcome, and its single end-of-life line.

``Session.cancel(reason)`` is the one cancellation path; this module holds all of it.
The cancel endpoint and forwarded cancels call ``stop`` (cancel, then wait for the
stream's end), a client that has gone calls ``client_left``, every timeout and server
shutdown call ``cancel``. The first outcome wins, whether a stop, a completion or a
failure; later ones are ignored. A cancel closes the provider's connection itself,
at once, wherever the relay is; what the stream does then (write the terminal event,
log one line, set ``ended``) is ``ChatStream._finish`` in web/stream.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
import sniffio
import trio

from ..errors import UpstreamError

if TYPE_CHECKING:
    from ..provider.client import UpstreamResponse

__all__ = [
    "Attempt",
    "Completed",
    "Failed",
    "Follower",
    "Mark",
    "Outcome",
    "Session",
    "StopReason",
    "Stopped",
]

logger = logging.getLogger(__name__)

StopReason = Literal["cancel", "disconnect", "timeout", "shutdown"]

# A stream's running counts of token, reasoning, tool-call and refusal events once a
# chunk is written: the last one written is what the client was delivered.
Mark = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Completed:
    finish_reason: str | None
    usage: dict[str, object] | None
    # The provider's own words for the end, where its API has more (provider/anthropic.py).
    native_stop: dict[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class Stopped:
    reason: StopReason
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    code: str
    message: str
    upstream_status: int | None = None
    # The provider's own error type/code (identifiers), for the log only.
    provider_error: dict[str, str] | None = None
    # An identifier the client is told (the provider's native finish reason).
    detail: str | None = None
    # Why no connection was made (errors.CONNECT_CAUSES), and OpenSSL's words: for the
    # operator's log and metrics only.
    cause: str | None = None
    note: str | None = None

    @classmethod
    def from_error(cls, exc: UpstreamError) -> Failed:
        return cls(
            exc.code,
            exc.message,
            exc.upstream_status,
            exc.provider_error,
            exc.detail,
            exc.cause,
            exc.note,
        )


Outcome = Completed | Stopped | Failed


@dataclass(slots=True)
class Attempt:
    """One provider a stream tried (docs/routing.md): who, when, and how it went.

    ``result``: ``None`` while it runs; ``served`` once a delta came (or the answer
    ended without one), ``failed`` (``code``, ``upstream_status``) when the next
    target was tried or the stream failed, ``stopped`` when a stop ended it."""

    provider: str
    model: str
    started_at: float
    result: str | None = None
    # A delta came (or the answer ended without one): this provider serves the stream.
    served: bool = False
    code: str | None = None
    upstream_status: int | None = None
    # Why its connection failed (errors.CONNECT_CAUSES).
    cause: str | None = None
    ended_at: float | None = None

    def report(self, origin: float) -> dict[str, object]:
        """What the end line and the terminal event say of it (times in ms after
        ``origin``, the stream's start)."""
        data: dict[str, object] = {
            "provider": self.provider,
            "model": self.model,
            "result": self.result,
            "started_ms": round((self.started_at - origin) * 1000),
            "ended_ms": None if self.ended_at is None else round((self.ended_at - origin) * 1000),
        }
        if self.code is not None:
            data["code"] = self.code
        if self.upstream_status is not None:
            data["upstream_status"] = self.upstream_status
        if self.cause is not None:
            data["cause"] = self.cause
        return data


class Follower(Protocol):
    """A client reading a resumable stream (resume/follow.py)."""

    done: anyio.Event

    def supersede(self) -> None: ...

    def abandon(self) -> None: ...

    def expired(self, now: float) -> bool:
        """A follower on another instance that stopped saying it is there."""
        ...


class Session:
    """State of one live stream, keyed in the registry by the client's session id.

    Times are on ``anyio.current_time()``, the clock the watchdog sleeps on, read
    through ``clock``.
    """

    __slots__ = (
        "_ended",
        "_has_ended",
        "attached",
        "attempts",
        "client_gone",
        "clock",
        "first_at",
        "first_delta_at",
        "first_token_timeout",
        "id",
        "last_delta_at",
        "last_ping_at",
        "last_write_at",
        "model",
        "outcome",
        "parked_at",
        "principal",
        "provider_closed_at",
        "reasoning_delivered",
        "refusal_delivered",
        "response_started",
        "resumable",
        "routed",
        "scope",
        "send_started_at",
        "sent",
        "seq",
        "started_at",
        "stopped_at",
        "tokens_delivered",
        "tool_calls_delivered",
        "upstream",
    )

    def __init__(self, session_id: str, model: str, principal: str = "anonymous") -> None:
        self.id = session_id
        self.model = model
        self.principal = principal
        # The provider's opening runs in it (web/stream.py), which drops it once open.
        self.scope: anyio.CancelScope | None = anyio.CancelScope()
        # The provider's response while it is read: the cancel path closes it itself,
        # so the provider sees EOF however busy the relay is (writing to a slow client).
        self.upstream: UpstreamResponse | None = None
        self.outcome: Outcome | None = None
        self.clock = _current_clock()
        self.started_at = self.clock()
        # Token, reasoning, tool-call and refusal events encoded for the client; all of
        # them precede the terminal event. After a hard cancel, the ones whose write
        # completed (``sent``).
        self.tokens_delivered = 0
        self.reasoning_delivered = 0
        self.tool_calls_delivered = 0
        self.refusal_delivered = 0
        # The counts the completed writes to the client carried.
        self.sent: Mark = (0, 0, 0, 0)
        self.seq = 0
        # The first delta of any kind ends the first-token timeout; each kind's first
        # is reported ("content", "reasoning", "tool_call").
        self.first_delta_at: float | None = None
        self.first_at: dict[str, float] = {}
        # The watchdog's first-token timeout: the provider's. Infinite when the stream
        # has several targets: each attempt then has its own (web/stream.py).
        self.first_token_timeout = math.inf
        # The providers tried, in order (several when a route falls back); ``routed``:
        # the routes are GATEWAY_CONFIG's, and the client is told who served it.
        self.attempts: list[Attempt] = []
        self.routed = False
        self.last_delta_at = self.started_at
        # The end of the relay's last write: the provider's silence is counted from
        # the later of it and the last delta, since a relay blocked writing to a slow
        # client is not waiting for the provider. Pings do not count (``last_ping_at``).
        self.last_write_at = self.started_at
        self.last_ping_at = self.started_at
        self.send_started_at: float | None = None
        # When the stop was triggered, and when the provider's connection was closed
        # after it: the Stop latency (metrics.py).
        self.stopped_at: float | None = None
        self.provider_closed_at: float | None = None
        self.client_gone = False
        self.response_started = False
        # ``ended`` is made only when something waits for it (a cancel, the shutdown):
        # most streams end with nobody waiting, and an event is three objects more
        # for the garbage collector to walk while the stream lives.
        self._ended: anyio.Event | None = None
        self._has_ended = False
        # A resumable stream (docs/resume.md): the client following it, if any, and
        # since when nobody has (parked).
        self.resumable = False
        self.attached: Follower | None = None
        self.parked_at: float | None = None

    @property
    def ended(self) -> anyio.Event:
        """Set once the stream has ended (``end``): provider closed, terminal event
        written, id free."""
        if self._ended is None:
            self._ended = anyio.Event()
            if self._has_ended:
                self._ended.set()
        return self._ended

    def end(self) -> None:
        """The stream has ended: ``ended`` is set, now or when it is made."""
        self._has_ended = True
        if self._ended is not None:
            self._ended.set()

    def delivered(self) -> Mark:
        return (
            self.tokens_delivered,
            self.reasoning_delivered,
            self.tool_calls_delivered,
            self.refusal_delivered,
        )

    def count_only_sent(self) -> None:
        """The writes were cut short (or a follower left): only what went out counts."""
        (
            self.tokens_delivered,
            self.reasoning_delivered,
            self.tool_calls_delivered,
            self.refusal_delivered,
        ) = self.sent

    def first_delta_ms(self) -> dict[str, int]:
        return {kind: round((at - self.started_at) * 1000) for kind, at in self.first_at.items()}

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def cancel(self, reason: StopReason, detail: str | None = None) -> bool:
        """Stop the stream for ``reason``; ``False`` if it already has an outcome."""
        if not self.settle(Stopped(reason, detail)):
            return False
        self.stopped_at = anyio.current_time()
        self.close_provider()
        return True

    def close_provider(self) -> None:
        """Cancel the opening of the provider's response, or abort its connection once
        open: the provider sees EOF now, whatever the relay is doing."""
        if self.scope is not None:
            self.scope.cancel()
        upstream = self.upstream
        if upstream is not None:
            upstream.abort()
            if self.provider_closed_at is None:
                self.provider_closed_at = anyio.current_time()

    async def stop(self, wait: float) -> bool | None:
        """Cancel (reason ``cancel``) and wait up to ``wait`` for the stream's end:
        provider closed, terminal event written. ``None`` if it already had an outcome
        (nothing to stop), else whether it ended in time."""
        if not self.cancel("cancel"):
            return None
        with anyio.move_on_after(wait):
            await self.ended.wait()
        return self.ended.is_set()

    def fail(self, failed: Failed) -> bool:
        """End the stream with ``failed`` from outside its relay (the provider is closed,
        the client gets the error); ``False`` if it already has an outcome."""
        if not self.settle(failed):
            return False
        self.close_provider()
        return True

    def client_left(self, reason: StopReason, detail: str | None = None) -> None:
        """The client is gone (disconnected, or stopped reading): nothing more can reach
        it, so no terminal event is written; stop the stream for ``reason``."""
        self.client_gone = True
        self.cancel(reason, detail)

    def attach(self, follower: Follower) -> None:
        """A client follows the stream from now on; the one before, if any, is told it
        was superseded."""
        previous = self.attached
        if previous is not None:
            previous.supersede()
        self.attached = follower
        self.parked_at = None

    def detach(self, follower: Follower, now: float) -> bool:
        """``follower`` has left: if it was the one attached, the stream is parked
        (True) until a resume or the window's end."""
        if self.attached is not follower:
            return False
        self.attached = None
        self.parked_at = now
        self.send_started_at = None
        return True

    def settle(self, outcome: Outcome) -> bool:
        if self.outcome is not None:
            return False
        self.outcome = outcome
        return True


def _current_clock() -> Callable[[], float]:
    """``anyio.current_time`` for the running event loop, as the loop's own function:
    the same values without anyio asking which library runs at every call, which
    costs several times the read itself; the token path reads the time three times."""
    if sniffio.current_async_library() == "trio":
        return trio.current_time
    return asyncio.get_running_loop().time

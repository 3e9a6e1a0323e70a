"""A stream's events, written to its client by the relay's own task.

The relay reads the provider, encodes the deltas and writes them here, all in one
task: a token costs one wake-up. A relay blocked writing to a client that stopped
reading does not hold the provider: the cancel path closes the provider's connection
itself (``Session.cancel``), and the stream's end is not kept waiting on the write
longer than the send timeout (stream.py, the Sink protocol of core/sink.py).

Pings come from the watchdog while the relay waits for the provider: each is written
by a short task of its own, and the two never write at the same time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup
from starlette.types import Send

from ..core.session import Mark
from ..errors import CLIENT_GONE

if TYPE_CHECKING:
    from ..core.session import Session
    from .formats import AnswerFormat

__all__ = ["SERVER_SEND", "ClientWriter"]

# The scope key of the server's own ``send`` (api.py puts it there). The body's chunks
# go to it directly, past Starlette's middleware, whose wrappers of ``send`` only watch
# for ``http.response.start`` (tests/test_writer.py holds the middleware to that): three
# calls fewer per token. The response's start still goes through them.
SERVER_SEND = "gateway.server_send"


class ClientWriter:
    """Writes a stream's chunks to its client, one ``send`` each, counting what went."""

    def __init__(
        self,
        session: Session,
        answer: AnswerFormat,
        send: Send,
        body_send: Send | None = None,
        send_timeout: float = 10.0,
    ) -> None:
        self._session = session
        # How long the terminal event and the response's end may take to go.
        self._send_timeout = send_timeout
        self._answer = answer
        self._send = send
        self._send_body = body_send or send
        # A send under way (the relay's or a ping's), and who waits for it to end.
        self._busy = False
        self._free: anyio.Event | None = None
        self._closed = False
        # A send was cut short (the request cancelled): its chunk may not have gone.
        self.interrupted = False
        self.pings: TaskGroup | None = None

    async def start(self, first: bytes) -> None:
        """The response's start, if the answer streams (its status is known), then
        ``first``, the stream's first event. The relay runs already: its writes wait
        for both (nothing awaits between the two: no write comes between them)."""
        session = self._session
        if self._answer.streaming and not session.client_gone:
            self._busy = True
            try:
                await self._start_response()
            except CLIENT_GONE:
                session.client_left("disconnect")
            finally:
                self._release()
        if first:
            await self.write(first)

    async def write(self, data: bytes, mark: Mark | None = None) -> None:
        """Write ``data`` to the client; ``mark`` counts as delivered once it has gone.
        Waits while the client is slow to read: the back-pressure the provider feels."""
        session = self._session
        while self._busy:
            if self._free is None:
                self._free = anyio.Event()
            await self._free.wait()
        if self._closed or session.client_gone:
            return  # nothing more can reach it; the stream is being stopped
        self._busy = True
        try:
            if not session.response_started:
                # An answer assembled whole: its outcome, now known, sets the status.
                await self._start_response()
            session.send_started_at = session.clock()
            await self._send_body({"type": "http.response.body", "body": data, "more_body": True})
        except CLIENT_GONE:
            session.client_left("disconnect")
            return
        except BaseException:
            # Counted once the send returns: hypercorn's Trio worker can be cancelled
            # before its (shielded) write, never after it.
            self.interrupted = True
            raise
        finally:
            session.send_started_at = None
            self._release()
        if mark is not None:
            session.sent = mark
        session.last_write_at = session.clock()

    def write_nowait(self, data: bytes, mark: Mark | None = None) -> None:
        """A ping: written by a task of its own, unless a write is under way (which
        makes the ping needless); ``anyio.WouldBlock`` then."""
        if self._busy or self._closed or self._session.client_gone or self.pings is None:
            raise anyio.WouldBlock
        self._busy = True
        self.pings.start_soon(self._ping, data)

    async def finish(self, terminal: Callable[[], bytes], relayed: bool) -> None:
        """The terminal event and the response's end, unless the client is gone or the
        relay is still stuck in a write, each bounded by the send timeout."""
        session = self._session
        if not relayed or self.interrupted:
            # What the relay was writing may not have gone: count what did.
            session.count_only_sent()
        if relayed and not session.client_gone:
            with anyio.move_on_after(self._send_timeout):
                await self.write(terminal(), session.delivered())
                await self._end()
        self.close()

    async def _end(self) -> None:
        """The response's end, once the terminal event is written."""
        session = self._session
        while self._busy:
            if self._free is None:
                self._free = anyio.Event()
            await self._free.wait()
        self._closed = True
        if session.client_gone or not session.response_started:
            return
        try:
            await self._send_body({"type": "http.response.body", "body": b"", "more_body": False})
        except CLIENT_GONE:
            session.client_left("disconnect")

    def close(self) -> None:
        """Nothing more is written (the client is gone, or its send is stuck)."""
        self._closed = True

    async def _ping(self, data: bytes) -> None:
        session = self._session
        try:
            session.send_started_at = anyio.current_time()
            await self._send_body({"type": "http.response.body", "body": data, "more_body": True})
            session.last_ping_at = anyio.current_time()
        except CLIENT_GONE:
            session.client_left("disconnect")
        finally:
            session.send_started_at = None
            self._release()

    async def _start_response(self) -> None:
        session = self._session
        await self._send(
            {
                "type": "http.response.start",
                "status": self._answer.status(session),
                "headers": [
                    (b"content-type", self._answer.media_type),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                    (b"x-session-id", session.id.encode()),
                ],
            }
        )
        session.response_started = True

    def _release(self) -> None:
        self._busy = False
        if self._free is not None:
            self._free.set()
            self._free = None

"""The bounded hand-off from a stream's relay to its sender.

An anyio memory stream costs two scheduler round-trips per item (a checkpoint in
``send`` and one in ``receive``) on top of the wake-up itself. Here a put with room
is a plain append, and the sender takes everything queued in one wake-up, so a token
costs one wake-up at most (docs/benchmarks.md, "Optimization steps").
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["Mark", "Outbox"]

# A stream's running counts of token, reasoning and tool-call events once a chunk is
# written: the sender takes the last one of what it wrote as the counts delivered.
Mark = tuple[int, int, int]


class Outbox:
    """Up to ``size`` chunks of bytes waiting for the sender, with their marks.

    Closed by the producer (``close()``: the sender writes what is left, then ends) or
    by the consumer (``close_receiver()``: further puts raise ``BrokenResourceError``).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: deque[tuple[bytes, Mark | None]] = deque()
        self._closed = False
        self._receiver_closed = False
        self._data_ready: anyio.Event | None = None
        self._room_ready: anyio.Event | None = None

    def put_nowait(self, data: bytes, mark: Mark | None = None) -> None:
        """Queue ``data``; raise ``anyio.WouldBlock`` if full."""
        if self._receiver_closed:
            raise anyio.BrokenResourceError
        if self._closed:
            raise anyio.ClosedResourceError
        if len(self._items) >= self._size:
            raise anyio.WouldBlock
        self._items.append((data, mark))
        if self._data_ready is not None:
            self._data_ready.set()
            self._data_ready = None

    async def put(self, data: bytes, mark: Mark | None = None) -> None:
        """Queue ``data``, waiting for room: the back-pressure the provider feels."""
        while True:
            try:
                self.put_nowait(data, mark)
                return
            except anyio.WouldBlock:
                if self._room_ready is None:
                    self._room_ready = anyio.Event()
                await self._room_ready.wait()

    async def take(self) -> tuple[bytes, Mark | None] | None:
        """Everything queued, joined, with its last mark; ``None`` once closed and empty."""
        while not self._items:
            if self._closed or self._receiver_closed:
                return None
            if self._data_ready is None:
                self._data_ready = anyio.Event()
            await self._data_ready.wait()
        items = self._items
        if len(items) == 1:
            data, mark = items.popleft()
        else:
            data = b"".join(d for d, _ in items)
            mark = next((m for _, m in reversed(items) if m is not None), None)
            items.clear()
        if self._room_ready is not None:
            self._room_ready.set()
            self._room_ready = None
        return data, mark

    def close(self) -> None:
        """No more puts: ``take()`` returns what is left, then ``None``."""
        self._closed = True
        self._wake()

    def close_receiver(self) -> None:
        """The sender is gone: puts raise ``BrokenResourceError``, and nothing queued is sent."""
        self._receiver_closed = True
        self._items.clear()
        self._wake()

    def _wake(self) -> None:
        for event in (self._data_ready, self._room_ready):
            if event is not None:
                event.set()
        self._data_ready = self._room_ready = None

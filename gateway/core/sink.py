"""Where a stream's relay writes: the one interface of a stream's two outputs, the
client itself (``web/writer.py``) and a resumable stream's log, which its clients
follow (``resume/stream.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .session import Mark

__all__ = ["Sink"]


class Sink(Protocol):
    async def start(self, first: bytes) -> None:
        """The response's start, if its status is known, and the stream's first event
        (``first``; nothing if empty). Called once the relay has started: no write
        goes before these two."""

    async def write(self, data: bytes, mark: Mark | None = None) -> None:
        """Hand ``data`` on; ``mark``, the stream's counts once it is written, counts
        as delivered when it has gone. May wait for a slow client (back-pressure)."""

    def write_nowait(self, data: bytes, mark: Mark | None = None) -> None:
        """A ping, if it can go without waiting; ``anyio.WouldBlock`` if not (a write
        under way makes it needless)."""

    async def finish(self, terminal: Callable[[], bytes], relayed: bool) -> None:
        """The stream's end, its outcome settled: the terminal event (``terminal()``,
        called once the counts are final) for whoever reads, then the output closed.
        ``relayed``: the relay ended, so nothing else is writing."""

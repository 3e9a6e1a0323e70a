"""Under Trio, a response's bytes go to the client's socket without a scheduling round
when nothing else is writing to it.

hypercorn's Trio server writes each ASGI send under a lock, in a shielded scope, with
``SocketStream.send_all``: the lock's acquire yields once, and the socket's send yields
again after the bytes are in the kernel. A streamed token costs the relay's task two
rounds more than its read of the provider, and the first token's path (the response's
head, the ``start`` event, the token) six: under load every round waits behind the
other streams' work (docs/benchmarks.md, "The first token"). hypercorn's asyncio server
yields in neither place.

``install()`` replaces ``TCPServer.protocol_send`` of hypercorn's Trio server: bytes to
a plain TCP socket (not TLS) whose lock is free are written at once, as far as the
socket takes them; what it does not take, and everything else, goes through hypercorn's
own ``protocol_send``, shielded as its write is, so a cancel cannot leave an event half
written. A send that takes the fast way is not a checkpoint: a cancelled task sees its
cancel at its next one (the relay's next read), its bytes written.
"""

from __future__ import annotations

import os
from typing import Any

import trio
from hypercorn.events import Event, RawData
from hypercorn.trio.tcp_server import TCPServer

__all__ = ["fits", "install"]


def fits() -> bool:
    """Whether the installed hypercorn's Trio server has what the fast way uses: its
    send lock and its stream. Without them ``install`` leaves hypercorn as it is."""
    try:
        server = TCPServer(*[None] * 5)  # type: ignore[arg-type]
    except Exception:  # any change of the constructor
        return False
    return isinstance(getattr(server, "send_lock", None), trio.Lock) and hasattr(server, "stream")


def install() -> None:
    """Every hypercorn Trio server in the process writes this way from now on, if the
    installed hypercorn fits; idempotent."""
    send = TCPServer.protocol_send
    if getattr(send, "_writes_at_once", False) or not fits():
        return

    async def protocol_send(server: Any, event: Event) -> None:
        if type(event) is RawData and event.data and not server.send_lock.locked():
            stream = server.stream
            if type(stream) is trio.SocketStream and not stream.socket.did_shutdown_SHUT_WR:
                data = event.data
                try:
                    written = os.write(stream.socket.fileno(), data)
                except OSError:  # would block, closed or broken: hypercorn's way says
                    written = 0
                if written == len(data):
                    return
                if written:
                    # The rest, before any other send (the lock is taken at once), and
                    # whole: a cancel must not cut the event written so far.
                    with trio.CancelScope(shield=True):
                        await send(server, RawData(data=data[written:]))
                    return
        await send(server, event)

    protocol_send._writes_at_once = True  # type: ignore[attr-defined]
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign,assignment]

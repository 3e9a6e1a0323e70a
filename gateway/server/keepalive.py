"""A fix for hypercorn 0.18: a connection whose client has closed its end is closed at
once, not after ``keep_alive_timeout`` (docs/hypercorn-keepalive.md is the report for
hypercorn's tracker).

A connection's keep-alive timer is a task in the connection's own task group, and the
end of the client's data does not stop it: the task group then waits out
``keep_alive_timeout`` before the socket is closed, its objects all kept alive
meanwhile (a socket in CLOSE_WAIT for each client that closed). Once the connection's
protocol has handled its close, as the reading does at the client's end, the timer is
stopped, and the connection closes as it would on a timeout.

``install()`` runs when ``gateway.app`` is imported (so plain ``hypercorn
gateway.app:app`` has it) and in ``serve()``. It patches hypercorn's classes, so it
first checks that the installed hypercorn has what it patches, and refuses to start
(``ConfigError``) when it does not: a silent no-op would bring the lingering sockets
back unseen.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import Any

from hypercorn.asyncio.tcp_server import TCPServer as AsyncioTCPServer
from hypercorn.events import Closed, Event
from hypercorn.protocol import ProtocolWrapper
from hypercorn.trio.tcp_server import TCPServer as TrioTCPServer

from ..errors import ConfigError

__all__ = ["install", "missing"]

# Each TCP server class, with the number of arguments of its constructor.
_SERVERS: tuple[tuple[type[Any], int], ...] = ((AsyncioTCPServer, 7), (TrioTCPServer, 5))


def missing() -> list[str]:
    """What the fix relies on that the installed hypercorn lacks; empty when it has it
    all."""
    lacks: list[str] = []
    if not callable(getattr(ProtocolWrapper, "handle", None)):
        lacks.append("ProtocolWrapper.handle")
    if "send" not in inspect.signature(ProtocolWrapper.__init__).parameters:
        lacks.append("ProtocolWrapper(send=...)")
    for server_class, arguments in _SERVERS:
        name = f"{server_class.__module__}.TCPServer"
        # The server hands the wrapper its bound protocol_send: the fix finds the
        # server, and its idle timer, through it.
        if not inspect.iscoroutinefunction(getattr(server_class, "protocol_send", None)):
            lacks.append(f"{name}.protocol_send")
        try:
            server = server_class(*[None] * arguments)
        except Exception:  # any change of the constructor
            lacks.append(f"{name}({arguments} arguments)")
            continue
        if not callable(getattr(getattr(server, "idle_task", None), "stop", None)):
            lacks.append(f"{name}.idle_task.stop")
    for method in ("_idle_timeout", "_initiate_server_close"):
        if not inspect.iscoroutinefunction(getattr(AsyncioTCPServer, method, None)):
            lacks.append(f"{AsyncioTCPServer.__module__}.TCPServer.{method}")
    return lacks


def install() -> None:
    """Make a connection that the client closed close at once, on every hypercorn
    server in the process from now on; idempotent."""
    lacks = missing()
    if lacks:
        raise ConfigError(
            "the installed hypercorn lacks what the gateway's keep-alive fix patches ("
            + ", ".join(lacks)
            + "); install the hypercorn version pyproject.toml names "
            "(docs/hypercorn-keepalive.md)"
        )
    handle = ProtocolWrapper.handle
    if getattr(handle, "_closes_at_eof", False):
        return

    async def closed(wrapper: ProtocolWrapper, event: Closed) -> None:
        await handle(wrapper, event)
        # The connection's server, whose protocol_send the wrapper was given.
        server: Any = getattr(wrapper.send, "__self__", None)
        if not isinstance(server, (AsyncioTCPServer, TrioTCPServer)):
            return
        await server.idle_task.stop()
        if isinstance(server, AsyncioTCPServer):
            # A client that sent its end with its request (half-closed) can send no
            # other: once the answer still being written is done, hypercorn restarts
            # the idle timer, and would wait out keep_alive_timeout for nothing. Its
            # timeout, made to close at once, as it closes when it fires.
            async def close_now() -> None:
                await asyncio.shield(server._initiate_server_close())

            server._idle_timeout = close_now  # type: ignore[method-assign]

    def _handle(wrapper: ProtocolWrapper, event: Event) -> Awaitable[None]:
        # Any other event gets hypercorn's own coroutine: no frame of ours waits in the
        # reads, nor shows in a traceback of hypercorn's when it cancels them.
        if isinstance(event, Closed):
            return closed(wrapper, event)
        return handle(wrapper, event)

    _handle._closes_at_eof = True  # type: ignore[attr-defined]
    ProtocolWrapper.handle = _handle  # type: ignore[method-assign,assignment]

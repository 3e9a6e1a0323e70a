"""The least a relay on hypercorn can do per token, measured beside the gateway.

A raw ASGI app (no Starlette, no HTTP client, no parsing): for each stream it takes a
plain TCP connection to the provider opened ahead, writes the request by hand, and for
every read from that socket sends one fixed ``token`` event to the client (the first
once the provider's first event is in). At a paced load each
read is one token, so its CPU per token is hypercorn's own per-event cost plus one
socket read: a floor no hypercorn-based relay goes below. It is not a correct proxy
(no cancel endpoint, no framing); `make bench` uses it for CPU figures only.

``python -m bench.floor -k uvloop -b 127.0.0.1:9000 --upstream http://.../v1``
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx2 as httpx

from . import serving

_TOKEN = b'event: token\ndata: {"delta":" x"}\n\n'
_START = b'event: start\ndata: {"session_id":"floor"}\n\n'


def create_app(upstream_url: str) -> Any:
    url = httpx.URL(upstream_url)
    host, port, path = url.host, url.port or 80, url.raw_path.decode() + "/chat/completions"
    # A provider connection opened ahead, taken by the next stream: as the gateway takes
    # one its pool kept alive, so no connect is on the first token's path of either
    # (bench/firsttoken.py compares the two).
    ready: list[anyio.abc.SocketStream] = []

    async def provider_connection() -> anyio.abc.SocketStream:
        return ready.pop() if ready else await anyio.connect_tcp(host, port)

    async def open_next() -> None:
        with anyio.move_on_after(5, shield=True):
            if not ready:
                connection = await anyio.connect_tcp(host, port)
                if ready:  # another stream's end opened one meanwhile
                    await connection.aclose()
                else:
                    ready.append(connection)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["method"] == "GET":
            # bench/firsttoken.py's warm-up request: a connection accepted and used.
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": _START, "more_body": True})
        try:
            await _relay(await provider_connection(), body, receive, send)
        finally:
            # After the stream, not during it: the next one's connection.
            await open_next()

    async def _relay(
        upstream: anyio.abc.SocketStream, body: bytes, receive: Any, send: Any
    ) -> None:
        async with upstream, anyio.create_task_group() as tg:

            async def disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(disconnect)
            await upstream.send(
                b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (path.encode(), host.encode(), len(body), body)
            )
            try:
                # The first token is sent once the provider's first event has come, not
                # at the read of its response head (when the two come apart), as the
                # gateway's does: the first-token comparison waits for the same bytes.
                before = b""
                while b"data:" not in before:
                    before += await upstream.receive()
                while True:
                    await send({"type": "http.response.body", "body": _TOKEN, "more_body": True})
                    await upstream.receive()
            except anyio.EndOfStream:
                tg.cancel_scope.cancel()

    return app


if __name__ == "__main__":
    serving.main(create_app)

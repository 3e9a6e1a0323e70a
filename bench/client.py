"""Raw-socket clients for the benchmark, so the load generator costs little CPU."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, cast

_ENDS = (b"event: done", b"event: stopped", b"event: error")
_TOKEN = b"event: token"
# /v1/chat/completions (OpenAI's chunks): a content chunk, and the stream's last lines.
_OPENAI_ENDS = (b"data: [DONE]", b'data: {"error"')
_OPENAI_TOKEN = b'"delta":{"content":'
# The client surfaces: path, a content delta's mark, the stream's last events, the
# body's own fields.
SURFACES: dict[str, tuple[str, bytes, tuple[bytes, ...], dict[str, object]]] = {
    "api": ("/api/chat/stream", _TOKEN, _ENDS, {}),
    "openai": ("/v1/chat/completions", _OPENAI_TOKEN, _OPENAI_ENDS, {"stream": True}),
    "messages": (
        "/v1/messages",
        b'"type":"text_delta"',
        (b"event: message_stop", b"event: error"),
        {"stream": True, "max_tokens": 4096},
    ),
}


class SSEStream(asyncio.Protocol):
    """One streaming request; notes the first token and the end, nothing else."""

    def __init__(self, surface: str = "api") -> None:
        loop = asyncio.get_running_loop()
        _, self._marker, self._ends, _ = SURFACES[surface]
        self._keep = len(self._marker) - 1
        self.first_token: asyncio.Future[float] = loop.create_future()
        # A whole answer with a length, before the stream's (bench/firsttoken.py's
        # warm-up request's), when one is awaited.
        self.answered: asyncio.Future[None] = loop.create_future()
        self._before: bytearray | None = None
        self.ended: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.tokens = 0
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def await_answer(self) -> asyncio.Future[None]:
        """Take the next answer (one with a ``content-length``) as not the stream's."""
        self._before = bytearray()
        return self.answered

    def data_received(self, data: bytes) -> None:
        if self._before is not None:
            self._before += data
            head, ended, body = self._before.partition(b"\r\n\r\n")
            if not ended:
                return
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            if len(body) < length:
                return
            data = bytes(body[length:])
            self._before = None
            self.answered.set_result(None)
        # The tail is shorter than the marker, so a marker split across two reads is
        # counted once, in the read that completes it.
        window = self._tail + data
        self._tail = window[-self._keep :]
        found = window.count(self._marker)
        self.tokens += found
        if found and not self.first_token.done():
            self.first_token.set_result(time.monotonic())
        if not self.ended.done() and any(end in window for end in self._ends):
            self.ended.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.cancel()
        if not self.ended.done():
            self.ended.set_result(None)
        if not self.first_token.done():
            self.first_token.cancel()

    def close(self) -> None:
        """Disconnect, as a browser tab closing does (FIN)."""
        assert self.transport is not None
        self.transport.close()


def stream_request(port: int, sid: str, mode: str, n: int = 0, surface: str = "api") -> bytes:
    """The bytes of a request for a stream on a surface (``SURFACES``): the gateway's
    ``/api/chat/stream``, ``/v1/chat/completions`` (which the provider itself also
    answers), ``/v1/messages``."""
    path, _, _, fields = SURFACES[surface]
    body = json.dumps(
        {"messages": [{"role": "user", "content": f"bench:{sid}:{mode}:{n}"}], **fields}
    ).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"X-Session-Id: {sid}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def open_stream(
    port: int, sid: str, mode: str, n: int = 0, surface: str = "api"
) -> SSEStream:
    """A stream on a surface (``SURFACES``)."""
    request = stream_request(port, sid, mode, n, surface)
    loop = asyncio.get_running_loop()
    transport, stream = await loop.create_connection(lambda: SSEStream(surface), "127.0.0.1", port)
    stream.transport = transport
    transport.write(request)
    return stream


class _Response(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = self.buf[:end].lower()
        i = head.find(b"content-length:")
        length = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
        if len(self.buf) >= end + 4 + length:
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.waiter.set_result(body)
            self.waiter = None


class Control:
    """A keep-alive HTTP/1.1 connection for small requests (cancel, provider control)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._proto: _Response | None = None

    async def _connect(self) -> _Response:
        if (
            self._proto is None
            or self._proto.transport is None
            or self._proto.transport.is_closing()
        ):
            loop = asyncio.get_running_loop()
            transport, self._proto = await loop.create_connection(_Response, "127.0.0.1", self.port)
            self._proto.transport = transport
        return self._proto

    async def request(self, method: str, path: str) -> Any:
        proto = await self._connect()
        assert proto.transport is not None
        proto.waiter = asyncio.get_running_loop().create_future()
        length = "Content-Length: 0\r\n" if method == "POST" else ""
        proto.transport.write(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{length}\r\n".encode()
        )
        return json.loads(await proto.waiter)

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

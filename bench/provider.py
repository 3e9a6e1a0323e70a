"""A lean OpenAI-compatible provider for benchmarks (asyncio protocol on uvloop); at
``<base>/messages`` it speaks Anthropic's Messages (bench/anthropic.toml).

It sends one token per HTTP chunk, as real providers do, paced per stream, and it
records on ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process)
when each stream's connection closes. The benchmark names each stream through the
user message: ``bench:<sid>:<mode>:<n>``.

modes: ``pace`` n tokens at --rate per second (n=0: no end);
       ``stall`` n tokens, then only ``: keep-alive`` comments;
       ``hold`` one token, then only keep-alives (for memory);
       ``late`` one token n milliseconds after the head, then the end (a provider's
       time to first token, for bench/firsttoken.py).

A request for the model ``bench-503`` is answered 503 at once (a route's failing
target: bench/fallback.toml).

Control: ``GET /_closed/<sid>`` answers, once that stream's connection has closed,
``{"closed_at", "last_token_at", "sent"}``; ``GET /_stats`` answers ``{"sent", "open"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import cast

import uvloop

_MARK = re.compile(rb"bench:([A-Za-z0-9_.:-]+?):(pace|stall|hold|late):(\d+)")
_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
_KEEPALIVE = b": keep-alive\n\n"
# The model a route's failing target is asked for (bench/fallback.toml): a 503 at once.
_UNAVAILABLE = b'"model":"bench-503"'
_WORDS = b"the gateway closes the provider connection the moment you press stop".split()


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _token(i: int, messages: bool = False) -> bytes:
    word = _WORDS[i % len(_WORDS)]
    if messages:
        return _chunk(
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":" ' + word + b'"}}\n\n'
        )
    return _chunk(
        b'data: {"id":"b","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":" ' + word + b'"},"finish_reason":null}]}\n\n'
    )


# Anthropic's Messages: the events before the first token, and after the last.
_MESSAGES_START = _chunk(
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_b",'
    b'"type":"message","role":"assistant","content":[],"model":"bench","stop_reason":null,'
    b'"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
)
_MESSAGES_FINISH = (
    _chunk(
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn","stop_sequence":null},"usage":{"output_tokens":1}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    + b"0\r\n\r\n"
)


_FINISH = (
    _chunk(
        b'data: {"id":"b","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{},"finish_reason":"stop"}]}\n\n'
    )
    + _chunk(
        b'data: {"id":"b","object":"chat.completion.chunk","choices":[],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    )
    + _chunk(b"data: [DONE]\n\n")
    + b"0\r\n\r\n"
)


class _Stream:
    __slots__ = ("closed", "closed_at", "last_token_at", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.last_token_at: float | None = None
        self.closed_at: float | None = None
        self.closed = asyncio.Event()


class Provider:
    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.streams: dict[str, _Stream] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.open = 0


class _Connection(asyncio.Protocol):
    def __init__(self, provider: Provider) -> None:
        self.p = provider
        self.buf = b""
        self.stream: _Stream | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.messages = False
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_stream()

    def _end_stream(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if self.stream is not None:
            self.stream.closed_at = time.monotonic()
            self.stream.closed.set()
            self.stream = None
            self.p.open -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            method, path = head.split(b" ", 2)[:2]
            self._request(method, path.decode(), body)

    def _request(self, method: bytes, path: str, body: bytes) -> None:
        if method == b"GET" and path.startswith("/_closed/"):
            task = asyncio.ensure_future(self._closed(path[len("/_closed/") :]))
            self.p.tasks.add(task)
            task.add_done_callback(self.p.tasks.discard)
        elif method == b"GET" and path == "/_stats":
            self._json({"sent": self.p.sent, "open": self.p.open})
        elif method == b"POST" and path.endswith(("/chat/completions", "/messages")):
            if _UNAVAILABLE in body:
                # A route's failing target (bench/fallback.toml): refused at once.
                self._json({"error": {"message": "unavailable"}}, b"503 Service Unavailable")
                return
            m = _MARK.search(body)
            if m is None:
                self._json({"error": {"message": "no bench marker"}}, b"400 Bad Request")
                return
            sid, mode, n = m.group(1).decode(), m.group(2), int(m.group(3))
            # The control request for this sid may have come first.
            stream = self.p.streams.setdefault(sid, _Stream())
            self.stream = stream
            self.p.open += 1
            self.messages = path.endswith("/messages")
            self.transport.write(_HEAD + (_MESSAGES_START if self.messages else b""))
            self.mode, self.n, self.i = mode, n, 0
            self.start = asyncio.get_running_loop().time()
            if mode == b"late":
                self.handle = asyncio.get_running_loop().call_later(n / 1000, self._late)
                return
            self._tick()
        else:
            self._json({"error": {"message": "not found"}}, b"404 Not Found")

    def _finish(self) -> bytes:
        return _MESSAGES_FINISH if self.messages else _FINISH

    def _late(self) -> None:
        stream = self.stream
        if stream is None:
            return
        self.transport.write(_token(0, self.messages) + self._finish())
        stream.sent += 1
        stream.last_token_at = time.monotonic()
        self.p.sent += 1
        self._end_stream()

    def _tick(self) -> None:
        stream = self.stream
        if stream is None:
            return
        loop = asyncio.get_running_loop()
        if self.mode == b"pace" and self.n and self.i >= self.n:
            self.transport.write(self._finish())
            self._end_stream()
            return
        limit = {b"pace": None, b"stall": self.n, b"hold": 1}[self.mode]
        if limit is None or self.i < limit:
            self.transport.write(_token(self.i, self.messages))
            self.i += 1
            stream.sent += 1
            stream.last_token_at = time.monotonic()
            self.p.sent += 1
            self.handle = loop.call_at(self.start + self.i * self.p.interval, self._tick)
        else:
            self.transport.write(_chunk(_KEEPALIVE))
            self.handle = loop.call_later(0.25 if self.mode == b"stall" else 10.0, self._tick)

    async def _closed(self, sid: str) -> None:
        stream = self.p.streams.setdefault(sid, _Stream())
        await stream.closed.wait()
        self._json(
            {
                "closed_at": stream.closed_at,
                "last_token_at": stream.last_token_at,
                "sent": stream.sent,
            }
        )
        del self.p.streams[sid]

    def _json(self, payload: object, status: bytes = b"200 OK") -> None:
        body = json.dumps(payload).encode()
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )


async def serve(port: int, rate: float) -> None:
    provider = Provider(rate)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Connection(provider), "127.0.0.1", port, backlog=4096
    )
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=20.0)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.rate))


if __name__ == "__main__":
    main()

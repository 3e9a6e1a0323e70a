"""A built-in OpenAI-compatible provider that streams like OpenAI or DeepSeek.

It is the embedded default (``gateway serve`` with no upstream URL) and the provider
behind every test. Each stream it serves leaves a ``StreamRecord`` saying how it
ended: ``completed``, or ``closed_by_client`` at token k of n, with the time on
``time.monotonic()`` (CLOCK_MONOTONIC, comparable across processes on Linux).
``GET /v1/_streams`` returns the records as JSON.

It answers ``POST <any base>/chat/completions``, so any base URL can be tested. What
it keeps is bounded: it runs for as long as a demo does.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from starlette.types import Message, Receive, Scope, Send

__all__ = ["Simulator", "SimulatorConfig", "StreamRecord"]

_TEXT = (
    "When you press Stop, the gateway cancels one scope. That scope owns the task that "
    "reads from the provider, so the provider's connection closes at once and the "
    "provider stops generating. Nobody pays for tokens that nobody reads. The browser "
    "keeps the words it already has, the server writes one line that says the stream "
    "was aborted, and the next question starts clean. Structured concurrency makes "
    "this the default rather than a patch: every stream lives inside a task group, "
    "every trigger takes the same path, and cleanup always runs."
)
_WORDS = _TEXT.split(" ")
_RECORDS_KEPT = 1000
# Whole request bodies (up to the gateway's body limit each): the last few only.
_REQUESTS_KEPT = 16


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulated provider behaves; the fault fields exist for tests.

    ``rate`` is tokens per second (0: as fast as the socket takes them).
    """

    tokens: int = 300
    rate: float = 40.0
    queue_seconds: float = 0.0
    keepalive_interval: float = 1.0
    stall_after: int | None = None
    status: int | None = None
    reset_after: int | None = None
    malformed_after: int | None = None
    omit_done: bool = False
    headers_delay: float = 0.0
    token_text: str | None = None


@dataclass(slots=True)
class StreamRecord:
    """What the simulator did for one request."""

    id: str
    planned: int
    started_at: float
    # The gateway's session id and its principal (hex), sent only to the built-in
    # simulator (demo mode).
    session_id: str | None = None
    principal: str | None = None
    path: str = ""
    sent: int = 0
    text: str = ""
    outcome: str = "streaming"
    ended_at: float | None = None
    last_token_at: float | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "session_id": self.session_id,
            "principal": self.principal,
            "path": self.path,
            "planned": self.planned,
            "sent": self.sent,
            "text": self.text,
            "outcome": self.outcome,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


@dataclass(slots=True)
class _Waiter:
    predicate: Callable[[], bool]
    event: anyio.Event = field(default_factory=anyio.Event)


def _word(i: int) -> str:
    word = _WORDS[i % len(_WORDS)]
    return word if i == 0 else " " + word


class Simulator:
    """An ASGI app: ``POST /v1/chat/completions``, ``GET /v1/_streams``, ``GET /v1/models``."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.records: deque[StreamRecord] = deque(maxlen=_RECORDS_KEPT)
        self.requests: deque[dict[str, object]] = deque(maxlen=_REQUESTS_KEPT)
        # The Authorization header of each chat request (tests check the provider key).
        self.authorizations: deque[str] = deque(maxlen=_REQUESTS_KEPT)
        self._ids = itertools.count(1)
        self._waiters: list[_Waiter] = []

    @property
    def live(self) -> int:
        """Streams the simulator is still writing."""
        return sum(1 for r in self.records if r.outcome == "streaming")

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked when a stream starts or ends."""
        if predicate():
            return
        waiter = _Waiter(predicate)
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _changed(self) -> None:
        for waiter in list(self._waiters):
            if waiter.predicate():
                waiter.event.set()
                self._waiters.remove(waiter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path.endswith("/chat/completions"):
            body = await _read_body(receive)
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            if "authorization" in headers:
                self.authorizations.append(headers["authorization"])
            record = StreamRecord(
                id=f"chatcmpl-sim{next(self._ids)}",
                planned=0,
                started_at=time.monotonic(),
                session_id=headers.get("x-session-id"),
                principal=headers.get("x-principal"),
                path=path,
            )
            await self._chat(body, receive, send, record)
        elif method == "GET" and path == "/v1/_streams":
            await _json(send, 200, {"streams": [r.as_json() for r in self.records]})
        elif method == "GET" and path == "/v1/models":
            await _json(send, 200, {"object": "list", "data": [{"id": "simulator"}]})
        else:
            await _json(send, 404, {"error": {"message": "not found", "type": "not_found"}})

    def record_for(self, session_id: str, principal: str | None = None) -> StreamRecord | None:
        """The newest stream the gateway opened for ``session_id`` of ``principal``."""
        for record in reversed(self.records):
            if record.session_id == session_id and record.principal == principal:
                return record
        return None

    async def _chat(self, body: bytes, receive: Receive, send: Send, record: StreamRecord) -> None:
        try:
            request = json.loads(body)
        except ValueError:
            await _json(send, 400, {"error": {"message": "invalid JSON", "type": "bad_request"}})
            return
        self.requests.append(request)
        cfg = self.config
        if cfg.status is not None:
            await _json(
                send, cfg.status, {"error": {"message": "simulated failure", "type": "server"}}
            )
            return
        planned = cfg.tokens
        max_tokens = request.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens < planned:
            planned = max_tokens
        record.planned = planned
        self.records.append(record)
        self._changed()
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if record.outcome == "streaming":
                        record.outcome = "closed_by_client"
                        record.ended_at = time.monotonic()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                await self._stream(request, record, send)
                tg.cancel_scope.cancel()
        finally:
            if record.outcome == "streaming":
                record.outcome = "failed"
                record.ended_at = time.monotonic()
            self._changed()

    async def _stream(self, request: dict[str, Any], record: StreamRecord, send: Send) -> None:
        cfg = self.config
        model = str(request.get("model") or "simulator")
        created = int(time.time())

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            payload = {
                "id": record.id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if cfg.headers_delay:
            await anyio.sleep(cfg.headers_delay)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        await self._keepalives(write, cfg.queue_seconds)
        await write(chunk({"role": "assistant", "content": ""}))
        start = anyio.current_time()
        for i in range(record.planned):
            if cfg.rate > 0:
                await anyio.sleep_until(start + i / cfg.rate)
            else:
                await anyio.lowlevel.checkpoint()
            if i == cfg.stall_after:
                await self._keepalives(write, float("inf"))
            if i == cfg.reset_after:
                # Returning without ending the body makes hypercorn drop the connection.
                record.outcome = "reset"
                record.ended_at = time.monotonic()
                return
            if i == cfg.malformed_after:
                await write(b'data: {"choices": [{"delta": \n\n')
            word = cfg.token_text if cfg.token_text is not None else _word(i)
            await write(chunk({"content": word}))
            record.sent += 1
            record.text += word
            record.last_token_at = time.monotonic()
        if not cfg.omit_done:
            finish = "length" if record.planned < cfg.tokens else "stop"
            await write(chunk({}, finish))
            options = request.get("stream_options") or {}
            if options.get("include_usage"):
                prompt = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": record.sent,
                    "total_tokens": prompt + record.sent,
                }
                payload = {
                    "id": record.id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                await write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            await write(b"data: [DONE]\n\n")
        record.outcome = "completed"
        record.ended_at = time.monotonic()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _keepalives(self, write: Callable[[bytes], Awaitable[None]], seconds: float) -> None:
        """Send ``: keep-alive`` comments for ``seconds``, as DeepSeek does while queued."""
        interval = self.config.keepalive_interval
        deadline = anyio.current_time() + seconds
        while anyio.current_time() < deadline:
            if interval <= 0:
                if seconds == float("inf"):
                    await anyio.sleep_forever()
                await anyio.sleep_until(deadline)
                return
            await anyio.sleep(min(interval, deadline - anyio.current_time()))
            await write(b": keep-alive\n\n")


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _json(send: Send, status: int, payload: object) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

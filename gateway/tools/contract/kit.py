"""The contract kit's driver (``gateway contract``, docs/deploy/README.md): its options
and results, and the ``Kit``, which opens streams on the deployment under test, reads
them within bounds, cancels them, and reads the provider's record of each.

The kit serves the instrumented provider (the built-in simulator) itself, on
``--provider-host:--provider-port``; the deployment under test has that address as its
``GATEWAY_UPSTREAM_URL``. Each stream the kit opens carries a nonce in its user message,
which is how the provider's record of it is found: the kit sends no hidden headers and
reads nothing but HTTP answers and the simulator's records, so it judges any gateway
that speaks this API and forwards the messages.

It talks HTTP/1.1: closing a response then closes its connection, the one client
disconnect every proxy sees (httpcore's HTTP/2 does not reset a stream it stops
reading, encode/httpcore #943).
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx2 as httpx
from anyio.abc import TaskGroup

from ..simulator import Simulator, SimulatorConfig, StreamRecord

__all__ = [
    "TERMINAL",
    "CheckFailed",
    "CheckResult",
    "ContractOptions",
    "Kit",
    "Readers",
    "Stream",
    "bounded_body",
]

# Events that end a stream; exactly one per stream.
TERMINAL = ("done", "stopped", "error")
# The provider's close and the cancel's 200 travel on two sockets to this one process;
# when nothing sits between them, its event loop may see them in either order.
SAME_INSTANT = 0.02
# The answer of the cancel and disconnect checks: it would never end by itself.
_ENDLESS = SimulatorConfig(tokens=100_000, rate=50)


@dataclass(frozen=True)
class ContractOptions:
    gateway: str
    provider_port: int
    provider_host: str = "127.0.0.1"
    api_key: str | None = None
    second_key: str | None = None
    peer: str | None = None
    samples: int = 30
    # The deployment's GATEWAY_IDLE_TIMEOUT: without it the keep-alive check is skipped.
    idle_timeout: float | None = None
    # A CA bundle to trust for https:// URLs (a deployment's own CA).
    cacert: str | None = None
    # The deployment has the kit's routes (docs/routing.md, "The contract kit"): the
    # routing checks run.
    routes: bool | None = None
    # Only these checks (by name); all when empty.
    only: tuple[str, ...] = ()
    # How long any one wait may take before its check fails.
    patience: float = 15.0


@dataclass
class CheckResult:
    name: str
    status: Literal["pass", "fail", "skip"]
    detail: str
    seconds: float = 0.0


class Readers:
    """A task group for a check's stream readers; leaving it stops the readers still
    going (a broken deployment may keep streaming)."""

    async def __aenter__(self) -> TaskGroup:
        self._tg = anyio.create_task_group()
        return await self._tg.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)


class CheckFailed(Exception):
    """A check's expectation did not hold; the message says which, with figures."""


# What the kit holds of a deployment's answers: a body that is not a stream, one event
# (the bytes before its blank line), the events of one stream. A deployment that
# streams without end, or without event boundaries, fails a check instead of filling
# the kit's memory (it took 3.1 GiB in 47 s before).
_MAX_BODY = 64 * 1024
_MAX_EVENT = 1024 * 1024
_MAX_EVENTS = 10_000


@dataclass
class Stream:
    """One streamed answer, read by a task of its own. It keeps every terminal event
    and the first ``_MAX_EVENTS`` others, and counts them all by kind."""

    nonce: str
    session_id: str
    # How long ``until`` waits (a broken deployment must not hang the kit).
    patience: float = 15.0
    # Read from /api/chat/stream ("api"), or Anthropic's /v1/messages ("messages"),
    # whose events are read as the gateway's own (``_as_gateway_events``).
    surface: str = "api"
    # Messages: the ``message_delta`` waiting for its ``message_stop``.
    ending: tuple[str, dict[str, Any]] | None = None
    status: int | None = None
    body: bytes = b""
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    # Token events per network read, and when the first token event arrived.
    reads: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    # The kit closed it (a disconnect): no terminal event can arrive.
    left: bool = False
    changed: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)

    def count(self, kind: str) -> int:
        return self.counts[kind]

    def add(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        for event in events:
            self.counts[event[0]] += 1
            if len(self.events) < _MAX_EVENTS or event[0] in TERMINAL:
                self.events.append(event)

    def terminals(self) -> list[tuple[str, dict[str, Any]]]:
        return [(event, data) for event, data in self.events if event in TERMINAL]

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, predicate: Callable[[Stream], bool], what: str) -> None:
        with anyio.move_on_after(self.patience):
            while not predicate(self):
                if self.done.is_set():
                    break
                await self.changed.wait()
        if not predicate(self):
            raise CheckFailed(f"{what}: not seen (status {self.status}, events {self._kinds()})")

    def _kinds(self) -> str:
        kinds = [event for event, _ in self.events]
        return ",".join(kinds[:3] + (["..."] if len(kinds) > 6 else []) + kinds[3:][-3:])


async def bounded_body(response: httpx.Response) -> bytes:
    """A body that is not a stream, read up to ``_MAX_BODY``: what an error message
    needs, however much the deployment sends."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= _MAX_BODY:
            break
    return bytes(body[:_MAX_BODY])


def _parse_events(buffer: bytearray) -> list[tuple[str, dict[str, Any]]]:
    """Complete SSE events out of ``buffer`` (consumed); comments and pings skipped.
    Written here rather than shared with the gateway: the kit must not agree with the
    code it judges."""
    events: list[tuple[str, dict[str, Any]]] = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return events
        block = bytes(buffer[:end]).decode()
        del buffer[: end + 2]
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            try:
                parsed = json.loads("\n".join(data))
            except ValueError:
                parsed = {"raw": "\n".join(data)}
            events.append((name, parsed if isinstance(parsed, dict) else {"value": parsed}))


def _as_gateway_events(
    stream: Stream, events: list[tuple[str, dict[str, Any]]]
) -> list[tuple[str, dict[str, Any]]]:
    """Messages' events (docs/api.md) as the gateway's own, so one check reads both: a
    ``text_delta`` is a ``token``; ``message_delta`` then ``message_stop`` end the
    answer (``stopped`` with the gateway's report for ``stop_reason: "cancelled"``,
    else ``done``: without its ``message_stop`` there is no terminal event); Anthropic's
    ``error`` is ``error``."""
    out: list[tuple[str, dict[str, Any]]] = []
    kinds = {"text_delta": "token", "thinking_delta": "reasoning", "input_json_delta": "tool_call"}
    for name, data in events:
        delta = data.get("delta")
        if name == "content_block_delta" and isinstance(delta, dict):
            out.append((kinds.get(str(delta.get("type")), "other"), data))
        elif name == "message_delta" and isinstance(delta, dict):
            report = data.get("gateway")
            if delta.get("stop_reason") == "cancelled":
                stream.ending = ("stopped", report if isinstance(report, dict) else {})
            else:
                stream.ending = ("done", data)
        elif name == "message_stop" and stream.ending is not None:
            out.append(stream.ending)
            stream.ending = None
        elif name == "error":
            out.append(("error", data))
    return out


class Kit:
    def __init__(self, options: ContractOptions, simulator: Simulator, client: httpx.AsyncClient):
        self.options = options
        self.sim = simulator
        self.client = client
        self.streams: list[Stream] = []
        self.patience = options.patience

    # -- talking to the deployment ------------------------------------------------

    def _headers(self, key: str | None) -> dict[str, str]:
        key = self.options.api_key if key is None else key
        return {"authorization": f"Bearer {key}"} if key else {}

    async def open(
        self, tg: TaskGroup, key: str | None = None, surface: str = "api", **body: Any
    ) -> Stream:
        nonce = secrets.token_hex(8)
        stream = Stream(nonce, f"contract-{nonce}", self.patience, surface=surface)
        self.streams.append(stream)
        payload = {
            "messages": [{"role": "user", "content": f"Contract check {nonce}: tell me more."}],
            **body,
        }
        if surface == "messages":
            payload.update(stream=True, max_tokens=100_000)
        tg.start_soon(self._read, stream, payload, key)
        return stream

    async def started(self, tg: TaskGroup, key: str | None = None, surface: str = "api") -> Stream:
        """A stream of the endless answer, once its first token event is in."""
        self.sim.config = _ENDLESS
        stream = await self.open(tg, key, surface)
        await stream.until(lambda s: s.count("token") >= 1, "a token event")
        return stream

    async def _read(self, stream: Stream, payload: dict[str, Any], key: str | None) -> None:
        headers = {"x-session-id": stream.session_id, **self._headers(key)}
        path = "/v1/messages" if stream.surface == "messages" else "/api/chat/stream"
        url = f"{self.options.gateway}{path}"
        buffer = bytearray()
        try:
            async with self.client.stream("POST", url, json=payload, headers=headers) as response:
                stream.status = response.status_code
                stream._notify()
                if response.status_code != 200:
                    stream.body = await bounded_body(response)
                    return
                # A disconnect cancels this scope: the response is then closed unread,
                # which closes its connection.
                with stream.scope:
                    async for chunk in response.aiter_bytes():
                        buffer += chunk
                        events = _parse_events(buffer)
                        if stream.surface == "messages":
                            events = _as_gateway_events(stream, events)
                        if len(buffer) > _MAX_EVENT:
                            stream.body = f"an event over {_MAX_EVENT} bytes".encode()
                            return
                        tokens = sum(1 for event, _ in events if event == "token")
                        if tokens and stream.first_token_at is None:
                            stream.first_token_at = time.monotonic()
                        if len(stream.reads) < _MAX_EVENTS:
                            stream.reads.append(tokens)
                        if events:
                            stream.add(events)
                            stream._notify()
        except httpx.HTTPError as exc:
            stream.body = f"{type(exc).__name__}: {exc}".encode()
        finally:
            stream.done.set()
            stream._notify()

    async def cancel(
        self, stream: Stream, key: str | None = None, base: str | None = None
    ) -> httpx.Response:
        url = f"{base or self.options.gateway}/api/chat/cancel/{stream.session_id}"
        async with self.client.stream("POST", url, headers=self._headers(key)) as response:
            body = await bounded_body(response)
        # A response whose body is what was read: .text and .json() work on it.
        return httpx.Response(response.status_code, headers=response.headers, content=body)

    # -- the provider's side ------------------------------------------------------

    def records(self, nonce: str) -> list[StreamRecord]:
        """Every stream the provider served for ``nonce`` (a route's attempts)."""
        return [record for record in self.sim.records if nonce in record.prompt]

    def asked(self, nonce: str) -> list[str]:
        """The models the provider was asked for ``nonce``, in order, failed ones too."""
        found = []
        for request in self.sim.requests:
            messages = request.get("messages")
            if isinstance(messages, list) and nonce in str(messages[-1:]):
                found.append(str(request.get("model")))
        return found

    def _find(self, nonce: str) -> StreamRecord | None:
        for record in reversed(self.sim.records):
            if nonce in record.prompt:
                return record
        return None

    async def record(self, stream: Stream, until: Callable[[StreamRecord], bool]) -> StreamRecord:
        def holds() -> bool:
            record = self._find(stream.nonce)
            return record is not None and until(record)

        with anyio.move_on_after(self.patience):
            await self.sim.wait_until(holds, each_delta=True)
        record = self._find(stream.nonce)
        if record is None or not until(record):
            raise CheckFailed(
                "the provider never saw the stream"
                if record is None
                else f"the provider's stream: {record.outcome}, {record.sent} deltas written"
            )
        return record

    async def closed(self, stream: Stream) -> StreamRecord:
        return await self.record(stream, lambda r: r.outcome != "streaming")

    # -- shared steps -------------------------------------------------------------

    async def cancel_closes_first(
        self, stream: Stream, key: str | None = None, base: str | None = None
    ) -> float:
        """Cancel; the answer must be 200 and the provider's connection closed by then.
        Returns trigger-to-close in seconds."""
        record = await self.record(stream, lambda r: True)
        sent = time.monotonic()
        response = await self.cancel(stream, key, base)
        answered = time.monotonic()
        if response.status_code != 200:
            raise CheckFailed(f"cancel answered {response.status_code}: {response.text[:200]}")
        if record.outcome == "streaming":
            # The same-instant allowance: see SAME_INSTANT.
            with anyio.move_on_after(SAME_INSTANT):
                await self.closed(stream)
        if record.ended_at is None or record.ended_at > answered + SAME_INSTANT:
            late = "never" if record.ended_at is None else f"{record.ended_at - answered:.3f} s"
            raise CheckFailed(f"the 200 came before the provider was closed (closed: {late} after)")
        return max(0.0, record.ended_at - sent)

    async def stopped_once(self, stream: Stream, reason: str) -> dict[str, Any]:
        """The stream ends with exactly one terminal event: ``stopped`` for ``reason``,
        its delivered counts equal to the events received."""
        with anyio.move_on_after(self.patience):
            await stream.done.wait()
        terminals = stream.terminals()
        if len(terminals) != 1 or terminals[0][0] != "stopped":
            raise CheckFailed(
                f"terminal events: {[t for t, _ in terminals]} (expected one stopped)"
            )
        data = terminals[0][1]
        if data.get("reason") != reason:
            raise CheckFailed(f"stopped for {data.get('reason')!r}, expected {reason!r}")
        for kind, key in (
            ("token", "tokens_delivered"),
            ("reasoning", "reasoning_delivered"),
            ("tool_call", "tool_calls_delivered"),
            ("refusal", "refusal_delivered"),
        ):
            if data.get(key) != stream.count(kind):
                raise CheckFailed(f"{key}={data.get(key)} but {stream.count(kind)} {kind} events")
        return data

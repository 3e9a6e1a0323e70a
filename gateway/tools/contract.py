"""``gateway contract``: the cancel contract, checked against a running deployment.

The kit serves the instrumented provider (the built-in simulator) itself, on
``--provider-host:--provider-port``; the deployment under test has that address as its
``GATEWAY_UPSTREAM_URL``. Each stream the kit opens carries a nonce in its user message,
which is how the provider's record of it is found: the kit sends no hidden headers and
reads nothing but HTTP answers and the simulator's records, so it judges any gateway
that speaks this API and forwards the messages (docs/deploy/README.md).

It talks HTTP/1.1: closing a response then closes its connection, the one client
disconnect every proxy sees (httpcore's HTTP/2 does not reset a stream it stops
reading, encode/httpcore #943).
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from xml.etree import ElementTree

import anyio
import httpx2 as httpx
from anyio.abc import TaskGroup

from .simulator import Simulator, SimulatorConfig, StreamRecord, serve_simulator

__all__ = ["CHECKS", "CheckResult", "ContractOptions", "junit_xml", "report", "run_contract"]

# Events that end a stream; exactly one per stream.
_TERMINAL = ("done", "stopped", "error")
# The provider's close and the cancel's 200 travel on two sockets to this one process;
# when nothing sits between them, its event loop may see them in either order.
_SAME_INSTANT = 0.02
# The unbuffered check: the answer's pace, and how late its first event may be.
_PACE = 20.0
_FIRST_EVENT_BOUND = 1.0
_OWN_READ_SHARE = 0.9
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


class _Readers:
    """A task group for a check's stream readers; leaving it stops the readers still
    going (a broken deployment may keep streaming)."""

    async def __aenter__(self) -> TaskGroup:
        self._tg = anyio.create_task_group()
        return await self._tg.__aenter__()

    async def __aexit__(self, *exc: Any) -> bool | None:
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(*exc)


class _Failed(Exception):
    """A check's expectation did not hold; the message says which, with figures."""


# What the kit holds of a deployment's answers: a body that is not a stream, one event
# (the bytes before its blank line), the events of one stream. A deployment that
# streams without end, or without event boundaries, fails a check instead of filling
# the kit's memory (it took 3.1 GiB in 47 s before).
_MAX_BODY = 64 * 1024
_MAX_EVENT = 1024 * 1024
_MAX_EVENTS = 10_000


@dataclass
class _Stream:
    """One streamed answer, read by a task of its own. It keeps every terminal event
    and the first ``_MAX_EVENTS`` others, and counts them all by kind."""

    nonce: str
    session_id: str
    # How long ``until`` waits (a broken deployment must not hang the kit).
    patience: float = 15.0
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
            if len(self.events) < _MAX_EVENTS or event[0] in _TERMINAL:
                self.events.append(event)

    def terminals(self) -> list[tuple[str, dict[str, Any]]]:
        return [(event, data) for event, data in self.events if event in _TERMINAL]

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, predicate: Callable[[_Stream], bool], what: str) -> None:
        with anyio.move_on_after(self.patience):
            while not predicate(self):
                if self.done.is_set():
                    break
                await self.changed.wait()
        if not predicate(self):
            raise _Failed(f"{what}: not seen (status {self.status}, events {self._kinds()})")

    def _kinds(self) -> str:
        kinds = [event for event, _ in self.events]
        return ",".join(kinds[:3] + (["..."] if len(kinds) > 6 else []) + kinds[3:][-3:])


async def _bounded_body(response: httpx.Response) -> bytes:
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


class _Kit:
    def __init__(self, options: ContractOptions, simulator: Simulator, client: httpx.AsyncClient):
        self.options = options
        self.sim = simulator
        self.client = client
        self.streams: list[_Stream] = []
        self.patience = options.patience

    # -- talking to the deployment ------------------------------------------------

    def _headers(self, key: str | None) -> dict[str, str]:
        key = self.options.api_key if key is None else key
        return {"authorization": f"Bearer {key}"} if key else {}

    async def open(self, tg: TaskGroup, key: str | None = None, **body: Any) -> _Stream:
        nonce = secrets.token_hex(8)
        stream = _Stream(nonce, f"contract-{nonce}", self.patience)
        self.streams.append(stream)
        payload = {
            "messages": [{"role": "user", "content": f"Contract check {nonce}: tell me more."}],
            **body,
        }
        tg.start_soon(self._read, stream, payload, key)
        return stream

    async def started(self, tg: TaskGroup, key: str | None = None) -> _Stream:
        """A stream of the endless answer, once its first token event is in."""
        self.sim.config = _ENDLESS
        stream = await self.open(tg, key)
        await stream.until(lambda s: s.count("token") >= 1, "a token event")
        return stream

    async def _read(self, stream: _Stream, payload: dict[str, Any], key: str | None) -> None:
        headers = {"x-session-id": stream.session_id, **self._headers(key)}
        url = f"{self.options.gateway}/api/chat/stream"
        buffer = bytearray()
        try:
            async with self.client.stream("POST", url, json=payload, headers=headers) as response:
                stream.status = response.status_code
                stream._notify()
                if response.status_code != 200:
                    stream.body = await _bounded_body(response)
                    return
                # A disconnect cancels this scope: the response is then closed unread,
                # which closes its connection.
                with stream.scope:
                    async for chunk in response.aiter_bytes():
                        buffer += chunk
                        events = _parse_events(buffer)
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
        self, stream: _Stream, key: str | None = None, base: str | None = None
    ) -> httpx.Response:
        url = f"{base or self.options.gateway}/api/chat/cancel/{stream.session_id}"
        async with self.client.stream("POST", url, headers=self._headers(key)) as response:
            body = await _bounded_body(response)
        # A response whose body is what was read: .text and .json() work on it.
        return httpx.Response(response.status_code, headers=response.headers, content=body)

    # -- the provider's side ------------------------------------------------------

    def _find(self, nonce: str) -> StreamRecord | None:
        for record in reversed(self.sim.records):
            if nonce in record.prompt:
                return record
        return None

    async def record(self, stream: _Stream, until: Callable[[StreamRecord], bool]) -> StreamRecord:
        def holds() -> bool:
            record = self._find(stream.nonce)
            return record is not None and until(record)

        with anyio.move_on_after(self.patience):
            await self.sim.wait_until(holds, each_delta=True)
        record = self._find(stream.nonce)
        if record is None or not until(record):
            raise _Failed(
                "the provider never saw the stream"
                if record is None
                else f"the provider's stream: {record.outcome}, {record.sent} deltas written"
            )
        return record

    async def closed(self, stream: _Stream) -> StreamRecord:
        return await self.record(stream, lambda r: r.outcome != "streaming")

    # -- shared steps -------------------------------------------------------------

    async def cancel_closes_first(
        self, stream: _Stream, key: str | None = None, base: str | None = None
    ) -> float:
        """Cancel; the answer must be 200 and the provider's connection closed by then.
        Returns trigger-to-close in seconds."""
        record = await self.record(stream, lambda r: True)
        sent = time.monotonic()
        response = await self.cancel(stream, key, base)
        answered = time.monotonic()
        if response.status_code != 200:
            raise _Failed(f"cancel answered {response.status_code}: {response.text[:200]}")
        if record.outcome == "streaming":
            # The same-instant allowance: see _SAME_INSTANT.
            with anyio.move_on_after(_SAME_INSTANT):
                await self.closed(stream)
        if record.ended_at is None or record.ended_at > answered + _SAME_INSTANT:
            late = "never" if record.ended_at is None else f"{record.ended_at - answered:.3f} s"
            raise _Failed(f"the 200 came before the provider was closed (closed: {late} after)")
        return max(0.0, record.ended_at - sent)

    async def stopped_once(self, stream: _Stream, reason: str) -> dict[str, Any]:
        """The stream ends with exactly one terminal event: ``stopped`` for ``reason``,
        its delivered counts equal to the events received."""
        with anyio.move_on_after(self.patience):
            await stream.done.wait()
        terminals = stream.terminals()
        if len(terminals) != 1 or terminals[0][0] != "stopped":
            raise _Failed(f"terminal events: {[t for t, _ in terminals]} (expected one stopped)")
        data = terminals[0][1]
        if data.get("reason") != reason:
            raise _Failed(f"stopped for {data.get('reason')!r}, expected {reason!r}")
        for kind, key in (
            ("token", "tokens_delivered"),
            ("reasoning", "reasoning_delivered"),
            ("tool_call", "tool_calls_delivered"),
            ("refusal", "refusal_delivered"),
        ):
            if data.get(key) != stream.count(kind):
                raise _Failed(f"{key}={data.get(key)} but {stream.count(kind)} {kind} events")
        return data


# -- the checks -------------------------------------------------------------------

Check = Callable[[_Kit], Awaitable[str]]


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


async def _cancel_closes_provider(kit: _Kit) -> str:
    latencies = []
    for _ in range(kit.options.samples):
        async with _Readers() as tg:
            stream = await kit.started(tg)
            latencies.append(await kit.cancel_closes_first(stream))
            await kit.stopped_once(stream, "cancel")
    return f"{len(latencies)} of {kit.options.samples} closed before the 200; {_ms(latencies)}"


async def _disconnect_closes_provider(kit: _Kit) -> str:
    latencies = []
    for _ in range(kit.options.samples):
        async with _Readers() as tg:
            stream = await kit.started(tg)
            left = time.monotonic()
            stream.left = True
            stream.scope.cancel()
            record = await kit.closed(stream)
            assert record.ended_at is not None
            latencies.append(max(0.0, record.ended_at - left))
    return f"{len(latencies)} of {kit.options.samples} closed; {_ms(latencies)}"


async def _stop_at(kit: _Kit, config: SimulatorConfig, ready: str, **body: Any) -> str:
    """Cancel once ``ready`` holds; the provider closed before the 200, one stopped event
    with exact counts."""
    kit.sim.config = config
    async with _Readers() as tg:
        stream = await kit.open(tg, **body)
        if ready in ("headers", "first_token"):
            # The provider has the request: it holds its headers back, or it has sent
            # them and is quiet (keep-alive comments only) before its first token.
            await kit.record(stream, lambda r: True)
        else:
            await stream.until(lambda s: s.count(ready) >= 2, f"two {ready} events")
        latency = await kit.cancel_closes_first(stream)
        data = await kit.stopped_once(stream, "cancel")
    return f"closed {latency * 1000:.1f} ms after the cancel; stopped with {_delivered(data)}"


def _delivered(data: dict[str, Any]) -> str:
    return (
        f"tokens={data.get('tokens_delivered')} reasoning={data.get('reasoning_delivered')} "
        f"tool_calls={data.get('tool_calls_delivered')}"
    )


async def _cancel_waiting_for_headers(kit: _Kit) -> str:
    return await _stop_at(kit, SimulatorConfig(tokens=10, headers_delay=60), "headers")


async def _cancel_before_first_token(kit: _Kit) -> str:
    config = SimulatorConfig(tokens=10, queue_seconds=60, keepalive_interval=0.2)
    return await _stop_at(kit, config, "first_token")


async def _cancel_during_reasoning(kit: _Kit) -> str:
    config = SimulatorConfig(tokens=10, rate=_PACE, reasoning_tokens=10_000, reasoner=True)
    return await _stop_at(kit, config, "reasoning")


async def _cancel_during_tool_call(kit: _Kit) -> str:
    config = SimulatorConfig(rate=_PACE, tool_fragment_chars=1)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "search",
                "description": "Search the web.",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
            },
        }
    ]
    return await _stop_at(kit, config, "tool_call", tools=tools)


async def _not_found(kit: _Kit) -> str:
    async with _Readers() as tg:
        stream = await kit.started(tg)
        await kit.cancel_closes_first(stream)
        await kit.stopped_once(stream, "cancel")
        again = await kit.cancel(stream)
    unknown = await kit.cancel(_Stream("", f"contract-unknown-{secrets.token_hex(8)}"))
    for what, response in (("a second cancel", again), ("an unknown id", unknown)):
        code = _error_code(response)
        if response.status_code != 404 or code != "not_found":
            raise _Failed(f"{what}: {response.status_code} {code!r}, expected 404 'not_found'")
    return "second cancel 404 not_found; unknown id 404 not_found"


async def _duplicate_live_id(kit: _Kit) -> str:
    async with _Readers() as tg:
        stream = await kit.started(tg)
        # Streamed: a gateway that wrongly accepts it would answer without end.
        async with kit.client.stream(
            "POST",
            f"{kit.options.gateway}/api/chat/stream",
            headers={"x-session-id": stream.session_id, **kit._headers(None)},
            json={"messages": [{"role": "user", "content": f"Duplicate {stream.nonce}"}]},
        ) as response:
            body = b"" if response.status_code == 200 else await _bounded_body(response)
            duplicate = httpx.Response(response.status_code, headers=response.headers, content=body)
        await kit.cancel_closes_first(stream)
        await kit.stopped_once(stream, "cancel")
    if duplicate.status_code != 409:
        raise _Failed(f"a second stream on a live id: {duplicate.status_code}, expected 409")
    return f"409 {_error_code(duplicate)}"


async def _keepalives_do_not_hold(kit: _Kit) -> str:
    idle = kit.options.idle_timeout
    assert idle is not None
    # Two tokens, then nothing but the provider's keep-alive comments.
    kit.sim.config = SimulatorConfig(
        tokens=100, rate=0, stall_after=2, keepalive_interval=min(idle / 4, 1.0)
    )
    async with _Readers() as tg:
        stream = await kit.open(tg)
        with anyio.move_on_after(idle + kit.patience):
            await stream.done.wait()
        data = await kit.stopped_once(stream, "timeout")
    record = await kit.closed(stream)
    assert record.ended_at is not None
    assert record.last_token_at is not None
    after = record.ended_at - record.last_token_at
    if after > idle + 2.0:
        raise _Failed(f"the provider was closed {after:.2f} s after its last token (idle {idle} s)")
    return f"stopped ({data.get('detail')}), provider closed {after:.2f} s after its last token"


async def _other_principal_cannot_cancel(kit: _Kit) -> str:
    async with _Readers() as tg:
        stream = await kit.started(tg)
        response = await kit.cancel(stream, key=kit.options.second_key)
        seen = stream.count("token")
        await stream.until(lambda s: s.count("token") >= seen + 2, "tokens after the cancel")
        record = await kit.record(stream, lambda r: True)
        going = record.outcome == "streaming"
        await kit.cancel_closes_first(stream)
        await kit.stopped_once(stream, "cancel")
    if response.status_code != 404:
        raise _Failed(f"another principal's cancel: {response.status_code}, expected 404")
    if not going:
        raise _Failed(f"the provider's stream ended ({record.outcome}) after a refused cancel")
    return "404, and the stream went on"


async def _peer_cancel(kit: _Kit) -> str:
    latencies = []
    for _ in range(min(kit.options.samples, 10)):
        async with _Readers() as tg:
            stream = await kit.started(tg)
            latencies.append(await kit.cancel_closes_first(stream, base=kit.options.peer))
            await kit.stopped_once(stream, "cancel")
    return f"{len(latencies)} closed before the peer's 200; {_ms(latencies)}"


async def _unbuffered(kit: _Kit) -> str:
    kit.sim.config = SimulatorConfig(tokens=40, rate=_PACE)
    async with _Readers() as tg:
        stream = await kit.open(tg)
        with anyio.move_on_after(kit.patience):
            await stream.done.wait()
    record = await kit.closed(stream)
    if record.first_token_at is None or stream.first_token_at is None:
        raise _Failed(f"no token arrived (provider wrote {record.sent})")
    first = stream.first_token_at - record.first_token_at
    tokens = stream.count("token")
    alone = sum(1 for n in stream.reads if n == 1)
    detail = (
        f"first token {first * 1000:.0f} ms after the provider's; "
        f"{alone} of {tokens} token events in a read of their own"
    )
    if first > _FIRST_EVENT_BOUND:
        raise _Failed(f"buffered: {detail}")
    if tokens == 0 or alone < _OWN_READ_SHARE * tokens:
        raise _Failed(f"batched: {detail}")
    return detail


async def _one_terminal_event(kit: _Kit) -> str:
    kit.sim.config = SimulatorConfig(tokens=20, rate=0)
    async with _Readers() as tg:
        stream = await kit.open(tg)
        with anyio.move_on_after(kit.patience):
            await stream.done.wait()
    record = await kit.closed(stream)
    terminals = stream.terminals()
    if [t for t, _ in terminals] != ["done"] or stream.count("token") != record.sent:
        raise _Failed(
            f"a completed answer: terminal events {[t for t, _ in terminals]}, "
            f"{stream.count('token')} token events for {record.sent} provider deltas"
        )
    read = [s for s in kit.streams if s.status == 200 and not s.left]
    wrong = [s.session_id for s in read if len(s.terminals()) != 1]
    if wrong:
        raise _Failed(f"{len(wrong)} of {len(read)} streams without exactly one terminal event")
    return f"{len(read)} streams, each one terminal event; counts matched"


# name -> (check, what it needs; None: always runs)
CHECKS: dict[str, tuple[Check, str | None]] = {
    "cancel_closes_provider": (_cancel_closes_provider, None),
    "disconnect_closes_provider": (_disconnect_closes_provider, None),
    "cancel_waiting_for_headers": (_cancel_waiting_for_headers, None),
    "cancel_before_first_token": (_cancel_before_first_token, None),
    "cancel_during_reasoning": (_cancel_during_reasoning, None),
    "cancel_during_tool_call": (_cancel_during_tool_call, None),
    "cancel_twice_and_unknown_404": (_not_found, None),
    "duplicate_live_id_409": (_duplicate_live_id, None),
    "keepalives_do_not_hold_idle": (_keepalives_do_not_hold, "idle_timeout"),
    "other_principal_cannot_cancel": (_other_principal_cannot_cancel, "second_key"),
    "peer_cancel_closes_provider": (_peer_cancel, "peer"),
    "unbuffered": (_unbuffered, None),
    "one_terminal_event": (_one_terminal_event, None),
}


def _error_code(response: httpx.Response) -> str | None:
    """The error envelope's ``code``; for a cancel's 404 this gateway answers
    ``{"ok": false, "reason": "not_found"}`` (docs/api.md), read as the same."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else body.get("reason")
    return code if isinstance(code, str) else None


async def run_contract(
    options: ContractOptions, on_result: Callable[[CheckResult], None] | None = None
) -> list[CheckResult]:
    """Serve the provider, run every check in order, stop the provider."""
    unknown = set(options.only) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks: {', '.join(sorted(unknown))}")
    simulator = Simulator()
    verify: ssl.SSLContext | bool = True
    if options.cacert:
        verify = ssl.create_default_context(cafile=options.cacert)
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=10)
    # No read timeout: a stream may be quiet for a ping interval; each check is bounded.
    timeout = httpx.Timeout(options.patience, read=None)
    results: list[CheckResult] = []
    stop = anyio.Event()
    async with (
        httpx.AsyncClient(timeout=timeout, verify=verify, limits=limits) as client,
        anyio.create_task_group() as tg,
    ):
        bind = f"{options.provider_host}:{options.provider_port}"
        await tg.start(functools.partial(serve_simulator, simulator, stop.wait, bind=bind))
        kit = _Kit(options, simulator, client)
        try:
            for name, (check, needs) in CHECKS.items():
                if options.only and name not in options.only:
                    continue
                if needs is not None and getattr(options, needs) is None:
                    option = "--" + needs.replace("_", "-")
                    result = CheckResult(name, "skip", f"needs {option}")
                else:
                    result = await _run_one(kit, name, check)
                results.append(result)
                if on_result is not None:
                    on_result(result)
        finally:
            stop.set()
    return results


async def _run_one(kit: _Kit, name: str, check: Check) -> CheckResult:
    started = time.monotonic()
    bound = kit.patience * 4 + (kit.options.idle_timeout or 0)
    try:
        with anyio.fail_after(bound):
            detail = await check(kit)
    except Exception as exc:
        failure = _leaf(exc)
        if isinstance(failure, _Failed):
            detail = str(failure)
        elif isinstance(failure, TimeoutError):
            detail = f"did not finish in {bound:.0f} s"
        elif isinstance(failure, httpx.HTTPError):
            detail = f"{type(failure).__name__}: {failure}"
        else:
            raise
        return CheckResult(name, "fail", detail, time.monotonic() - started)
    return CheckResult(name, "pass", detail, time.monotonic() - started)


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside task groups' exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def report(results: list[CheckResult]) -> str:
    """The table ``gateway contract`` prints."""
    width = max(len(r.name) for r in results) if results else 0
    lines = [f"{'check':<{width}}  result  figures", f"{'-' * width}  ------  -------"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.status.upper():<6}  {r.detail}")
    failed = sum(1 for r in results if r.status == "fail")
    passed = sum(1 for r in results if r.status == "pass")
    skipped = len(results) - failed - passed
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)


def junit_xml(results: list[CheckResult]) -> bytes:
    suite = ElementTree.Element(
        "testsuite",
        name="gateway contract",
        tests=str(len(results)),
        failures=str(sum(1 for r in results if r.status == "fail")),
        skipped=str(sum(1 for r in results if r.status == "skip")),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ElementTree.SubElement(
            suite, "testcase", classname="contract", name=r.name, time=f"{r.seconds:.3f}"
        )
        if r.status == "fail":
            ElementTree.SubElement(case, "failure", message=r.detail)
        elif r.status == "skip":
            ElementTree.SubElement(case, "skipped", message=r.detail)
        else:
            ElementTree.SubElement(case, "system-out").text = r.detail
    xml: bytes = ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True)
    return xml

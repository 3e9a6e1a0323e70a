"""Real servers for the tests: the simulator and the gateway, each under hypercorn on
a free loopback port, on the test's own event loop (asyncio, uvloop or Trio).

The SSE reader here is written independently of the gateway's code, so the tests
check the wire format rather than agree with themselves.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import httpx2 as httpx
import pytest
import trustme
from anyio.abc import SocketStream, TaskGroup
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk
from starlette.applications import Starlette
from starlette.types import ASGIApp

from gateway import Settings, create_app
from gateway.cli import stop_streams_first
from gateway.config import read_config
from gateway.core.registry import Registry
from gateway.server.serve import load_config, serve
from gateway.tools.contract.kit import SAME_INSTANT
from gateway.tools.simulator import Simulator, SimulatorConfig, StreamRecord
from gateway.web.state import state_of

# Generous bound on any single wait in a test: a hang fails instead of stalling CI.
WAIT = 10.0

# A test (or module) so marked runs on asyncio and Trio, not a third time on uvloop
# (conftest.py): for what does not touch the loop's sockets, uvloop runs the same code of
# ours, and the suite has ten minutes (tests/README.md).
ASYNCIO_AND_TRIO = pytest.mark.asyncio_and_trio

END_MARKERS = (
    " aborted by client/cancel ",
    " timed out ",
    " stopped reason=",
    " completed in ",
    " failed code=",
)


@dataclass
class SSEEvent:
    event: str
    id: str | None = None
    data: Any = None
    comment: str | None = None
    at: float = field(default_factory=time.monotonic)


class EventReader:
    """Reads a gateway response as SSE events, one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: list[SSEEvent] = []
        self.comments: list[str] = []
        self._lines = response.aiter_lines()
        self.ended = False

    @property
    def tokens(self) -> list[str]:
        return [e.data["delta"] for e in self.events if e.event == "token"]

    @property
    def reasoning(self) -> list[str]:
        return [e.data["delta"] for e in self.events if e.event == "reasoning"]

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.event == "tool_call"]

    def longest_token_gap(self, since: int) -> float:
        """The longest time between two tokens from event ``since - 1`` on."""
        times = [e.at for e in self.events[since - 1 :] if e.event == "token"]
        return max(b - a for a, b in itertools.pairwise(times))

    async def next(self) -> SSEEvent | None:
        """The next event (comments are collected, not returned); None at the end."""
        fields: dict[str, str] = {}
        data: list[str] = []
        while True:
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                self.ended = True
                return None
            if line == "":
                if data or fields:
                    event = SSEEvent(
                        event=fields.get("event", "message"),
                        id=fields.get("id"),
                        data=json.loads("\n".join(data)) if data else None,
                    )
                    self.events.append(event)
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            else:
                fields[name] = value

    async def until(self, predicate: Callable[[SSEEvent], bool]) -> SSEEvent:
        with anyio.fail_after(WAIT):
            while True:
                event = await self.next()
                assert event is not None, f"stream ended early: {self.events[-3:]}"
                if predicate(event):
                    return event

    async def tokens_at_least(self, n: int) -> None:
        if len(self.tokens) < n:
            await self.until(lambda _: len(self.tokens) >= n)

    async def rest(self) -> list[SSEEvent]:
        """Every remaining event, up to the end of the response."""
        out = []
        with anyio.fail_after(WAIT):
            while (event := await self.next()) is not None:
                out.append(event)
        return out


class Harness:
    """Simulator + gateway on real sockets; ``async with Harness(...) as h``."""

    def __init__(
        self,
        sim: SimulatorConfig | None = None,
        *,
        upstream_url: str | None = None,
        graceful_timeout: float = 2.0,
        stop_streams_first: bool = True,
        demo: bool = False,
        wrap: Callable[[ASGIApp], ASGIApp] | None = None,
        config: str | None = None,
        sim_tls: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        """``demo``: no upstream URL, so the gateway serves its own built-in simulator
        (as ``make run`` does); ``sim`` is then unused. ``wrap``: serve the app through
        this ASGI middleware (a planted bug). ``config``: a GATEWAY_CONFIG file's path
        (docs/routing.md), whose providers serve instead of the harness's simulator;
        its keys come from the process's environment. ``sim_tls``: hypercorn's TLS
        settings (``certfile``, ``keyfile``, ...) for the simulator, then reached over
        https at 127.0.0.1."""
        self.simulator = Simulator(sim or SimulatorConfig(rate=200.0))
        self._upstream_url = upstream_url
        self._settings = settings
        self._graceful_timeout = graceful_timeout
        self._stop_streams_first = stop_streams_first
        self._demo = demo
        self._wrap = wrap
        self._config = config
        self._sim_tls = sim_tls or {}
        self._tg: TaskGroup | None = None
        self._stop_sim = anyio.Event()
        self._stop_gateway = anyio.Event()
        self.served = anyio.Event()
        self.sim_port = 0
        self.port = 0

    async def __aenter__(self) -> Harness:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        quiet = {"accesslog": None, "errorlog": None}
        if self._upstream_url is None and not self._demo and self._config is None:
            config = load_config(
                bind=["127.0.0.1:0"], graceful_timeout=1.0, **quiet, **self._sim_tls
            )
            [(_, self.sim_port)] = await self._tg.start(
                serve_until, self.simulator, config, self._stop_sim.wait
            )
            scheme = "https" if self._sim_tls else "http"
            self._upstream_url = f"{scheme}://127.0.0.1:{self.sim_port}/v1"
        if self._config is not None:
            providers, routes = read_config(self._config)
            settings = Settings(providers=providers, routes=routes, **self._settings)
        else:
            settings = Settings(
                upstream_url=self._upstream_url, model="sim-model", **self._settings
            )
        self.settings = settings
        self.app: Starlette = create_app(settings)
        config = load_config(bind=["127.0.0.1:0"], graceful_timeout=self._graceful_timeout, **quiet)
        # Without stop_streams_first this serves like plain `hypercorn`, which
        # hard-cancels whatever still runs at graceful_timeout.
        trigger: Any = self._stop_gateway.wait
        if self._stop_streams_first:
            trigger = stop_streams_first(self.app, trigger, self._graceful_timeout)
        [(_, self.port)] = await self._tg.start(self._serve_gateway, config, trigger)
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=WAIT)
        return self

    async def _serve_gateway(
        self, config: Any, trigger: Any, *, task_status: anyio.abc.TaskStatus[Any]
    ) -> None:
        try:
            app = self.app if self._wrap is None else self._wrap(self.app)
            await serve(app, config, shutdown_trigger=trigger, task_status=task_status)
        finally:
            self.served.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            await self.client.aclose()
            self._stop_gateway.set()
            with anyio.move_on_after(WAIT):
                await self.served.wait()
            self._stop_sim.set()
        # The servers stop through their shutdown triggers (cancelling hypercorn's
        # asyncio serve() breaks its own cleanup); the test's exception propagates
        # as itself, not wrapped in the task group's exception group.
        await self._tg.__aexit__(None, None, None)

    async def shutdown(self) -> None:
        """Trigger the gateway's shutdown, as SIGTERM does under ``gateway serve``."""
        self._stop_gateway.set()

    @property
    def registry(self) -> Registry:
        return state_of(self.app).registry

    @asynccontextmanager
    async def stream(
        self,
        session_id: str,
        content: str = "Tell me about stopping.",
        headers: dict[str, str] | None = None,
        **body: Any,
    ) -> AsyncIterator[EventReader]:
        payload = {"messages": [{"role": "user", "content": content}], **body}
        async with self.client.stream(
            "POST",
            "/api/chat/stream",
            headers={"X-Session-Id": session_id, **(headers or {})},
            json=payload,
        ) as response:
            assert response.status_code == 200, response.status_code
            reader = EventReader(response)
            yield reader

    @contextmanager
    def stalled_reader(self, session_id: str) -> Iterator[socket.socket]:
        """A client that asks for a stream, then reads nothing: with a small receive
        buffer, the gateway's sends soon get stuck."""
        body = b'{"messages": [{"role": "user", "content": "hi"}]}'
        request = (
            f"POST /api/chat/stream HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"X-Session-Id: {session_id}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(request)
            yield sock

    async def cancel(
        self, session_id: str, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.post(f"/api/chat/cancel/{session_id}", headers=headers)

    async def cancel_closes_first(self, session_id: str, record: StreamRecord) -> httpx.Response:
        """Cancel; the provider's stream must be closed by the 200. The close and the
        200 reach this one process on two sockets, and its loop may see them in either
        order: the contract kit's same-instant allowance (tools/contract/kit.py)."""
        response = await self.cancel(session_id)
        answered = time.monotonic()
        assert response.status_code == 200, response.text
        with anyio.fail_after(WAIT):
            await self.simulator.wait_until(lambda: record.ended_at is not None)
        assert record.ended_at is not None
        assert record.ended_at <= answered + SAME_INSTANT
        return response

    async def record(self, index: int = -1) -> StreamRecord:
        """The simulator's record of a stream, once it has one."""
        with anyio.fail_after(WAIT):
            await self.simulator.wait_until(lambda: len(self.simulator.records) > 0)
        return self.simulator.records[index]

    async def closed(self, record: StreamRecord) -> StreamRecord:
        """Wait until the simulator saw this stream end."""
        with anyio.fail_after(WAIT):
            await self.simulator.wait_until(lambda: record.outcome != "streaming")
        return record

    async def ended(self, session_id: str) -> None:
        """Wait until the gateway's session has run its cleanup."""
        session = self.registry.get(session_id)
        if session is not None:
            with anyio.fail_after(WAIT):
                await session.ended.wait()

    async def assert_ended_cleanly(
        self, caplog: pytest.LogCaptureFixture, session_id: str, line: str
    ) -> None:
        """The contract after any end: cleanup ran, nothing is left registered or
        connected to the provider, and exactly one end line was logged, saying ``line``."""
        await self.ended(session_id)
        assert self.registry.get(session_id) is None
        assert self.upstream_connections() == 0
        lines = end_lines(caplog.records, session_id)
        assert len(lines) == 1, lines
        assert line in lines[0], lines[0]

    def upstream_connections(self) -> int:
        """ESTABLISHED TCP connections from this process to the simulator."""
        return established_to(self.sim_port)


@dataclasses.dataclass
class TracedPeak:
    bytes: int = 0


@contextmanager
def traced_peak() -> Iterator[TracedPeak]:
    """The peak of what Python allocated in this process within the block (tracemalloc),
    set when the block ends normally."""
    traced = TracedPeak()
    tracemalloc.start()
    try:
        yield traced
        _, traced.bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()


async def answer_lifespan(receive: Any, send: Any) -> None:
    """A test ASGI app's lifespan: started at once, and ended when asked."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def read_request(stream: SocketStream, buffer: bytes) -> tuple[bytes, bytes] | None:
    """One request (head and Content-Length body) from ``stream``; the rest of what was
    read after it. ``None`` if the client closed first."""
    while b"\r\n\r\n" not in buffer:
        try:
            buffer += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return None
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += await stream.receive()
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


async def serve_until(
    app: Any, config: Any, stop: Any, *, task_status: anyio.abc.TaskStatus[Any]
) -> None:
    """Serve ``app`` in this process until ``stop()`` returns; for ``tg.start``."""
    await serve(app, config, shutdown_trigger=stop, task_status=task_status)


@asynccontextmanager
async def simulators(
    **configs: SimulatorConfig,
) -> AsyncIterator[dict[str, tuple[Simulator, int]]]:
    """One simulator per name, each on its own port."""
    stop = anyio.Event()
    served: dict[str, tuple[Simulator, int]] = {}
    async with anyio.create_task_group() as tg:
        for name, config in configs.items():
            simulator = Simulator(config)
            quiet = load_config(
                bind=["127.0.0.1:0"], graceful_timeout=0.5, accesslog=None, errorlog=None
            )
            [(_, port)] = await tg.start(serve_until, simulator, quiet, stop.wait)
            served[name] = (simulator, port)
        try:
            yield served
        finally:
            stop.set()


async def closed_early(simulator: Simulator) -> StreamRecord:
    """The simulator's one stream, once it has ended: closed by the gateway before its
    end (asserted)."""
    [record] = simulator.records
    with anyio.fail_after(WAIT):
        await simulator.wait_until(lambda: record.outcome != "streaming")
    assert record.outcome == "closed_by_client"
    assert record.sent < record.planned
    return record


def worker_class(anyio_backend: Any) -> str:
    """The hypercorn worker class matching a test's anyio backend."""
    if anyio_backend == "trio":
        return "trio"
    return "uvloop" if isinstance(anyio_backend, tuple) else "asyncio"


def established_to(port: int, states: tuple[str, ...] = ("01",)) -> int:
    """Count ESTABLISHED sockets whose remote port is ``port`` (from /proc/net/tcp*);
    ``states`` other TCP states to count too (08: CLOSE_WAIT)."""
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    remote, state = parts[2], parts[3]
                    if state in states and int(remote.rsplit(":", 1)[1], 16) == port:
                        count += 1
        except FileNotFoundError:
            continue
    return count


def end_lines(records: list[logging.LogRecord], session_id: str) -> list[str]:
    """The session's end-of-life log lines (there must be exactly one)."""
    prefix = f"[SSE] {session_id} "
    messages = (r.getMessage() for r in records)
    return [m for m in messages if m.startswith(prefix) and any(e in m for e in END_MARKERS)]


def end_lines_by_session(records: list[logging.LogRecord]) -> dict[str, list[str]]:
    """Every session's end-of-life log lines, read in one pass (for many sessions)."""
    found: dict[str, list[str]] = {}
    for record in records:
        message = record.getMessage()
        if message.startswith("[SSE] ") and any(e in message for e in END_MARKERS):
            found.setdefault(message.split(" ", 2)[1], []).append(message)
    return found


def without_timings(data: dict[str, Any]) -> dict[str, Any]:
    """An end event's data less ``first_delta_ms`` (timings, checked where they matter)."""
    assert isinstance(data.get("first_delta_ms"), dict), data
    return {k: v for k, v in data.items() if k != "first_delta_ms"}


def sim_config(**changes: Any) -> SimulatorConfig:
    return dataclasses.replace(SimulatorConfig(rate=200.0), **changes)


def quiet_logging() -> None:
    logging.getLogger("httpx2").setLevel(logging.WARNING)


class LogWatch(logging.Handler):
    """Counts the ``gateway`` log lines that contain ``text``; ``await wait(n)`` until
    there are ``n``. Lines are written on the test's own event loop, so the handler
    can set an event directly."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.lines: list[logging.LogRecord] = []
        self._changed = anyio.Event()

    def __enter__(self) -> LogWatch:
        logging.getLogger("gateway").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("gateway").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.lines.append(record)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait(self, count: int = 1) -> list[logging.LogRecord]:
        with anyio.fail_after(WAIT):
            while len(self.lines) < count:
                await self._changed.wait()
        return self.lines


def openai_client(h: Harness, key: str = "unused") -> AsyncOpenAI:
    """The official openai SDK, pointed at a harness's gateway: no retries, the tests'
    bound on every wait."""
    return AsyncOpenAI(
        base_url=f"http://127.0.0.1:{h.port}/v1", api_key=key, max_retries=0, timeout=WAIT
    )


async def read_chunks(
    stream: AsyncStream[ChatCompletionChunk], count: int | None = None
) -> list[ChatCompletionChunk]:
    """An openai SDK stream's chunks, up to ``count``, then the stream closed (as an
    app's ``async with`` does). Read through ``__anext__``: ``async for`` leaves the
    SDK's own async generator to the garbage collector, which Trio reports."""
    chunks: list[ChatCompletionChunk] = []
    async with stream:
        while count is None or len(chunks) < count:
            try:
                chunks.append(await stream.__anext__())
            except StopAsyncIteration:
                break
    return chunks


@dataclasses.dataclass
class Certificates:
    """A CA's certificate, and a certificate it issued with its key, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def issue_certificate(
    directory: Path,
    name: str,
    ca: trustme.CA,
    *identities: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Certificates:
    """Files ``<name>-ca.pem``, ``<name>.pem`` (the chain) and ``<name>.key`` in
    ``directory``, for a certificate ``ca`` issues to ``identities``."""
    issued = ca.issue_cert(*identities, not_before=not_before, not_after=not_after)
    pems = Certificates(
        directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}.key"
    )
    ca.cert_pem.write_to_path(str(pems.ca))
    issued.private_key_pem.write_to_path(str(pems.key))
    with pems.cert.open("wb") as chain:
        for blob in issued.cert_chain_pems:
            chain.write(blob.bytes())
    return pems

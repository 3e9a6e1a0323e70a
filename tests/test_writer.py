"""The relay's writes to its client: order, what counts as delivered, pings, the end.

The ASGI ``send`` here is a recorder: what a server does with the bytes is tested
end to end in test_stream.py and test_timeouts.py, on real servers.
"""

from __future__ import annotations

import anyio
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway import Settings, create_app
from gateway.core.events import PING
from gateway.core.session import Session, Stopped
from gateway.web.formats import GatewayEvents
from gateway.web.routes import _Gateway, _Streaming
from gateway.web.writer import SERVER_SEND, ClientWriter

pytestmark = pytest.mark.anyio


class _Client:
    """An ASGI ``send`` that records messages and can be made to block or fail."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.gate: anyio.Event | None = None
        self.blocked = anyio.Event()
        self.fail: BaseException | None = None

    async def send(self, message: Message) -> None:
        if self.fail is not None:
            raise self.fail
        if self.gate is not None:
            self.blocked.set()
            await self.gate.wait()
        self.messages.append(message)

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.messages if m["type"] == "http.response.body"]


def _writer() -> tuple[Session, _Client, ClientWriter]:
    session = Session("s", "m")
    client = _Client()
    return session, client, ClientWriter(session, GatewayEvents(), client.send)


async def test_chunks_go_in_order_after_the_start_and_count_once_written() -> None:
    session, client, writer = _writer()
    await writer.start(b"")
    assert client.messages[0]["type"] == "http.response.start"
    assert (b"x-session-id", b"s") in client.messages[0]["headers"]
    await writer.write(b"a", (1, 0, 0, 0))
    await writer.write(b"b")  # no mark: the count stays
    assert session.sent == (1, 0, 0, 0)
    await writer.write(b"c", (2, 1, 0, 0))
    assert session.sent == (2, 1, 0, 0)
    await writer.finish(lambda: b"t", relayed=True)
    assert client.bodies() == [b"a", b"b", b"c", b"t", b""]
    assert client.messages[-1]["more_body"] is False
    assert session.send_started_at is None


async def test_a_send_cut_short_counts_nothing() -> None:
    session, client, writer = _writer()
    await writer.start(b"")
    await writer.write(b"a", (1, 0, 0, 0))
    client.gate = anyio.Event()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.write, b"b", (2, 0, 0, 0))
            await client.blocked.wait()
            assert session.send_started_at is not None
            scope.cancel()
    assert writer.interrupted
    assert session.sent == (1, 0, 0, 0)
    assert session.send_started_at is None


async def test_a_client_gone_mid_write_stops_the_stream() -> None:
    session, client, writer = _writer()
    await writer.start(b"")
    client.fail = anyio.BrokenResourceError()
    await writer.write(b"a", (1, 0, 0, 0))
    assert session.client_gone
    assert session.outcome == Stopped("disconnect", None)
    assert session.sent == (0, 0, 0, 0)
    client.fail = None
    await writer.write(b"b", (2, 0, 0, 0))
    await writer.finish(lambda: b"terminal", relayed=True)
    assert client.bodies() == []  # nothing more is written to a client that left


async def test_a_ping_is_written_only_between_writes_and_never_beside_one() -> None:
    session, client, writer = _writer()
    await writer.start(b"")
    async with anyio.create_task_group() as tg:
        writer.pings = tg
        client.gate = anyio.Event()
        tg.start_soon(writer.write, b"a", (1, 0, 0, 0))
        await client.blocked.wait()
        with pytest.raises(anyio.WouldBlock):
            writer.write_nowait(PING)  # a write under way: the ping is needless
        client.gate.set()
        await anyio.wait_all_tasks_blocked()
        # Idle: the ping goes out from a task of its own, and a write waits for it.
        client.gate = anyio.Event()
        client.blocked = anyio.Event()
        writer.write_nowait(PING)
        await client.blocked.wait()
        done = anyio.Event()

        async def write_then_mark() -> None:
            await writer.write(b"b", (2, 0, 0, 0))
            done.set()

        tg.start_soon(write_then_mark)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        client.gate.set()
    assert done.is_set()
    assert client.bodies() == [b"a", PING, b"b"]
    assert session.sent == (2, 0, 0, 0)


async def test_no_ping_once_closed() -> None:
    _, client, writer = _writer()
    async with anyio.create_task_group() as tg:
        writer.pings = tg
        writer.close()
        with pytest.raises(anyio.WouldBlock):
            writer.write_nowait(PING)
    assert client.bodies() == []


def _messages() -> list[Message]:
    """A streamed response's messages, as the writer sends them."""
    return [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]


class _Probe(Response):
    def __init__(self) -> None:
        pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope[SERVER_SEND] is not send  # the route's send is wrapped
        for message in _messages():
            await send(message)


@pytest.mark.parametrize("cors", [(), ("https://app.example",)])
async def test_the_middleware_passes_body_messages_through_unchanged(
    cors: tuple[str, ...],
) -> None:
    # The writer sends a stream's body past Starlette's middleware (SERVER_SEND):
    # right only while every layer passes body messages on as they are, and sees
    # the response's start, which still goes through it.
    gateway = create_app(
        Settings(upstream_url="http://127.0.0.1:9/v1", model="m", cors_origins=cors)
    )

    async def endpoint(request: Request) -> Response:
        return _Probe()

    app = _Gateway(
        middleware=gateway.user_middleware,
        routes=[Route("/api/chat/stream", _Streaming(endpoint), methods=["POST"])],
    )
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/chat/stream",
        "raw_path": b"/api/chat/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"origin", b"https://app.example"), (b"host", b"gateway")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    assert scope[SERVER_SEND] is send
    assert sent[1:] == _messages()[1:]
    assert sent[0]["status"] == 200
    allowed = (b"access-control-allow-origin", b"https://app.example")
    assert (allowed in sent[0]["headers"]) == bool(cors)

"""The lean provider transport, on real sockets: reuse, early close, limits, stale
connections, and what the gateway builds from its settings."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import httpx2 as httpx
import pytest
from anyio.abc import SocketStream

from gateway import Settings
from gateway.provider.client import chat_url, create_client, open_stream
from gateway.provider.transport import BODY_EXTENSION, HTTP1Transport

from .harness import WAIT, Harness, read_request, sim_config

pytestmark = pytest.mark.anyio

BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}


def _client(max_connections: int = 10, pool: float = WAIT) -> httpx.AsyncClient:
    transport = HTTP1Transport(max_connections=max_connections, max_keepalive=max_connections)
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(WAIT, pool=pool))


async def _read_all(response: httpx.Response) -> bytes:
    body = response.extensions[BODY_EXTENSION]
    parts = []
    while chunk := await body.receive():
        parts.append(chunk)
    return b"".join(parts)


async def test_a_body_read_to_its_end_returns_its_connection_for_reuse() -> None:
    async with Harness(sim_config(tokens=5, rate=0)) as h, _client() as client:
        url = f"http://127.0.0.1:{h.sim_port}/v1/chat/completions"
        for _ in range(3):
            async with client.stream("POST", url, json=BODY) as response:
                assert response.status_code == 200
                body = await _read_all(response)
                assert body.endswith(b"data: [DONE]\n\n")
                # The end is seen with the last bytes, not at the server's keep-alive
                # timeout: a second read answers at once.
                with anyio.fail_after(1):
                    assert await response.extensions[BODY_EXTENSION].receive() == b""
        assert [r.outcome for r in h.simulator.records] == ["completed"] * 3
        assert h.upstream_connections() == 1


async def test_a_connection_aborted_after_the_body_ended_is_not_reused() -> None:
    # A stop can land after the provider's last byte and before the relay closes the
    # response: the connection it aborted must not go back to the pool.
    async with Harness(sim_config(tokens=5, rate=0)) as h, _client() as client:
        url = f"http://127.0.0.1:{h.sim_port}/v1/chat/completions"
        async with client.stream("POST", url, json=BODY) as response:
            await _read_all(response)
            assert response.extensions[BODY_EXTENSION].abort()
        async with client.stream("POST", url, json=BODY) as response:
            assert response.status_code == 200
            assert (await _read_all(response)).endswith(b"data: [DONE]\n\n")
        assert [r.outcome for r in h.simulator.records] == ["completed"] * 2


async def test_httpx_iteration_gives_the_same_bytes() -> None:
    async with Harness(sim_config(tokens=5, rate=0)) as h, _client() as client:
        url = f"http://127.0.0.1:{h.sim_port}/v1/chat/completions"
        async with client.stream("POST", url, json=BODY) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        async with client.stream("POST", url, json=BODY) as response:
            fast = await _read_all(response)
        # The two answers differ only in their id, and in "created" when a second
        # boundary falls between them.
        created = re.compile(rb'"created":\d+')
        assert created.sub(b"", raw.replace(b"sim1", b"sim2")) == created.sub(b"", fast)


async def test_closing_early_closes_the_socket() -> None:
    async with Harness(sim_config(tokens=10_000, rate=200)) as h, _client() as client:
        url = f"http://127.0.0.1:{h.sim_port}/v1/chat/completions"
        async with client.stream("POST", url, json=BODY) as response:
            assert await response.extensions[BODY_EXTENSION].receive()
        record = await h.closed(await h.record())
        assert record.outcome == "closed_by_client"
        assert h.upstream_connections() == 0


async def test_a_full_pool_times_out_and_frees_its_slot_on_close() -> None:
    async with (
        Harness(sim_config(tokens=10_000, rate=50)) as h,
        _client(max_connections=1, pool=0.2) as client,
    ):
        url = f"http://127.0.0.1:{h.sim_port}/v1/chat/completions"
        async with client.stream("POST", url, json=BODY) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.PoolTimeout):
                await client.post(url, json=BODY)
        async with client.stream("POST", url, json=BODY) as response:
            assert response.status_code == 200


@asynccontextmanager
async def _one_shot_server() -> AsyncIterator[tuple[int, list[int], anyio.Event]]:
    """Answers one request per connection with a short body, then closes."""
    accepted: list[int] = []
    closed = anyio.Event()

    async def handle(stream: SocketStream) -> None:
        accepted.append(1)
        async with stream:
            await read_request(stream, b"")
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        closed.set()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port), accepted, closed
        tg.cancel_scope.cancel()


async def test_a_kept_alive_connection_the_server_closed_is_not_reused() -> None:
    async with _one_shot_server() as (port, accepted, closed), _client() as client:
        first = await client.post(f"http://127.0.0.1:{port}/", json=BODY)
        assert first.text == "ok"
        with anyio.fail_after(WAIT):
            await closed.wait()
        second = await client.post(f"http://127.0.0.1:{port}/", json=BODY)
        assert second.text == "ok"
        assert len(accepted) == 2


async def test_connection_errors_are_httpx_errors() -> None:
    async with _one_shot_server() as (port, _, _), _client() as client:
        pass
    async with _client() as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{port}/", json=BODY)
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.post("ftp://127.0.0.1/", json=BODY)


def test_the_gateway_uses_it_unless_a_proxy_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    settings = Settings(upstream_url="https://api.example.com/v1", model="m")
    assert isinstance(create_client(settings)._transport, HTTP1Transport)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.com:3128")
    assert not isinstance(create_client(settings)._transport, HTTP1Transport)
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert isinstance(create_client(settings)._transport, HTTP1Transport)


async def test_a_streams_request_is_what_httpx_would_have_sent() -> None:
    # The stream's request skips httpx's request building (a head prepared once per
    # base URL): the provider must see the same request either way, path, query
    # (Azure's api-version), headers and body.
    requests: list[bytes] = []
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 14\r\n\r\n"
    answer += b"data: [DONE]\n\n"

    async def provider(stream: SocketStream) -> None:
        async with stream:
            buffer = b""
            while (got := await read_request(stream, buffer)) is not None:
                request, buffer = got
                requests.append(request)
                await stream.send(answer)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    base = f"http://127.0.0.1:{port}/openai/deployments/d?api-version=2024-10-21"
    payload = {"model": "m", "messages": [{"role": "user", "content": "h\u00e9 \u2028"}]}
    settings = Settings(upstream_url=base, upstream_api_key="sk-test", model="m")
    async with listener, anyio.create_task_group() as tg, create_client(settings) as client:
        tg.start_soon(listener.serve, provider)
        for _ in range(2):  # the prepared head, made on the first request, then reused
            response = await open_stream(client, base, payload)
            await response.aclose()
        async with client.stream("POST", chat_url(base), json=payload) as r:
            assert r.status_code == 200
        tg.cancel_scope.cancel()

    def parts(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
        head, _, body = raw.partition(b"\r\n\r\n")
        line, *fields = head.split(b"\r\n")
        return line, sorted(f.lower() for f in fields), body

    # The third went through httpx's client.
    ours, ours_again, theirs = (parts(r) for r in requests)
    assert ours == ours_again
    line, fields, body = ours
    assert line == b"POST /openai/deployments/d/chat/completions?api-version=2024-10-21 HTTP/1.1"
    assert json.loads(body) == payload
    assert body == theirs[2]
    assert b"authorization: bearer sk-test" in fields
    assert b"content-type: application/json" in fields
    assert fields == theirs[1]


async def test_a_request_that_was_written_is_never_sent_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The provider answers the first request on a connection, then reads the second
    # and closes without answering. Before, the gateway took the close for a stale
    # keep-alive connection and sent the chat request again: billed twice.
    requests: list[bytes] = []
    stream_body = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'

    async def provider(stream: SocketStream) -> None:
        async with stream:
            buffer = b""
            for answered in (True, False):
                got = await read_request(stream, buffer)
                if got is None:
                    return
                request, buffer = got
                requests.append(request)
                if not answered:
                    return  # closes the connection, as a crashing provider would
                await stream.send(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(stream_body), stream_body)
                )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, provider)
        async with Harness(upstream_url=f"http://127.0.0.1:{port}/v1") as h:
            async with h.stream("session_1_first000") as s:
                assert (await s.rest())[-1].event == "done"
            async with h.stream("session_1_second00") as s:
                events = await s.rest()
            assert events[-1].event == "error"
            assert events[-1].data["code"] == "upstream_unavailable"
            await h.ended("session_1_second00")
        tg.cancel_scope.cancel()
    assert len(requests) == 2


@asynccontextmanager
async def _scripted_server(
    answers: list[tuple[bytes, bool]],
) -> AsyncIterator[tuple[int, list[int]]]:
    """Answers the n-th request with the n-th of ``answers``, written as given, closing
    the connection after it if its flag says so; ``accepted`` counts connections."""
    accepted: list[int] = []
    queue = list(answers)

    async def handle(stream: SocketStream) -> None:
        accepted.append(1)
        async with stream:
            buffer = b""
            while queue:
                got = await read_request(stream, buffer)
                if got is None:
                    return
                buffer = got[1]
                answer, close = queue.pop(0)
                await stream.send(answer)
                if close:
                    return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port), accepted
        tg.cancel_scope.cancel()


_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    ("answer", "close", "reused"),
    [
        # Chunk extensions and trailers are read past; the connection is kept.
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"1;ext=x\r\no\r\n1\r\nk\r\n0\r\nx-trailer: 1\r\n\r\n",
            False,
            True,
        ),
        # No length: the server's close ends the body, and the connection.
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nok", True, False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", False, False),
        # An interim response is skipped: its headers are not the answer's.
        (b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + _OK, False, True),
        # Bytes after the end that no request asked for: the connection is not reused.
        (_OK + b"HTTP/1.1 200 OK\r\n", False, False),
        (_OK + b"\x00garbage", False, False),
    ],
)
async def test_the_response_decides_its_body_and_whether_its_connection_is_reused(
    answer: bytes, close: bool, reused: bool
) -> None:
    script = [(answer, close), (_OK, False)]
    async with _scripted_server(script) as (port, accepted), _client() as client:
        url = f"http://127.0.0.1:{port}/"
        first = await client.post(url, json=BODY)
        assert (first.status_code, first.content) == (200, b"ok")
        assert "link" not in first.headers
        second = await client.post(url, json=BODY)
        assert second.content == b"ok"
        assert len(accepted) == (1 if reused else 2)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n", id="long-head"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"x-a: b\r\n" * 5000, id="endless-head"),
        pytest.param(b"HTTP/1.1 200 OK\r\nx-bad header: 1\r\n\r\n", id="bad-header"),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n", id="upgrade"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n", id="closed-in-head"),
        pytest.param(b"", id="closed-before-answering"),
    ],
)
async def test_a_head_that_is_not_http_1_1_is_a_protocol_error(answer: bytes) -> None:
    script = [(answer, True), (_OK, False)]
    async with _scripted_server(script) as (port, accepted), _client() as client:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(url, json=BODY)
        # The next request gets a connection of its own, and its answer.
        assert (await client.post(url, json=BODY)).content == b"ok"
        assert len(accepted) == 2


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nok\r\n", id="bad-chunk-size"),
        pytest.param(b"5\r\nok", id="closed-in-a-chunk"),
        pytest.param(b"2\r\nok\r\n", id="closed-before-the-last-chunk"),
    ],
)
async def test_a_body_that_breaks_off_is_a_protocol_error(body: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body
    url = "http://127.0.0.1:{}/"
    async with (
        _scripted_server([(answer, True)]) as (port, _),
        _client() as client,
        client.stream("POST", url.format(port), json=BODY) as response,
    ):
        # The head, and the bytes before the fault, are read first.
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await _read_all(response)


async def test_head_requests_are_refused() -> None:
    async with _client() as client:
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.head("http://127.0.0.1:9/")


async def test_endless_trailers_are_a_protocol_error_not_a_growing_buffer() -> None:
    # After the last chunk, a provider that sends trailer bytes forever: the parser
    # would keep them all; the transport stops at 16 KiB without a body byte.
    async def provider(stream: SocketStream) -> None:
        async with stream:
            if await read_request(stream, b"") is None:
                return
            await stream.send(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: "
            )
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                while True:
                    await stream.send(b"a" * 4096)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg, _client() as client:
        tg.start_soon(listener.serve, provider)
        async with client.stream("POST", f"http://127.0.0.1:{port}/", json=BODY) as response:
            with anyio.fail_after(WAIT), pytest.raises(httpx.RemoteProtocolError) as raised:
                await _read_all(response)
        assert "body framing is over 16384 bytes" in str(raised.value)
        tg.cancel_scope.cancel()


@contextlib.contextmanager
def _silent_provider() -> Iterator[socket.socket]:
    """A listening socket that accepts nothing: the kernel completes each handshake
    and holds what is sent in a small receive buffer, read by no one (an anyio
    listener's connection, on asyncio, would read it all into memory)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener


async def test_a_request_the_provider_does_not_read_is_a_write_timeout() -> None:
    # The request is handed to the socket without anyio's send; what the socket does
    # not take (more than the kernel's buffers hold) is still waited for under the
    # write timeout, never left to the read timeout.
    with _silent_provider() as provider:
        port = provider.getsockname()[1]
        transport = HTTP1Transport(max_connections=1, max_keepalive=1)
        timeout = httpx.Timeout(WAIT, write=0.3)
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            with anyio.fail_after(WAIT), pytest.raises(httpx.WriteTimeout):
                await client.post(f"http://127.0.0.1:{port}/", content=b"x" * (16 << 20))


async def test_the_request_is_written_without_a_scheduling_round() -> None:
    # One round fewer on the first token's path (docs/benchmarks.md, "The first
    # token"): the request leaves with no checkpoint, so even a cancelled scope does
    # not stop it (anyio's send checkpoints first, on every backend).
    request = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    transport = HTTP1Transport(max_connections=1, max_keepalive=1)
    with _silent_provider() as provider:
        origin = ("http", "127.0.0.1", provider.getsockname()[1])
        connection = await transport._connect(None, origin, WAIT)
        async with connection.stream:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await transport._write(connection, request, None, WAIT)
        assert not scope.cancelled_caught
        accepted, _ = await anyio.to_thread.run_sync(provider.accept)
        with accepted:
            accepted.settimeout(WAIT)
            received = await anyio.to_thread.run_sync(accepted.recv, 4096)
    assert received == request

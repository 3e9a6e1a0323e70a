from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from hypercorn.asyncio.tcp_server import TCPServer as AsyncioTCPServer
from hypercorn.trio.tcp_server import TCPServer as TrioTCPServer
from starlette.types import Receive, Scope, Send

from gateway import ConfigError
from gateway.server import keepalive, writes
from gateway.server.serve import is_hypercorn_setting, load_config
from gateway.tools.simulator import Simulator, serve_simulator
from support.processes import free_port

from .harness import ASYNCIO_AND_TRIO, WAIT, answer_lifespan, serve_until, worker_class
from .processes import hypercorn_workers, until_up

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_in_hypercorn_toml_is_a_real_setting() -> None:
    data = tomllib.loads((ROOT / "hypercorn.toml").read_text())
    assert data, "hypercorn.toml is empty"
    assert [key for key in data if not is_hypercorn_setting(key)] == []
    config = load_config(ROOT / "hypercorn.toml")
    for key, value in data.items():
        assert getattr(config, key) == value
    assert config.read_timeout is None


def test_misspelt_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    path.write_text('gracefull_timeout = 5\nbind = ["127.0.0.1:1"]\n')
    with pytest.raises(ConfigError, match="gracefull_timeout"):
        load_config(path)


def test_read_timeout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    path.write_text("read_timeout = 30\n")
    with pytest.raises(ConfigError, match="read_timeout"):
        load_config(path)


def test_unknown_worker_class_is_refused() -> None:
    with pytest.raises(ConfigError, match="worker_class"):
        load_config(worker_class="gevent")


@pytest.mark.parametrize("key", ["create_sockets", "from_toml", "log", "ssl_enabled", "_bind"])
def test_methods_and_private_names_are_not_settings(key: str) -> None:
    assert not is_hypercorn_setting(key)


async def _chunked_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers each request with a body in two chunks, as a stream's is sent."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"one", "more_body": True})
    await send({"type": "http.response.body", "body": b"two"})


async def _exchange(stream: SocketStream) -> None:
    """One request and its whole response on a kept-alive connection."""
    await stream.send(b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n")
    response = b""
    while not response.endswith(b"0\r\n\r\n"):
        response += await stream.receive()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" not in response.lower()


@pytest.mark.anyio
@pytest.mark.parametrize("requests", [1, 2])
async def test_a_connection_the_client_closes_while_idle_is_closed_at_once(
    requests: int,
) -> None:
    # hypercorn 0.18 alone keeps it open (CLOSE_WAIT) until keep_alive_timeout.
    config = load_config(bind=["127.0.0.1:0"], keep_alive_timeout=60.0, accesslog=None)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        [(_, port)] = await tg.start(serve_until, _chunked_app, config, stop.wait)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            for _ in range(requests):  # kept alive between them
                await _exchange(stream)
            await stream.send_eof()
            with anyio.fail_after(WAIT):
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()
        stop.set()


@pytest.mark.anyio
async def test_an_idle_connection_is_still_closed_at_the_keep_alive_timeout() -> None:
    config = load_config(bind=["127.0.0.1:0"], keep_alive_timeout=0.2, accesslog=None)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        [(_, port)] = await tg.start(serve_until, _chunked_app, config, stop.wait)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await _exchange(stream)
            with anyio.fail_after(WAIT):
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()
        stop.set()


@pytest.mark.anyio
async def test_a_connection_half_closed_after_its_request_is_closed_once_answered() -> None:
    # The client sends its request and its end of data at once (shutdown(SHUT_WR), as
    # some load balancers and CLI clients do), then reads the answer. Before: hypercorn
    # 0.18 on asyncio and uvloop kept the socket until keep_alive_timeout.
    config = load_config(bind=["127.0.0.1:0"], keep_alive_timeout=60.0, accesslog=None)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        [(_, port)] = await tg.start(serve_until, _chunked_app, config, stop.wait)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n")
            await stream.send_eof()
            response = b""
            with anyio.fail_after(WAIT):
                while True:
                    try:
                        response += await stream.receive()
                    except anyio.EndOfStream:
                        break
            assert response.startswith(b"HTTP/1.1 200 ")
            assert response.endswith(b"0\r\n\r\n")
        stop.set()


def test_the_installed_hypercorn_has_what_the_keep_alive_fix_patches() -> None:
    assert keepalive.missing() == []


def test_the_installed_hypercorn_has_what_the_trio_writes_use() -> None:
    assert writes.fits()


@pytest.mark.parametrize(("module", "installed"), [("gateway.app", True), ("gateway", False)])
def test_plain_hypercorn_serving_the_app_writes_as_gateway_serve_does(
    module: str, installed: bool
) -> None:
    # `hypercorn gateway.app:app` imports the entry point, which installs them; the
    # package alone (the floor's serving, bench/serving.py) leaves hypercorn as it is.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    probe = (
        f"import {module}\n"
        "from hypercorn.trio.tcp_server import TCPServer\n"
        "print(getattr(TCPServer.protocol_send, '_writes_at_once', False))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(installed)


@pytest.mark.parametrize(
    ("server", "attribute"),
    [
        (AsyncioTCPServer, "_idle_timeout"),
        (AsyncioTCPServer, "protocol_send"),
        (TrioTCPServer, "protocol_send"),
    ],
)
def test_a_hypercorn_without_what_the_fix_patches_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, server: type[Any], attribute: str
) -> None:
    monkeypatch.delattr(server, attribute)
    with pytest.raises(ConfigError, match=f"{server.__module__}.TCPServer.{attribute}"):
        keepalive.install()


@pytest.mark.anyio
@ASYNCIO_AND_TRIO
@pytest.mark.slow
async def test_plain_hypercorn_serving_the_app_has_the_fix(
    anyio_backend: Any, tmp_path: Path
) -> None:
    # The documented production command, not `gateway serve`: a client that closes
    # after its answer is closed at once, not after the 60 s keep-alive. (Without the
    # fix it is the asyncio worker that waits; Trio's closes this one by itself.)
    port = free_port()
    config = tmp_path / "hypercorn.toml"
    config.write_text(f'bind = ["127.0.0.1:{port}"]\nkeep_alive_timeout = 60\nworkers = 1\n')
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        # A provider of its own, not the demo simulator (whose serving installs the fix).
        [(_, provider_port)] = await tg.start(serve_simulator, Simulator(), stop.wait)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["GATEWAY_UPSTREAM_URL"] = f"http://127.0.0.1:{provider_port}/v1"
        env["GATEWAY_MODEL"] = "sim-model"
        async with hypercorn_workers(worker_class(anyio_backend), port, env, config=config):
            await until_up(f"http://127.0.0.1:{port}")
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
                response = b""
                while b"\r\n\r\n" not in response:
                    response += await stream.receive()
                assert response.startswith(b"HTTP/1.1 200 ")
                await stream.send_eof()
                with anyio.fail_after(WAIT):
                    await _read_to_end(stream)
        stop.set()


async def _read_to_end(stream: SocketStream) -> None:
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            await stream.receive()


async def _write_app(
    scope: Scope, receive: Receive, send: Send, *, big: bytes, yielded: list[bool]
) -> None:
    """A response whose second chunk goes from a task whose scope is cancelled: the
    first chunk's send is watched for a scheduling round, the second is far more than
    the socket takes at once."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    ran = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_set, ran)  # runs at this task's next scheduling round
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        yielded.append(ran.is_set())
    with anyio.CancelScope() as cancelled:
        cancelled.cancel()
        # No checkpoint on the way in: what the socket takes goes at once, and the rest
        # must follow whole (shielded), not be cut by the cancel.
        await send({"type": "http.response.body", "body": big, "more_body": True})
    await send({"type": "http.response.body", "body": b"end"})


async def _set(event: anyio.Event) -> None:
    event.set()


@pytest.mark.anyio
async def test_a_response_is_written_without_a_scheduling_round_and_whole_when_cancelled(
    anyio_backend: Any,
) -> None:
    # Under Trio, hypercorn's send yields twice (its lock, the socket's send): the
    # gateway's serving writes at once when nothing else is writing (writes.py).
    # A chunk the socket does not take at once, sent from a cancelled scope, still
    # arrives whole and before the next: the rest goes through hypercorn's shielded
    # write, its lock taken before any other send.
    big = bytes(range(256)) * (16 * 4096)  # 16 MiB
    yielded: list[bool] = []
    config = load_config(bind=["127.0.0.1:0"], accesslog=None)
    stop = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await _write_app(scope, receive, send, big=big, yielded=yielded)

    async with anyio.create_task_group() as tg:
        [(_, port)] = await tg.start(serve_until, app, config, stop.wait)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n")
            response = bytearray()
            with anyio.fail_after(WAIT):
                while not response.endswith(b"0\r\n\r\n"):
                    response += await stream.receive(1 << 20)
        stop.set()
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert _dechunked(body) == b"first" + big + b"end"
    assert yielded == [False]


def _dechunked(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(out)
        out += body[:size]
        body = body[size + 2 :]

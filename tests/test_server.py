from __future__ import annotations

import contextlib
import os
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
from gateway.server import keepalive
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

"""The lifespan unwinds: whichever start step fails, everything opened before it is
closed, and the start-up fails with that step's error."""

from __future__ import annotations

import shutil
import socket
from typing import Any

import anyio
import coredis
import pytest
from starlette.applications import Starlette

from gateway import Settings, create_app
from gateway.cluster.instance import Cluster
from gateway.web.lifespan import Lifespan
from gateway.web.state import state_of

from .processes import RedisServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="Debian's redis-server is not installed (make test does)",
    ),
]


class _PlantedFailure(Exception):
    pass


async def _subscribers(redis: RedisServer) -> int:
    client = coredis.Redis.from_url(redis.url, decode_responses=True)
    async with client:
        channels = await client.pubsub_channels("gw:*")
        return len(channels)


async def _joined(app: Starlette) -> None:
    cluster = state_of(app).cluster
    assert cluster is not None
    with anyio.fail_after(5):
        while not cluster.available:  # noqa: ASYNC110 (Redis's side: no event to await)
            await anyio.sleep(0.01)


def _no_client_open(app: Starlette) -> bool:
    """The providers' clients were never made (the start-up failed before them) or
    are all closed."""
    providers = state_of(app)._providers
    return providers is None or all(p.client.is_closed for p in providers)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_a_full_start_and_stop_opens_and_closes_everything(redis: RedisServer) -> None:
    app = create_app(Settings(redis_url=redis.url))  # demo mode, with Redis
    async with Lifespan(app):
        [simulator] = state_of(app).providers
        port = int(simulator.base_url.rsplit(":", 1)[1].split("/")[0])
        assert _listening(port)
        await _joined(app)
        assert await _subscribers(redis) == 2
    assert simulator.client.is_closed
    assert not _listening(port)
    assert await _subscribers(redis) == 0


async def test_the_cluster_failing_to_start_closes_the_provider_client(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fail(self: Cluster, *args: Any, **kwargs: Any) -> None:
        raise _PlantedFailure("cluster start")

    monkeypatch.setattr(Cluster, "run", fail)
    app = create_app(Settings(redis_url=redis.url, upstream_url="http://127.0.0.1:9/v1", model="m"))
    with pytest.RaisesGroup(_PlantedFailure, allow_unwrapped=True, flatten_subgroups=True):
        async with Lifespan(app):
            pytest.fail("the start-up must fail")
    assert _no_client_open(app)


async def test_the_simulator_failing_to_start_closes_the_cluster_and_the_client(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(Settings(redis_url=redis.url))  # demo mode: the simulator starts last

    async def fail(*args: Any, **kwargs: Any) -> None:
        # Once the cluster has joined, so that there is a subscription to leave.
        await _joined(app)
        raise _PlantedFailure("simulator start")

    monkeypatch.setattr("gateway.web.lifespan.serve_simulator", fail)
    with pytest.RaisesGroup(_PlantedFailure, allow_unwrapped=True, flatten_subgroups=True):
        async with Lifespan(app):
            pytest.fail("the start-up must fail")
    assert _no_client_open(app)
    # The cluster had joined; it has left Redis again.
    assert await _subscribers(redis) == 0

"""Cancel across instances through a real redis-server: two `gateway serve` processes
share one Redis and one simulator; plus hypercorn `workers = 2` behind one port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import coredis
import httpx2 as httpx
import pytest

from gateway.server import load_config
from gateway.simulator import Simulator, SimulatorConfig

from .harness import serve_until, worker_class
from .processes import ROOT, WAIT, Gateway, free_port

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="Debian's redis-server is not installed (make test does)",
    ),
]

BODY = {"messages": [{"role": "user", "content": "x"}]}


class RedisServer:
    """`redis-server` on a free port, without persistence; stop() and start() again on
    the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)  # another process starting up; nothing to await

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(WAIT)
            self.process = None


class Cluster:
    """A simulator in the test's process, a Redis, and gateway processes."""

    def __init__(self, worker: str, provider: Simulator, provider_port: int) -> None:
        self.worker = worker
        self.provider = provider
        self.provider_port = provider_port
        self.redis = RedisServer()
        self.gateways: list[Gateway] = []

    async def gateway(self, joined: bool = True) -> Gateway:
        gateway = await anyio.to_thread.run_sync(
            lambda: Gateway(
                self.worker,
                GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{self.provider_port}/v1",
                GATEWAY_MODEL="m",
                GATEWAY_REDIS_URL=self.redis.url,
                GATEWAY_CLAIM_TTL="1",
            )
        )
        self.gateways.append(gateway)
        if joined:
            await anyio.to_thread.run_sync(gateway.wait_for, r"\[cluster\] instance \S+ joined")
        return gateway


@asynccontextmanager
async def _cluster(anyio_backend: Any) -> AsyncIterator[Cluster]:
    provider = Simulator(SimulatorConfig(tokens=100_000, rate=50.0))
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        config = load_config(bind=["127.0.0.1:0"], graceful_timeout=1.0, accesslog=None)
        [(_, port)] = await tg.start(serve_until, provider, config, stop.wait)
        cluster = Cluster(worker_class(anyio_backend), provider, port)
        await anyio.to_thread.run_sync(cluster.redis.start)
        try:
            yield cluster
        finally:
            for gateway in cluster.gateways:
                await anyio.to_thread.run_sync(gateway.stop)
            await anyio.to_thread.run_sync(cluster.redis.stop)
            stop.set()
        for gateway in cluster.gateways:
            assert not any("Traceback" in line for line in gateway.lines), "\n".join(gateway.lines)


@asynccontextmanager
async def _stream(client: httpx.AsyncClient, url: str, sid: str) -> AsyncIterator[Any]:
    """A live stream on ``url``, once its first token has arrived; yields its lines."""
    async with client.stream(
        "POST", f"{url}/api/chat/stream", headers={"X-Session-Id": sid}, json=BODY
    ) as response:
        assert response.status_code == 200, response.status_code
        lines = response.aiter_lines()
        while await anext(lines) != "event: token":
            pass
        yield lines


async def _rest(lines: Any) -> str:
    return "\n".join([line async for line in lines])


async def test_cancel_on_another_instance_closes_the_provider_before_the_200(
    anyio_backend: Any,
) -> None:
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        a, b = await c.gateway(), await c.gateway()
        sid = "session_1_cluster01"
        async with _stream(client, a.url, sid) as lines:
            record = c.provider.records[-1]
            # A duplicate live id is refused on any instance.
            dup = await client.post(
                f"{b.url}/api/chat/stream", headers={"X-Session-Id": sid}, json=BODY
            )
            assert dup.status_code == 409
            response = await client.post(f"{b.url}/api/chat/cancel/{sid}")
            answered = time.monotonic()
            assert response.status_code == 200
            assert response.json() == {"ok": True, "cancelled": True, "session_id": sid}
            assert record.outcome == "closed_by_client"
            assert record.ended_at is not None
            assert record.ended_at <= answered
            rest = await _rest(lines)
        assert '"reason":"cancel"' in rest
        a.wait_for(rf"\[SSE\] {sid} aborted by client/cancel reason=cancel")
        # Unknown ids: 404 from either instance.
        for gateway in (a, b):
            unknown = await client.post(f"{gateway.url}/api/chat/cancel/session_1_nobody00")
            assert unknown.status_code == 404


async def test_redis_down_local_cancel_works_remote_is_503_then_recovers(
    anyio_backend: Any,
) -> None:
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        a, b = await c.gateway(), await c.gateway()
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(_stream(client, a.url, "session_1_before00"))
            await anyio.to_thread.run_sync(c.redis.stop)
            for gateway in (a, b):
                await anyio.to_thread.run_sync(gateway.wait_for, r"\[cluster\] Redis unreachable")
            # Streams keep working and local cancels too.
            local = await client.post(f"{a.url}/api/chat/cancel/session_1_before00")
            assert local.status_code == 200
            await stack.enter_async_context(_stream(client, a.url, "session_1_during00"))
            remote = await client.post(f"{b.url}/api/chat/cancel/session_1_during00")
            assert remote.status_code == 503
            assert remote.json()["error"]["code"] == "cancel_unavailable"
            # Back, without restarting the gateways: a stream started during the
            # outage is claimed again and can be cancelled from the other instance.
            await anyio.to_thread.run_sync(c.redis.start)
            for gateway in (a, b):
                await anyio.to_thread.run_sync(
                    gateway.wait_for, r"\[cluster\] Redis reachable again"
                )
            remote = await client.post(f"{b.url}/api/chat/cancel/session_1_during00")
            assert remote.status_code == 200
        outage_lines = [line for line in a.lines if "Redis unreachable" in line]
        assert len(outage_lines) == 1  # one line per outage


async def test_redis_unreachable_at_start_up(anyio_backend: Any) -> None:
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        await anyio.to_thread.run_sync(c.redis.stop)
        a = await c.gateway(joined=False)
        await anyio.to_thread.run_sync(a.wait_for, r"\[cluster\] Redis unreachable")
        assert (await client.get(f"{a.url}/healthz")).json()["cluster"] == "unavailable"
        async with _stream(client, a.url, "session_1_startup0"):
            local = await client.post(f"{a.url}/api/chat/cancel/session_1_startup0")
            assert local.status_code == 200
        # Not here, and nobody to ask: 503, not a 404 that might be false.
        unknown = await client.post(f"{a.url}/api/chat/cancel/session_1_nobody00")
        assert unknown.status_code == 503
        await anyio.to_thread.run_sync(c.redis.start)
        await anyio.to_thread.run_sync(a.wait_for, r"\[cluster\] Redis reachable again")
        unknown = await client.post(f"{a.url}/api/chat/cancel/session_1_nobody00")
        assert unknown.status_code == 404


async def test_a_killed_owner_leaves_a_claim_that_expires(anyio_backend: Any) -> None:
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        a, b = await c.gateway(), await c.gateway()
        sid = "session_1_orphan00"
        redis = coredis.Redis.from_url(c.redis.url, decode_responses=True)
        async with redis, _stream(client, a.url, sid):
            keys = await redis.keys("gw:claim:*")
            assert len(keys) == 1
            a.process.send_signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(lambda: a.process.wait(WAIT))
            # Nobody refreshes it now: it lives out its TTL (1 s), no longer.
            ttl_ms = await redis.pttl(keys.pop())
            assert 0 < ttl_ms <= 1000
            await anyio.sleep(ttl_ms / 1000 + 0.05)  # the expiry under test is time itself
            assert await redis.keys("gw:claim:*") == set()
        response = await client.post(f"{b.url}/api/chat/cancel/{sid}")
        assert response.status_code == 404
        c.gateways.remove(a)
        assert a.process.stdout is not None
        a.process.stdout.close()


async def test_hypercorn_workers_2_behind_one_port_cancel_all(anyio_backend: Any) -> None:
    worker = worker_class(anyio_backend)
    async with _cluster(anyio_backend) as c:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env |= {
            "GATEWAY_UPSTREAM_URL": f"http://127.0.0.1:{c.provider_port}/v1",
            "GATEWAY_MODEL": "m",
            "GATEWAY_REDIS_URL": c.redis.url,
        }
        process = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "hypercorn",
                "--workers",
                "2",
                "-k",
                worker,
                "-b",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "1",
                "gateway.app:app",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(timeout=WAIT) as client:
                with anyio.fail_after(30):
                    instances: set[str] = set()
                    # Both workers up and joined (a new connection lands on either).
                    while len(instances) < 2:
                        try:
                            async with httpx.AsyncClient(timeout=WAIT) as fresh:
                                health = (await fresh.get(f"{url}/healthz")).json()
                            if health.get("cluster") == "ok":
                                instances.add(health["instance"])
                        except httpx.TransportError:
                            pass
                        await anyio.sleep(0.05)  # starting processes; nothing to await
                async with AsyncExitStack() as stack:
                    sids = [f"session_1_workers{i:03d}" for i in range(50)]
                    streams = [
                        await stack.enter_async_context(_stream(client, url, sid)) for sid in sids
                    ]
                    assert c.provider.live == 50
                    codes = []
                    for sid in sids:
                        # A fresh connection each, so cancels spread over both workers.
                        async with httpx.AsyncClient(timeout=WAIT) as fresh:
                            codes.append(
                                (await fresh.post(f"{url}/api/chat/cancel/{sid}")).status_code
                            )
                    assert codes == [200] * 50
                    for lines in streams:
                        assert '"reason":"cancel"' in await _rest(lines)
                assert c.provider.live == 0
                assert all(r.outcome == "closed_by_client" for r in c.provider.records)
        finally:
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(WAIT, shield=True):
                await process.wait()
            if process.returncode is None:
                process.kill()
            await process.aclose()

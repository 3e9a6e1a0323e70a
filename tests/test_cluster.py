"""Cancel across instances through a real redis-server: two `gateway serve` processes
share one Redis and one simulator; plus hypercorn `workers = 2` behind one port."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import coredis
import httpx2 as httpx
import openai
import pytest

from gateway.server.serve import load_config
from gateway.tools.contract.kit import SAME_INSTANT
from gateway.tools.simulator import Simulator, SimulatorConfig, StreamRecord
from support.processes import free_port

from .harness import ASYNCIO_AND_TRIO, read_chunks, serve_until, worker_class
from .processes import WAIT, Gateway, RedisSentinel, RedisServer, hypercorn_workers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="Debian's redis-server is not installed (make test does)",
    ),
]

MESSAGES: list[Any] = [{"role": "user", "content": "x"}]
BODY = {"messages": MESSAGES}


class Cluster:
    """A simulator in the test's process, a Redis, and gateway processes."""

    def __init__(self, worker: str, provider: Simulator, provider_port: int) -> None:
        self.worker = worker
        self.provider = provider
        self.provider_port = provider_port
        self.redis = RedisServer()
        self.gateways: list[Gateway] = []

    async def gateway(
        self, joined: bool = True, module: str = "gateway", **settings: str
    ) -> Gateway:
        gateway = await anyio.to_thread.run_sync(
            lambda: Gateway(
                self.worker,
                module,
                GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{self.provider_port}/v1",
                GATEWAY_MODEL="m",
                **{"GATEWAY_REDIS_URL": self.redis.url, "GATEWAY_CLAIM_TTL": "1", **settings},
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
            await _closed_by(c.provider, record, answered)
            rest = await _rest(lines)
        assert '"reason":"cancel"' in rest
        a.wait_for(rf"\[SSE\] {sid} aborted by client/cancel reason=cancel")
        # The cancel was forwarded by b, the stream stopped and counted by a.
        metrics_b = (await client.get(f"{b.url}/metrics")).text
        metrics_a = (await client.get(f"{a.url}/metrics")).text
        assert 'gateway_cancel_requests_total{result="forwarded"} 1.0' in metrics_b
        assert 'gateway_streams_ended_total{outcome="cancelled"} 1.0' in metrics_a
        assert "gateway_cluster_available 1.0" in metrics_a
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
        # Back, but Redis may have lost the claims of instances that have not set them
        # again yet (their reconnect backoff, a claim TTL): 503 until then, then 404.
        answers: list[int] = []
        with anyio.fail_after(WAIT):
            while not answers or answers[-1] != 404:
                unknown = await client.post(f"{a.url}/api/chat/cancel/session_1_nobody00")
                answers.append(unknown.status_code)
                if unknown.status_code != 404:
                    await anyio.sleep(0.1)  # another process's state: polled
        assert set(answers) <= {503, 404}, answers


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
        url = f"http://127.0.0.1:{port}"
        async with hypercorn_workers(worker, port, env), httpx.AsyncClient(timeout=WAIT) as client:
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
                        codes.append((await fresh.post(f"{url}/api/chat/cancel/{sid}")).status_code)
                assert codes == [200] * 50
                for lines in streams:
                    assert '"reason":"cancel"' in await _rest(lines)
            assert c.provider.live == 0
            assert all(r.outcome == "closed_by_client" for r in c.provider.records)


_MALFORMED = [
    "not json at all",
    "[1]",
    '{"hello": 1}',
    '{"v": 1, "id": "ab"}',
    '{"v": 1, "id": 5, "reply_to": [], "principal": 1, "session_id": {}}',
    '{"v": 1, "id": "ab", "reply_to": "x y", "principal": "p", "session_id": "short"}',
    '{"v": 99, "id": "ab", "reply_to": "x", "principal": "anonymous", '
    '"session_id": "session_1_versions"}',
    '{"v": true, "id": "ab", "ok": true}',
    '{"v": 1, "id": "ab", "ok": "yes"}',
    "[" * 100_000,
    '{"v": 1, "pad": "' + "x" * 1_000_000 + '"}',
]


async def test_malformed_messages_are_ignored_and_cancels_still_cross_instances(
    anyio_backend: Any,
) -> None:
    """Every message from Redis is untrusted: before, one `{"hello":1}` left an asyncio
    instance answering 503 to everything, and took a Trio instance down."""
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        a, b = await c.gateway(), await c.gateway()
        redis = coredis.Redis.from_url(c.redis.url, decode_responses=True)
        async with redis:
            for gateway in (a, b):
                health = (await client.get(f"{gateway.url}/healthz")).json()
                instance = health["instance"]
                # Nothing about the host in what anonymous callers see.
                assert socket.gethostname() not in instance
                assert str(gateway.process.pid) not in instance
                for channel in (f"gw:cancel:{instance}", f"gw:reply:{instance}"):
                    for message in _MALFORMED:
                        assert await redis.publish(channel, message) == 1
        sid = "session_1_aftermath"
        async with _stream(client, a.url, sid) as lines:
            record = c.provider.records[-1]
            response = await client.post(f"{b.url}/api/chat/cancel/{sid}")
            answered = time.monotonic()
            assert response.status_code == 200
            await _closed_by(c.provider, record, answered)
            assert '"reason":"cancel"' in await _rest(lines)
        for gateway in (a, b):
            assert (await client.get(f"{gateway.url}/healthz")).json()["status"] == "ok"
            assert gateway.process.poll() is None
            # Rate-limited: one warning for the whole burst.
            warnings = [line for line in gateway.lines if "malformed message" in line]
            assert len(warnings) == 1, warnings
            assert "WARNING" in warnings[0]


async def test_a_cancel_while_a_claim_is_lost_is_answered_at_once(anyio_backend: Any) -> None:
    """The claim is the one await between registering a session and streaming it.
    Before, a 409 there never marked the session ended: a cancel that arrived meanwhile
    waited GATEWAY_CANCEL_WAIT and answered 504."""
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        a = await c.gateway()
        # b waits for Redis's answer to its claim for as long as the test pauses Redis.
        b = await c.gateway(
            GATEWAY_CLAIM_TTL="8", GATEWAY_CANCEL_WAIT="8", GATEWAY_REDIS_TIMEOUT="8"
        )
        sid = "session_1_claimrace"
        async with _stream(client, a.url, sid):
            provider_streams = len(c.provider.records)
            assert c.redis.process is not None
            c.redis.process.send_signal(signal.SIGSTOP)  # b's claim waits on Redis
            try:
                async with anyio.create_task_group() as tg:
                    results: dict[str, httpx.Response] = {}

                    async def post(name: str, path: str, **kwargs: Any) -> None:
                        results[name] = await client.post(f"{b.url}{path}", **kwargs)

                    tg.start_soon(
                        functools.partial(
                            post,
                            "stream",
                            "/api/chat/stream",
                            headers={"X-Session-Id": sid},
                            json=BODY,
                        )
                    )
                    with anyio.fail_after(WAIT):
                        # Another process's state, seen only through its answers.
                        while (await client.get(f"{b.url}/healthz")).json()["sessions"] != 1:  # noqa: ASYNC110
                            await anyio.sleep(0.01)
                    tg.start_soon(post, "cancel", f"/api/chat/cancel/{sid}")
                    await anyio.to_thread.run_sync(
                        b.wait_for, rf"Cancel request received for {sid}"
                    )
                    c.redis.process.send_signal(signal.SIGCONT)
                    started = time.monotonic()
            finally:
                c.redis.process.send_signal(signal.SIGCONT)
            assert time.monotonic() - started < 4
            assert results["stream"].status_code == 409
            assert results["cancel"].status_code == 200
            assert (await client.get(f"{b.url}/healthz")).json()["sessions"] == 0
            # b never opened a provider stream for the refused request.
            assert len(c.provider.records) == provider_streams


def _claim_key(sid: str, principal: str = "anonymous") -> str:
    return f"gw:claim:{principal.encode().hex()}:{sid}"


@ASYNCIO_AND_TRIO
async def test_a_redis_that_hangs_past_the_claim_ttl_breaks_no_promise(
    anyio_backend: Any,
) -> None:
    """Redis paused (SIGSTOP: a blocked or partitioned Redis whose connections stay up)
    for longer than the claim TTL, with a stream live on a. Before: new streams waited
    10 s for their claim, a cross-instance cancel hung for the whole pause and then
    answered a false 404, the live stream's claim was lost for good (so the same id could
    start on b), and /healthz said unavailable for a minute after Redis was back."""
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        a = await c.gateway(GATEWAY_CLAIM_TTL="1")
        b = await c.gateway(GATEWAY_CLAIM_TTL="1", GATEWAY_CANCEL_WAIT="3")
        instance_a = (await client.get(f"{a.url}/healthz")).json()["instance"]
        live, started = "session_hang_live", "session_hang_new"
        assert c.redis.process is not None
        async with _stream(client, a.url, live) as live_lines:
            c.redis.process.send_signal(signal.SIGSTOP)
            try:
                # A new stream starts at once: its claim waits for Redis 0.5 s at most,
                # and later ones not at all.
                began = time.monotonic()
                async with _stream(client, a.url, started):
                    first_bytes = time.monotonic() - began
                    assert first_bytes < 1.0
                    health = (await client.get(f"{a.url}/healthz")).json()
                    assert health["cluster"] == "unavailable"
                    gauge = (await client.get(f"{a.url}/metrics")).text
                    assert "gateway_cluster_available 0.0" in gauge
                    began = time.monotonic()
                    async with _stream(client, a.url, "session_hang_third"):
                        assert time.monotonic() - began < 0.5
                    # A cancel through b cannot know: 503 within GATEWAY_CANCEL_WAIT, never
                    # a false 404; the stream goes on.
                    began = time.monotonic()
                    refused = await client.post(f"{b.url}/api/chat/cancel/{live}")
                    assert refused.status_code == 503
                    refused_in = time.monotonic() - began
                    assert refused_in < 3.0
                    # Paused past the claim TTL: the claims expire as Redis wakes.
                    await anyio.sleep(1.5)
                    c.redis.process.send_signal(signal.SIGCONT)
                    woke = time.monotonic()
                    await anyio.to_thread.run_sync(
                        a.wait_for, r"\[cluster\] Redis answers again; \d+ claims"
                    )
                    assert (await client.get(f"{a.url}/healthz")).json()["cluster"] == "ok"
                    gauge = (await client.get(f"{a.url}/metrics")).text
                    assert "gateway_cluster_available 1.0" in gauge
                    back_in = time.monotonic() - woke
                    assert back_in < 2.0
                    print(
                        f"Redis paused: first bytes {first_bytes:.3f} s, cancel elsewhere 503 "
                        f"in {refused_in:.2f} s; health back {back_in:.2f} s after SIGCONT"
                    )
                    # Every live stream's claim is a's again, the ones made while Redis
                    # was away included.
                    redis = coredis.Redis.from_url(c.redis.url, decode_responses=True)
                    async with redis:
                        owners = [await redis.get(_claim_key(s)) for s in (live, started)]
                    assert owners == [instance_a, instance_a]
                    # So the same id cannot start on b, and a cancel through b reaches a.
                    twin = await client.post(
                        f"{b.url}/api/chat/stream", headers={"X-Session-Id": live}, json=BODY
                    )
                    assert twin.status_code == 409
                    for sid in (started, live):
                        cancelled = await client.post(f"{b.url}/api/chat/cancel/{sid}")
                        assert cancelled.status_code == 200, sid
            finally:
                c.redis.process.send_signal(signal.SIGCONT)
            assert "event: stopped" in await _rest(live_lines)
        # Every provider stream of the test is closed.
        with anyio.fail_after(WAIT):
            await c.provider.wait_until(lambda: c.provider.live == 0)


@ASYNCIO_AND_TRIO
async def test_an_id_live_on_two_instances_is_ended_where_redis_does_not_name_it(
    anyio_backend: Any,
) -> None:
    """a's claim lost (as a pause past the TTL loses it, here for a alone) and the same id
    started on b: once a finds its claim b's, it ends its own stream, so that the one
    stream left is the one a cancel reaches. Before, a kept its stream, and a cancel
    answered 200 from b while a's went on."""
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        # Claims refreshed every second: a cannot take its key back between the
        # deletion and b's claim, a few milliseconds apart.
        a = await c.gateway(GATEWAY_CLAIM_TTL="3")
        b = await c.gateway(GATEWAY_CLAIM_TTL="3")
        sid = "session_live_twice"
        redis = coredis.Redis.from_url(c.redis.url, decode_responses=True)
        async with redis, _stream(client, a.url, sid) as on_a:
            first = c.provider.records[-1]
            await redis.delete([_claim_key(sid)])
            async with _stream(client, b.url, sid) as on_b:
                second = c.provider.records[-1]
                # a's next refresh finds the id b's: a's stream ends with an error.
                with anyio.fail_after(WAIT):
                    rest = await _rest(on_a)
                assert "event: error" in rest
                assert '"code":"session_conflict"' in rest
                # Its provider closed (seen by the provider when its next write fails).
                with anyio.fail_after(WAIT):
                    await c.provider.wait_until(lambda: first.outcome != "streaming")
                assert first.outcome == "closed_by_client"
                await anyio.to_thread.run_sync(
                    a.wait_for, rf"{sid} is live here and on instance .* this one is ended"
                )
                metrics = (await client.get(f"{a.url}/metrics")).text
                assert 'gateway_streams_ended_total{outcome="session_conflict"} 1.0' in metrics
                # A cancel through a reaches b's stream, the only one left.
                answer = await client.post(f"{a.url}/api/chat/cancel/{sid}")
                assert answer.status_code == 200
                assert second.outcome == "closed_by_client"
                assert "event: stopped" in await _rest(on_b)
        with anyio.fail_after(WAIT):
            await c.provider.wait_until(lambda: c.provider.live == 0)


@ASYNCIO_AND_TRIO
async def test_a_failover_under_sentinel_answers_no_false_404_and_recovers(
    anyio_backend: Any, tmp_path: Path
) -> None:
    """GATEWAY_REDIS_URL naming a Sentinel service: the primary killed while a stream
    is live, Sentinel promotes the replica, and a cancel through the other instance
    answers 503 meanwhile, never a false 404, then 200 once both are back."""
    primary = RedisServer()
    await anyio.to_thread.run_sync(primary.start)
    replica = RedisServer("--replicaof", "127.0.0.1", str(primary.port))
    sentinel = RedisSentinel(primary.port, tmp_path)
    try:
        await anyio.to_thread.run_sync(replica.start)
        await anyio.to_thread.run_sync(sentinel.start)
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{RedisSentinel.SERVICE}"
        async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
            a = await c.gateway(GATEWAY_REDIS_URL=url)
            b = await c.gateway(GATEWAY_REDIS_URL=url)
            async with _stream(client, a.url, "session_sentinel_1") as lines:
                assert (
                    await client.post(f"{b.url}/api/chat/cancel/session_sentinel_1")
                ).status_code == 200
                await _rest(lines)
            sid = "session_sentinel_2"
            async with _stream(client, a.url, sid) as lines:
                # The claim is on the replica too before the primary goes.
                copy = coredis.Redis(port=replica.port, decode_responses=True)
                async with copy:
                    with anyio.fail_after(WAIT):
                        # Replication, in other processes: nothing to await but Redis.
                        while await copy.get(_claim_key(sid)) is None:  # noqa: ASYNC110
                            await anyio.sleep(0.05)
                assert primary.process is not None
                primary.process.kill()
                killed = time.monotonic()
                answers: list[int] = []
                with anyio.fail_after(30):
                    while not answers or answers[-1] != 200:
                        answer = await client.post(f"{b.url}/api/chat/cancel/{sid}")
                        answers.append(answer.status_code)
                        if answer.status_code != 200:
                            await anyio.sleep(0.1)  # another process's failover: polled
                recovered = time.monotonic() - killed
                assert set(answers) <= {200, 503}, answers
                assert "event: stopped" in await _rest(lines)
            # docs/scaling.md quotes this figure.
            print(f"cancel through the other instance works again {recovered:.1f} s after the kill")
            assert recovered < 15
    finally:
        for server in (sentinel, replica, primary):
            await anyio.to_thread.run_sync(server.stop)


@ASYNCIO_AND_TRIO
async def test_a_rolling_upgrade_keeps_cancels_crossing_between_releases(
    anyio_backend: Any,
) -> None:
    """This release beside the next one as it introduces a format version 2 (reading
    1 and 2, writing 1): a cancel crosses both ways. Before, an instance read its own
    version only, and a cancel between two releases was a 503."""
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        old = await c.gateway()
        new = await c.gateway(module="tests.next_release_gateway")
        for owner, asker in ((old, new), (new, old)):
            sid = f"session_upgrade_{owner is old}"
            async with _stream(client, owner.url, sid) as lines:
                answer = await client.post(f"{asker.url}/api/chat/cancel/{sid}")
                assert answer.status_code == 200, answer.text
                assert "event: stopped" in await _rest(lines)
        for gateway in (old, new):
            assert not any("ignored" in line for line in gateway.lines), gateway.lines


async def test_a_failing_background_task_stops_the_instance_with_a_non_zero_exit(
    anyio_backend: Any,
) -> None:
    """A bug in a background task must not leave a zombie that answers 503: it is
    logged, every stream is stopped as at shutdown, and the process exits non-zero."""
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        faulty = await c.gateway(module="tests.faulty_gateway")
        c.gateways.remove(faulty)  # its traceback is expected
        try:
            sid = "session_1_bugged000"
            async with _stream(client, faulty.url, sid) as lines:
                record = c.provider.records[-1]
                instance = (await client.get(f"{faulty.url}/healthz")).json()["instance"]
                redis = coredis.Redis.from_url(c.redis.url, decode_responses=True)
                async with redis:
                    await redis.publish(f"gw:cancel:{instance}", "anything")
                rest = await _rest(lines)
            assert '"reason":"shutdown"' in rest
            with anyio.fail_after(WAIT):
                await c.provider.wait_until(lambda: record.outcome != "streaming")
            assert record.outcome == "closed_by_client"
            code = await anyio.to_thread.run_sync(lambda: faulty.process.wait(WAIT))
            assert code == 70
        finally:
            await anyio.to_thread.run_sync(faulty.stop)
        output = "\n".join(faulty.lines)
        assert "background task 'cluster' failed: this instance stops" in output
        assert "RuntimeError: planted bug in the message handler" in output
        assert f"[SSE] {sid} stopped reason=shutdown" in output


@pytest.mark.filterwarnings("ignore:Async generator 'openai._streaming.:ResourceWarning")
async def test_an_sdk_stream_on_one_instance_is_cancelled_through_another(
    anyio_backend: Any,
) -> None:
    """/v1/chat/completions claims its session id cluster-wide like the native endpoint."""
    async with _cluster(anyio_backend) as c, httpx.AsyncClient(timeout=WAIT) as client:
        a, b = await c.gateway(), await c.gateway()
        sid = "session_1_cluster_v1"
        sdk_a = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key="x", max_retries=0)
        sdk_b = openai.AsyncOpenAI(base_url=f"{b.url}/v1", api_key="x", max_retries=0)
        async with sdk_a, sdk_b:
            stream = await sdk_a.chat.completions.create(
                model="m",
                messages=MESSAGES,
                stream=True,
                extra_headers={"X-Session-Id": sid},
            )
            async with stream:
                chunks = [await stream.__anext__(), await stream.__anext__()]
                record = c.provider.records[-1]
                with pytest.raises(openai.ConflictError):
                    await sdk_b.chat.completions.create(
                        model="m", messages=MESSAGES, extra_headers={"X-Session-Id": sid}
                    )
                response = await client.post(f"{b.url}/api/chat/cancel/{sid}")
                answered = time.monotonic()
                assert response.status_code == 200
                await _closed_by(c.provider, record, answered)
                chunks += await read_chunks(stream)
        finish: str | None = chunks[-1].choices[0].finish_reason
        assert finish == "cancelled"
        assert (chunks[-1].model_extra or {})["gateway"]["reason"] == "cancel"
        a.wait_for(rf"\[SSE\] {sid} aborted by client/cancel reason=cancel")


async def _closed_by(provider: Simulator, record: StreamRecord, answered: float) -> None:
    """The provider's stream was closed by the gateway by the time the cancel's 200 was
    read. The close and the 200 reach this process on two sockets, and its one loop may
    see them in either order: the contract kit's same-instant allowance."""
    with anyio.fail_after(WAIT):
        await provider.wait_until(lambda: record.ended_at is not None)
    assert record.outcome == "closed_by_client"
    assert record.ended_at is not None
    assert record.ended_at <= answered + SAME_INSTANT

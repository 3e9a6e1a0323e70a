"""The link to Redis that instances share (docs/scaling.md): its connection, its
subscriptions, and every command bounded in time. Claims (claims.py), forwarded
cancels (cancels.py) and the resume messages (gateway/resume/messages.py) are made of
it.

Each process is an instance with its own id; its link listens on channels of its own
(``subscribe``), and what arrives there is handed to the part that subscribed.

Redis being down never stops streams or local cancels: claims are skipped (with one
log line per outage), and a cancel that needs another instance is answered 503
``cancel_unavailable``, never a false 404. The connection is retried with backoff and
the subscription renewed.

A Redis that hangs (paused, blocked, partitioned without a reset) is not a Redis that
refuses: its connections stay up and its answers never come. So every command waits
for its answer at most ``GATEWAY_REDIS_TIMEOUT`` (``_call``): past it, the answer is
abandoned, never the command cancelled half-way (coredis does not give back the
connection of a command cancelled mid-way), and the link is marked unavailable, as if
Redis were down. The next command that is answered marks it available again; while it
is unavailable, a probe asks twice a second. When it is back, every live stream's claim
is set again (SET if gone, not only PEXPIRE), and an id that another instance claimed
meanwhile is reported, not taken over (claims.py).

Every message from Redis is untrusted input (anyone who can publish, an instance of
another release): one that is not a valid message of a version this instance knows
is ignored, with a rate-limited warning, and the instance goes on serving. The
compatibility rule for the format is in docs/scaling.md.

coredis runs on anyio, so the same code serves the asyncio and the Trio worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import coredis
from anyio.abc import TaskGroup
from coredis.patterns.pubsub import PubSub
from coredis.response.types import PubSubMessage

from ..settings import sentinel_service
from .messages import Malformed, parse

__all__ = ["RedisLink", "RedisTimeout", "is_redis_failure"]

logger = logging.getLogger(__name__)

_BACKOFF_MAX = 2.0
# While the link is unavailable, how often a probe asks Redis whether it answers.
_PROBE_INTERVAL = 0.5
# At most one warning about ignored messages this often, with the count since.
_WARN_INTERVAL = 10.0

# What a subscription does with a message (its JSON object, of a known version); it
# raises ``Malformed`` for one it does not accept.
Handler = Callable[[dict[str, object]], Awaitable[None]]


def is_redis_failure(exc: BaseException) -> bool:
    """Redis unreachable or failing: coredis raises its errors and OSError, at times
    inside an exception group (from its connection's task group); and a client whose
    connection was just lost (``run`` leaves its context) raises a RuntimeError about
    its pool, until ``run`` has replaced it."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_redis_failure(e) for e in exc.exceptions)
    if isinstance(exc, RuntimeError):
        return str(exc).startswith(_POOL_GONE)
    return isinstance(exc, (coredis.exceptions.RedisError, OSError))


_POOL_GONE = "Connection pool is not initialized or has exited"


def new_instance_id() -> str:
    """Random: it is shown on /healthz, so it says nothing about the host. The join
    log line ties it to the host name and PID for the operator."""
    return secrets.token_hex(8)


class RedisTimeout(OSError):
    """Redis did not answer within ``GATEWAY_REDIS_TIMEOUT``: as good as down for the
    caller, though the command may still be applied later."""


_T = TypeVar("_T")


class RedisLink:
    """One instance's link: connected, subscribed and bounded. ``available`` says
    whether Redis answers now."""

    def __init__(self, url: str, *, claim_ttl: float, redis_timeout: float = 0.5) -> None:
        self.instance_id = new_instance_id()
        self._url = url
        self.claim_ttl = claim_ttl
        self._timeout = redis_timeout
        # A command timed out: the link is up but Redis does not answer.
        self._hung = False
        # Commands sent and not answered yet.
        self._outstanding = 0
        # Until then, no claim in Redis does not mean no live stream (``_unsure``).
        self._unsure_until = -math.inf
        self._client: coredis.Redis[str] | None = None
        self.available = False
        self._outage_logged = False
        self._stop = anyio.Event()
        self._ignored = 0
        self._warned_at: float | None = None
        self._tg: TaskGroup | None = None
        # The channels this instance listens on, and what each message there does.
        self._handlers: dict[str, Handler] = {}

    def stop(self) -> None:
        """End ``run()`` by leaving the subscription normally. (Cancelling coredis's
        pubsub makes its cleanup write to a closed stream on uvloop.)"""
        self._stop.set()

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Listen on ``channel`` from the next connection on (call before ``run``)."""
        self._handlers[channel] = handler

    async def _connected(self, client: coredis.Redis[str], tg: TaskGroup) -> None:
        """Connected and subscribed, before the link is marked available."""

    async def _answers_again(self, client: coredis.Redis[str]) -> None:
        """Redis answers again after a hang."""

    async def _run_link(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Keep the connection and the subscriptions alive until ``stop``."""
        task_status.started()
        delay = 0.05
        while not self._stop.is_set():
            try:
                async with contextlib.AsyncExitStack() as stack:
                    client = await self._connect(stack)
                    await client.ping()
                    # No retry policy: a lost connection comes back to this loop, which
                    # logs the outage once and renews the subscription.
                    async with client.pubsub(
                        channels=list(self._handlers),
                        ignore_subscribe_messages=True,
                        retry_policy=None,
                    ) as pubsub:
                        try:
                            async with anyio.create_task_group() as tg:
                                self._client = client
                                self._tg = tg
                                await self._connected(client, tg)
                                self._up()
                                delay = 0.05
                                tg.start_soon(self._probe, client)
                                tg.start_soon(self._consume, pubsub, tg)
                                await self._stop.wait()
                                tg.cancel_scope.cancel()
                        finally:
                            # At once, not after the subscription's close (which awaits):
                            # meanwhile a caller would start a task in a closed group.
                            self._client = None
                            self._tg = None
            except (coredis.exceptions.RedisError, OSError) as exc:
                self._down(exc)
            except BaseExceptionGroup as group:
                if not group.subgroup((coredis.exceptions.RedisError, OSError)):
                    raise
                self._down(group.exceptions[0])
            finally:
                self._client = None
                self._tg = None
                self.available = False
            with anyio.move_on_after(delay):
                await self._stop.wait()
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _connect(self, stack: contextlib.AsyncExitStack) -> coredis.Redis[str]:
        """A client of the Redis at ``GATEWAY_REDIS_URL``, or of the primary that its
        Sentinels name now (a failover then breaks the connection, and the next one
        finds the promoted replica)."""
        if not self._url.startswith("redis+sentinel://"):
            client = coredis.Redis.from_url(self._url, decode_responses=True)
            return await stack.enter_async_context(client)
        hosts, service = sentinel_service(self._url)
        sentinel = await stack.enter_async_context(coredis.Sentinel(hosts, decode_responses=True))
        return await stack.enter_async_context(sentinel.primary_for(service))

    async def _consume(self, pubsub: PubSub[str], tg: TaskGroup) -> None:
        async for message in pubsub:
            tg.start_soon(self._on_message, message)

    def _up(self) -> None:
        self.available = True
        self._hung = False
        if self._outage_logged:
            # Back after an outage (not at the first connection): claims may be lost.
            self._unsure()
            logger.info(
                "[cluster] Redis reachable again; instance %s resubscribed", self.instance_id
            )
        else:
            logger.info(
                "[cluster] instance %s joined through Redis (host %s, pid %d)",
                self.instance_id,
                socket.gethostname(),
                os.getpid(),
            )
        self._outage_logged = False

    def _down(self, exc: BaseException) -> None:
        self.available = False
        if not self._outage_logged:
            # One line per outage: streams and local cancels go on meanwhile.
            logger.warning(
                "[cluster] Redis unreachable (%s); retrying with backoff, "
                "cross-instance cancels answer 503 until it is back",
                type(exc).__name__,
            )
            self._outage_logged = True

    async def _on_message(self, message: PubSubMessage) -> None:
        try:
            if not isinstance(message, dict):
                raise Malformed("not a message")
            handler = self._handlers.get(str(message.get("channel")))
            if handler is None:
                raise Malformed("on a channel this instance does not listen on")
            await handler(parse(message.get("data")))
        except Malformed as exc:
            self._ignore(str(exc))

    def _ignore(self, why: str) -> None:
        """Count an ignored message; warn at most once per interval, with the count."""
        self._ignored += 1
        now = anyio.current_time()
        if self._warned_at is not None and now - self._warned_at < _WARN_INTERVAL:
            return
        logger.warning(
            "[cluster] ignored %d malformed message(s) from Redis (last: %s); "
            "is an instance of another release, or something else, publishing on gw:*?",
            self._ignored,
            why,
        )
        self._ignored = 0
        self._warned_at = now

    @property
    def client(self) -> coredis.Redis[str] | None:
        """The Redis client while Redis is reachable."""
        return self._client

    def down(self, exc: BaseException) -> None:
        self._down(exc)

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, object]], *args: object) -> None:
        """Run ``fn(*args)`` in the background while connected (else it is dropped:
        Redis is away, and what it would say cannot be said)."""
        if self._tg is not None:
            self._tg.start_soon(fn, *args)

    async def forget(self, key: str) -> None:
        """Delete ``key`` if Redis is there (else it expires by itself)."""
        client = self._client
        if client is None or not self.available:
            return
        try:
            with anyio.CancelScope(shield=True):
                await self._call(lambda: client.delete([key]))
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self._down(exc)

    async def publish(self, channel: str, message: str) -> int:
        """Publish ``message`` on ``channel`` (bounded, as every command): the number
        of instances that heard it."""
        client = self._client
        if client is None:
            raise RedisTimeout("Redis is not connected")
        receivers: int = await self._call(lambda: client.publish(channel, message))
        return receivers

    async def _probe(self, client: coredis.Redis[str]) -> None:
        """While the link is marked unavailable (a command timed out), ask Redis
        twice a second; its first answer marks it available and sets the claims again."""
        while True:
            await anyio.sleep(_PROBE_INTERVAL)
            if self.available or self._outstanding:
                # A command still waiting for Redis marks the link available when its
                # answer comes: one more would only take one more connection.
                continue
            with contextlib.suppress(RedisTimeout):
                await self._call(client.ping)

    async def call(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """One Redis command, bounded as every command of the cluster is (``_call``):
        for the resume mirror and readers (resume/shared.py)."""
        return await self._call(command)

    async def _call(self, command: Callable[[], Awaitable[_T]]) -> _T:
        """Run one Redis command and wait for its answer at most
        ``GATEWAY_REDIS_TIMEOUT``. The command runs in the connection's task group, so
        it is never cancelled half-way by its caller or by the deadline (coredis would
        not give its connection back); past the deadline its answer is abandoned, the
        link marked unavailable, and ``RedisTimeout`` raised. An answer marks the link
        available again."""
        tg = self._tg
        if tg is None:
            raise RedisTimeout("Redis is not connected")
        done = anyio.Event()
        outcome: list[tuple[bool, Any]] = []

        async def run() -> None:
            self._outstanding += 1
            try:
                value = await command()
            except Exception as exc:
                outcome.append((False, exc))
            else:
                outcome.append((True, value))
                # Even an answer that came too late for its caller says Redis is back.
                self._answered()
            finally:
                self._outstanding -= 1
                done.set()

        tg.start_soon(run)
        with anyio.move_on_after(self._timeout):
            await done.wait()
        if not outcome:
            self._timed_out()
            raise RedisTimeout(f"Redis did not answer within {self._timeout} s")
        answered, value = outcome[0]
        if not answered:
            raise value
        result: _T = value
        return result

    def _timed_out(self) -> None:
        if self.available:
            self.available = False
            self._hung = True
            logger.warning(
                "[cluster] Redis did not answer within %s s; until it does, new streams "
                "start unclaimed and cross-instance cancels answer 503",
                self._timeout,
            )

    def _answered(self) -> None:
        client, tg = self._client, self._tg
        if self._hung and client is not None and tg is not None:
            self._hung = False
            self.available = True
            self._unsure()
            tg.start_soon(self._answers_again, client)

    def _unsure(self) -> None:
        """Until every instance has had the time to claim its streams again, Redis's
        "nobody holds this id" is not sure: the claims may have been lost with the
        outage (a restart, a failover to a replica that had not got them, a pause past
        their TTL), and each instance sets its own again when it is back."""
        self._unsure_until = anyio.current_time() + self.claim_ttl + _BACKOFF_MAX

"""Cancel across processes and machines, through Redis (docs/scaling.md).

Each process is an instance with its own id. A stream claims ``(principal, session
id)`` cluster-wide with ``SET NX PX`` (refreshed while it lives), so a duplicate live
id is a 409 on any instance. A cancel that arrives where the stream does not live is
published to its owner's channel; the owner runs the same local cancel path and
answers on the asker's channel once its provider connection is closed.

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
meanwhile is reported, not taken over.

Every message from Redis is untrusted input (anyone who can publish, an instance of
another release): one that is not a valid message of a version this instance knows
is ignored, with a rate-limited warning, and the instance goes on serving. The
compatibility rule for the format is in docs/scaling.md.

coredis runs on anyio, so the same code serves the asyncio and the Trio worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import coredis
from anyio.abc import TaskGroup
from coredis.patterns.pubsub import PubSub
from coredis.response.types import PubSubMessage

from ..core.registry import SESSION_ID_RE
from ..errors import CancelUnavailable, ResumeUnavailable
from ..logs import loggable
from ..settings import sentinel_service

__all__ = ["Cluster", "is_redis_failure"]

logger = logging.getLogger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Each of this instance's claims: kept alive if it is still ours, set again if it is
# gone (Redis restarted, or paused past the TTL); the keys another instance holds now
# are returned, with their owners.
_CLAIM_ALL = """
local taken = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('get', key)
  if owner == ARGV[1] then
    redis.call('pexpire', key, ARGV[2])
  elseif not owner then
    redis.call('set', key, ARGV[1], 'PX', ARGV[2])
  else
    table.insert(taken, key); table.insert(taken, owner)
  end
end
return taken
"""
_BACKOFF_MAX = 2.0
# While the link is unavailable, how often a probe asks Redis whether it answers.
_PROBE_INTERVAL = 0.5

# The message format's version: see docs/scaling.md for the rule that changes it. A
# release reads its own version and the one before, and writes ``SEND_VERSION``: the
# older one while a newer is being introduced (until every instance reads it, a release
# later), so a rolling upgrade between two adjacent releases loses no message. A reply
# is written in the version of the request it answers.
PROTOCOL_VERSION = 1
SEND_VERSION = PROTOCOL_VERSION


def accepted_versions() -> frozenset[int]:
    return frozenset({PROTOCOL_VERSION - 1, PROTOCOL_VERSION}) - {0}


# A valid message is a few hundred bytes; a larger one is not parsed at all.
_MAX_MESSAGE_CHARS = 8192
_MAX_PRINCIPAL_CHARS = 1024
_REQUEST_ID = re.compile(r"[0-9a-f]{1,64}")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# At most one warning about ignored messages this often, with the count since.
_WARN_INTERVAL = 10.0

_UNAVAILABLE = "the stream may live on another instance, and Redis cannot be reached to ask it"
_RESUME_UNAVAILABLE = (
    "the stream may live on another instance, and Redis cannot be reached to resume it"
)
_FOLLOWER_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}/[0-9a-f]{16}")

# What a local cancel answers: True stopped, False not found here.
LocalCancel = Callable[[str, str], Awaitable[bool]]


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


class _Malformed(Exception):
    """A message from Redis that this instance does not accept."""


class RedisTimeout(OSError):
    """Redis did not answer within ``GATEWAY_REDIS_TIMEOUT``: as good as down for the
    caller, though the command may still be applied later."""


_T = TypeVar("_T")


def _text(data: dict[str, object], name: str, pattern: re.Pattern[str] | None, limit: int) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _Malformed(f"{name} is missing or not a short string")
    if pattern is not None and not pattern.fullmatch(value):
        raise _Malformed(f"{name} is not well formed")
    return value


def _parse(raw: object) -> dict[str, object]:
    """A message's JSON object, of a version this instance knows."""
    if not isinstance(raw, str) or len(raw) > _MAX_MESSAGE_CHARS:
        raise _Malformed("not text, or too large")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Malformed("not JSON") from None
    if not isinstance(data, dict):
        raise _Malformed("not a JSON object")
    version = data.get("v")
    if isinstance(version, bool) or version not in accepted_versions():
        raise _Malformed(f"unknown version {loggable(version, 16)}")
    return data


class Cluster:
    def __init__(
        self, url: str, *, claim_ttl: float, cancel_wait: float, redis_timeout: float = 0.5
    ) -> None:
        self.instance_id = new_instance_id()
        self._url = url
        self._ttl_ms = max(1, round(claim_ttl * 1000))
        self._claim_ttl = claim_ttl
        self._cancel_wait = cancel_wait
        self._timeout = redis_timeout
        # Claims found held by another instance, each reported once.
        self._reported: set[str] = set()
        # A command timed out: the link is up but Redis does not answer.
        self._hung = False
        # Commands sent and not answered yet.
        self._outstanding = 0
        # Until then, no claim in Redis does not mean no live stream (``_unsure``).
        self._unsure_until = -math.inf
        self._client: coredis.Redis[str] | None = None
        self._claims: set[str] = set()
        # Streams that started while Redis was down: claimed once it is back.
        self._unclaimed: set[str] = set()
        self._waiting: dict[str, tuple[anyio.Event, list[bool]]] = {}
        self._local_cancel: LocalCancel | None = None
        self.available = False
        self._outage_logged = False
        self._stop = anyio.Event()
        self._ignored = 0
        self._warned_at: float | None = None
        self._tg: TaskGroup | None = None
        # Called with (type, principal, session id, follower id) for the messages
        # about resumed streams (set by the lifespan).
        self.on_follow: Callable[[str, str, str, str], None] | None = None
        # Called with (principal, session id) for a stream live here whose claim
        # another instance holds (set by the lifespan: it ends the stream here).
        self.on_taken: Callable[[str, str], None] | None = None
        self.claim_ttl = claim_ttl

    def stop(self) -> None:
        """End ``run()`` by leaving the subscription normally. (Cancelling coredis's
        pubsub makes its cleanup write to a closed stream on uvloop.)"""
        self._stop.set()

    # -- lifecycle ---------------------------------------------------------------

    async def run(
        self,
        local_cancel: LocalCancel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep the connection and the subscription alive until cancelled."""
        self._local_cancel = local_cancel
        task_status.started()
        delay = 0.05
        while not self._stop.is_set():
            try:
                async with contextlib.AsyncExitStack() as stack:
                    client = await self._connect(stack)
                    await client.ping()
                    channels = [self._cancel_channel(self.instance_id), self._reply_channel()]
                    if self.on_follow is not None:
                        # Resume is on (docs/resume.md).
                        channels.append(self._follow_channel())
                    # No retry policy: a lost connection comes back to this loop, which
                    # logs the outage once and renews the subscription.
                    async with (
                        client.pubsub(
                            channels=channels, ignore_subscribe_messages=True, retry_policy=None
                        ) as pubsub,
                        anyio.create_task_group() as tg,
                    ):
                        self._client = client
                        self._tg = tg
                        await self._claim_all(client)
                        self._up()
                        delay = 0.05
                        tg.start_soon(self._refresh_claims, client)
                        tg.start_soon(self._probe, client)
                        tg.start_soon(self._consume, pubsub, client, tg)
                        await self._stop.wait()
                        tg.cancel_scope.cancel()
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

    async def _consume(
        self, pubsub: PubSub[str], client: coredis.Redis[str], tg: TaskGroup
    ) -> None:
        async for message in pubsub:
            tg.start_soon(self._on_message, client, message)

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

    # -- claims ------------------------------------------------------------------

    async def claim(self, principal: str, session_id: str) -> bool:
        """Claim the id cluster-wide; ``False`` if another live stream holds it.
        With Redis down, hung or not answering in time, the claim is skipped (``True``)
        and made once Redis answers again."""
        key = _claim_key(principal, session_id)
        client = self._client
        if client is None or not self.available:
            self._unclaimed.add(key)
            return True
        try:
            won = await self._call(
                lambda: client.set(
                    key, self.instance_id, condition=coredis.PureToken.NX, px=self._ttl_ms
                )
            )
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._down(exc)
            self._unclaimed.add(key)
            return True
        if won:
            self._claims.add(key)
        return bool(won)

    async def release(self, principal: str, session_id: str) -> None:
        key = _claim_key(principal, session_id)
        self._unclaimed.discard(key)
        if key not in self._claims:
            return
        self._claims.discard(key)
        client = self._client
        if client is None or not self.available:
            return  # it expires within the TTL
        try:
            with anyio.CancelScope(shield=True):
                await self._call(lambda: client.eval(_RELEASE, keys=[key], args=[self.instance_id]))
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._down(exc)

    async def _claim_all(self, client: coredis.Redis[str]) -> None:
        """Keep this instance's claims, and claim again those Redis lost (a restart
        forgets every key; a pause past the TTL expires them), so its streams can be
        cancelled from anywhere. An id another instance claimed meanwhile (a stream
        started there while Redis was away) is reported, and left to that instance."""
        keys = self._claims | self._unclaimed
        if not keys:
            return
        taken = await self._call(
            lambda: client.eval(_CLAIM_ALL, keys=list(keys), args=[self.instance_id, self._ttl_ms])
        )
        self._unclaimed -= keys
        self._claims |= keys
        pairs = list(taken) if isinstance(taken, list) else []
        for key, owner in zip(pairs[::2], pairs[1::2], strict=False):
            self._claims.discard(str(key))
            if key not in self._reported:
                self._reported.add(str(key))
                logger.warning(
                    "[cluster] %s is live here and on instance %s, which claimed it while "
                    "Redis was away; a cancel reaches that one, so this one is ended",
                    loggable(str(key)),
                    loggable(str(owner)),
                )
            about = _parse_claim_key(str(key))
            if about is not None and self.on_taken is not None:
                self.on_taken(*about)

    async def _refresh_claims(self, client: coredis.Redis[str]) -> None:
        while True:
            await anyio.sleep(self._claim_ttl / 3)
            if self.available:
                # A timeout marks the link unavailable; the probe takes over.
                with contextlib.suppress(RedisTimeout):
                    await self._claim_all(client)

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
        for the resume mirror and readers (shared_log.py)."""
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
            tg.start_soon(self._after_hang, client)

    def _unsure(self) -> None:
        """Until every instance has had the time to claim its streams again, Redis's
        "nobody holds this id" is not sure: the claims may have been lost with the
        outage (a restart, a failover to a replica that had not got them, a pause past
        their TTL), and each instance sets its own again when it is back."""
        self._unsure_until = anyio.current_time() + self._claim_ttl + _BACKOFF_MAX

    async def _after_hang(self, client: coredis.Redis[str]) -> None:
        """Redis answers again: claim again what a pause past the TTL let expire."""
        with contextlib.suppress(RedisTimeout):
            await self._claim_all(client)
            logger.info(
                "[cluster] Redis answers again; %d claims of this instance set again",
                len(self._claims),
            )

    # -- cancel across instances -------------------------------------------------

    async def forward_cancel(self, principal: str, session_id: str) -> bool:
        """Ask the owner to cancel; ``True`` once its provider connection is closed,
        ``False`` if no live instance owns the session."""
        client = self._client
        if client is None or not self.available:
            raise CancelUnavailable(_UNAVAILABLE)
        request_id = secrets.token_hex(8)
        done = anyio.Event()
        result: list[bool] = []
        self._waiting[request_id] = (done, result)
        deadline = anyio.current_time() + self._cancel_wait
        try:
            # A 404 only on Redis's word that no instance holds the id; a Redis that
            # does not answer is a 503.
            owner = await self._call(lambda: client.get(_claim_key(principal, session_id)))
            if owner is None and anyio.current_time() < self._unsure_until:
                # Redis is back from an outage, a failover or a pause, which may have
                # lost the claims: an instance may not have set its own again yet.
                raise CancelUnavailable(_UNAVAILABLE)
            if owner is None or owner == self.instance_id:
                return False
            request = {
                "v": SEND_VERSION,
                "id": request_id,
                "reply_to": self.instance_id,
                "principal": principal,
                "session_id": session_id,
            }
            message = json.dumps(request)
            receivers = await self._call(
                lambda: client.publish(self._cancel_channel(owner), message)
            )
            if receivers == 0:
                return False  # the owner is gone; its claim expires within the TTL
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                await done.wait()
            if not result:
                raise CancelUnavailable(_UNAVAILABLE)
            return result[0]
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._down(exc)
            raise CancelUnavailable(_UNAVAILABLE) from exc
        finally:
            del self._waiting[request_id]

    async def _on_message(self, client: coredis.Redis[str], message: PubSubMessage) -> None:
        try:
            data = _parse(message.get("data") if isinstance(message, dict) else None)
            if message.get("channel") == self._follow_channel():
                self._on_follow_message(data)
                return
            if message.get("channel") == self._reply_channel():
                request_id = _text(data, "id", _REQUEST_ID, 64)
                ok = data.get("ok")
                if not isinstance(ok, bool):
                    raise _Malformed("ok is not a boolean")
                waiting = self._waiting.get(request_id)
                if waiting is not None and not waiting[0].is_set():
                    waiting[1].append(ok)
                    waiting[0].set()
                return
            request_id = _text(data, "id", _REQUEST_ID, 64)
            reply_to = _text(data, "reply_to", _INSTANCE_ID, 128)
            principal = _text(data, "principal", None, _MAX_PRINCIPAL_CHARS)
            session_id = _text(data, "session_id", SESSION_ID_RE, 128)
        except _Malformed as exc:
            self._ignore(str(exc))
            return
        assert self._local_cancel is not None
        ok = await self._local_cancel(principal, session_id)
        reply = json.dumps({"v": data["v"], "id": request_id, "ok": ok})
        try:
            await self._call(lambda: client.publish(self._reply_channel(reply_to), reply))
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._down(exc)

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

    # -- resume across instances (shared_log.py) ---------------------------------

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

    async def tell_owner(
        self, kind: str, principal: str, session_id: str, follower_id: str
    ) -> bool:
        """Tell the stream's owner that a client here follows it (``attach``, repeated
        as a heartbeat) or left (``detach``); False if no live instance owns it."""
        client = self._client
        if client is None or not self.available:
            raise ResumeUnavailable(_RESUME_UNAVAILABLE)
        message = json.dumps(
            {
                "v": SEND_VERSION,
                "type": kind,
                "principal": principal,
                "session_id": session_id,
                "follower": follower_id,
            }
        )
        try:
            owner = await self._call(lambda: client.get(_claim_key(principal, session_id)))
            if owner is None:
                return False
            channel = self._follow_channel(owner)
            receivers: int = await self._call(lambda: client.publish(channel, message))
            return receivers > 0
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self._down(exc)
            raise ResumeUnavailable(_RESUME_UNAVAILABLE) from exc

    async def tell_follower(self, principal: str, session_id: str, follower_id: str) -> None:
        """Tell the instance of a follower that a newer client took the stream over."""
        client = self._client
        instance = follower_id.partition("/")[0]
        if client is None:
            return
        message = {
            "v": SEND_VERSION,
            "type": "supersede",
            "principal": principal,
            "session_id": session_id,
            "follower": follower_id,
        }
        try:
            channel, text = self._follow_channel(instance), json.dumps(message)
            await self._call(lambda: client.publish(channel, text))
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self._down(exc)

    async def owner(self, principal: str, session_id: str) -> str | None:
        """The instance holding the stream's claim, if any (Redis must be reachable)."""
        client = self._client
        if client is None or not self.available:
            raise RedisTimeout("Redis is not reachable")
        return await self._call(lambda: client.get(_claim_key(principal, session_id)))

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

    def new_follower_id(self) -> str:
        return f"{self.instance_id}/{secrets.token_hex(8)}"

    def _on_follow_message(self, data: dict[str, object]) -> None:
        kind = data.get("type")
        if kind not in ("attach", "detach", "supersede"):
            raise _Malformed("unknown type")
        principal = _text(data, "principal", None, _MAX_PRINCIPAL_CHARS)
        session_id = _text(data, "session_id", SESSION_ID_RE, 128)
        follower_id = _text(data, "follower", _FOLLOWER_ID, 200)
        if self.on_follow is not None:
            self.on_follow(str(kind), principal, session_id, follower_id)

    def _follow_channel(self, instance_id: str | None = None) -> str:
        return f"gw:follow:{instance_id or self.instance_id}"

    def _cancel_channel(self, instance_id: str) -> str:
        return f"gw:cancel:{instance_id}"

    def _reply_channel(self, instance_id: str | None = None) -> str:
        return f"gw:reply:{instance_id or self.instance_id}"


def _claim_key(principal: str, session_id: str) -> str:
    # Session ids are A-Za-z0-9_.:-; a principal may hold anything, so it is hex.
    return f"gw:claim:{principal.encode().hex()}:{session_id}"


def _parse_claim_key(key: str) -> tuple[str, str] | None:
    """(principal, session id) of one of this instance's own claim keys."""
    if not key.startswith("gw:claim:"):
        return None
    principal, _, session_id = key.removeprefix("gw:claim:").partition(":")
    try:
        return bytes.fromhex(principal).decode(), session_id
    except ValueError:
        return None

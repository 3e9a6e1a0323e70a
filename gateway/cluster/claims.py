"""Claims: one live stream per (principal, session id) in the cluster (docs/scaling.md).

A stream claims its id with ``SET NX PX``, refreshed while it lives, so a duplicate
live id is a 409 on any instance. With Redis down, hung or slow, a claim is skipped and
made once Redis answers again; then every live stream's claim is set again (SET if
gone, not only PEXPIRE), and an id that another instance claimed meanwhile is reported
(``on_taken``), not taken over.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import anyio
import coredis
from anyio.abc import TaskGroup

from ..logs import loggable
from .link import RedisLink, RedisTimeout

__all__ = ["Claims", "claim_key"]

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


class Claims(RedisLink):
    def __init__(self, url: str, *, claim_ttl: float, redis_timeout: float = 0.5) -> None:
        super().__init__(url, claim_ttl=claim_ttl, redis_timeout=redis_timeout)
        self._ttl_ms = max(1, round(claim_ttl * 1000))
        self._claims: set[str] = set()
        # Streams that started while Redis was down: claimed once it is back.
        self._unclaimed: set[str] = set()
        # Claims found held by another instance, each reported once.
        self._reported: set[str] = set()
        # Called with (principal, session id) for a stream live here whose claim
        # another instance holds (set by the lifespan: it ends the stream here).
        self.on_taken: Callable[[str, str], None] | None = None

    async def claim(self, principal: str, session_id: str) -> bool:
        """Claim the id cluster-wide; ``False`` if another live stream holds it.
        With Redis down, hung or not answering in time, the claim is skipped (``True``)
        and made once Redis answers again."""
        key = claim_key(principal, session_id)
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
        key = claim_key(principal, session_id)
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
            await anyio.sleep(self.claim_ttl / 3)
            if self.available:
                # A timeout marks the link unavailable; the probe takes over.
                with contextlib.suppress(RedisTimeout):
                    await self._claim_all(client)

    async def owner(self, principal: str, session_id: str) -> str | None:
        """The instance holding the stream's claim, if any (Redis must be reachable)."""
        client = self._client
        if client is None or not self.available:
            raise RedisTimeout("Redis is not reachable")
        return await self._call(lambda: client.get(claim_key(principal, session_id)))

    async def _connected(self, client: coredis.Redis[str], tg: TaskGroup) -> None:
        await super()._connected(client, tg)
        await self._claim_all(client)
        tg.start_soon(self._refresh_claims, client)

    async def _answers_again(self, client: coredis.Redis[str]) -> None:
        """Claim again what a pause past the TTL let expire."""
        await super()._answers_again(client)
        with contextlib.suppress(RedisTimeout):
            await self._claim_all(client)
            logger.info(
                "[cluster] Redis answers again; %d claims of this instance set again",
                len(self._claims),
            )


def claim_key(principal: str, session_id: str) -> str:
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

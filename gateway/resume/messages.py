"""The messages about resumed streams between instances (docs/resume.md): a client
here following a stream of another instance tells its owner it is there (``attach``,
repeated as a heartbeat) or gone (``detach``); an owner tells a follower's instance that
a newer client took the stream over (``supersede``)."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable

from ..cluster import messages
from ..cluster.instance import Cluster
from ..cluster.link import is_redis_failure
from ..cluster.messages import MAX_PRINCIPAL_CHARS, Malformed, field
from ..core.registry import SESSION_ID_RE
from ..errors import ResumeUnavailable

__all__ = ["FollowMessages"]

_FOLLOWER_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}/[0-9a-f]{16}")
_UNAVAILABLE = "the stream may live on another instance, and Redis cannot be reached to resume it"


class FollowMessages:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # Called with (type, principal, session id, follower id) for each message here
        # (set by the lifespan: follow.follow_messages).
        self.on_follow: Callable[[str, str, str, str], None] | None = None
        cluster.subscribe(_channel(cluster.instance_id), self._on_message)

    def new_follower_id(self) -> str:
        return f"{self.cluster.instance_id}/{secrets.token_hex(8)}"

    async def tell_owner(
        self, kind: str, principal: str, session_id: str, follower_id: str
    ) -> bool:
        """Tell the stream's owner that a client here follows it (``attach``, repeated
        as a heartbeat) or left (``detach``); False if no live instance owns it."""
        cluster = self.cluster
        if cluster.client is None or not cluster.available:
            raise ResumeUnavailable(_UNAVAILABLE)
        message = _message(kind, principal, session_id, follower_id)
        try:
            owner = await cluster.owner(principal, session_id)
            if owner is None:
                return False
            return await cluster.publish(_channel(owner), message) > 0
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            cluster.down(exc)
            raise ResumeUnavailable(_UNAVAILABLE) from exc

    def supersede(self, principal: str, session_id: str, follower_id: str) -> None:
        """Tell the instance of a follower, in the background, that a newer client took
        the stream over (dropped if Redis is away: the follower's heartbeat then finds
        it gone)."""
        self.cluster.spawn(self._supersede, principal, session_id, follower_id)

    async def _supersede(self, principal: str, session_id: str, follower_id: str) -> None:
        instance = follower_id.partition("/")[0]
        message = _message("supersede", principal, session_id, follower_id)
        try:
            await self.cluster.publish(_channel(instance), message)
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self.cluster.down(exc)

    async def _on_message(self, data: dict[str, object]) -> None:
        kind = data.get("type")
        if kind not in ("attach", "detach", "supersede"):
            raise Malformed("unknown type")
        principal = field(data, "principal", None, MAX_PRINCIPAL_CHARS)
        session_id = field(data, "session_id", SESSION_ID_RE, 128)
        follower_id = field(data, "follower", _FOLLOWER_ID, 200)
        if self.on_follow is not None:
            self.on_follow(str(kind), principal, session_id, follower_id)


def _message(kind: str, principal: str, session_id: str, follower_id: str) -> str:
    return json.dumps(
        {
            "v": messages.SEND_VERSION,
            "type": kind,
            "principal": principal,
            "session_id": session_id,
            "follower": follower_id,
        }
    )


def _channel(instance_id: str) -> str:
    return f"gw:follow:{instance_id}"

"""A cancel for a stream that lives on another instance (docs/scaling.md): published
to its owner's channel; the owner runs the same local cancel path and answers on the
asker's channel once its provider connection is closed. It answers 200 only once the
owner's provider is closed, 404 only when Redis positively says nobody owns the id,
and 503 otherwise, within ``GATEWAY_CANCEL_WAIT``.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Awaitable, Callable

import anyio
import coredis

from ..core.registry import SESSION_ID_RE
from ..errors import CancelUnavailable
from . import messages
from .claims import claim_key
from .link import RedisLink
from .messages import MAX_PRINCIPAL_CHARS, Malformed, field

__all__ = ["Cancels", "LocalCancel"]

_REQUEST_ID = re.compile(r"[0-9a-f]{1,64}")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_UNAVAILABLE = "the stream may live on another instance, and Redis cannot be reached to ask it"

# What a local cancel answers: True stopped, False not found here.
LocalCancel = Callable[[str, str], Awaitable[bool]]


class Cancels(RedisLink):
    def __init__(
        self, url: str, *, claim_ttl: float, cancel_wait: float, redis_timeout: float = 0.5
    ) -> None:
        super().__init__(url, claim_ttl=claim_ttl, redis_timeout=redis_timeout)
        self._cancel_wait = cancel_wait
        self._waiting: dict[str, tuple[anyio.Event, list[bool]]] = {}
        self._local_cancel: LocalCancel | None = None
        self.subscribe(_cancel_channel(self.instance_id), self._on_cancel)
        self.subscribe(_reply_channel(self.instance_id), self._on_reply)

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
            owner = await self._call(lambda: client.get(claim_key(principal, session_id)))
            if owner is None and anyio.current_time() < self._unsure_until:
                # Redis is back from an outage, a failover or a pause, which may have
                # lost the claims: an instance may not have set its own again yet.
                raise CancelUnavailable(_UNAVAILABLE)
            if owner is None or owner == self.instance_id:
                return False
            request = {
                "v": messages.SEND_VERSION,
                "id": request_id,
                "reply_to": self.instance_id,
                "principal": principal,
                "session_id": session_id,
            }
            message = json.dumps(request)
            receivers = await self.publish(_cancel_channel(owner), message)
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

    async def _on_reply(self, data: dict[str, object]) -> None:
        request_id = field(data, "id", _REQUEST_ID, 64)
        ok = data.get("ok")
        if not isinstance(ok, bool):
            raise Malformed("ok is not a boolean")
        waiting = self._waiting.get(request_id)
        if waiting is not None and not waiting[0].is_set():
            waiting[1].append(ok)
            waiting[0].set()

    async def _on_cancel(self, data: dict[str, object]) -> None:
        request_id = field(data, "id", _REQUEST_ID, 64)
        reply_to = field(data, "reply_to", _INSTANCE_ID, 128)
        principal = field(data, "principal", None, MAX_PRINCIPAL_CHARS)
        session_id = field(data, "session_id", SESSION_ID_RE, 128)
        assert self._local_cancel is not None
        ok = await self._local_cancel(principal, session_id)
        reply = json.dumps({"v": data["v"], "id": request_id, "ok": ok})
        try:
            await self.publish(_reply_channel(reply_to), reply)
        except (coredis.exceptions.RedisError, OSError) as exc:
            self._down(exc)


def _cancel_channel(instance_id: str) -> str:
    return f"gw:cancel:{instance_id}"


def _reply_channel(instance_id: str) -> str:
    return f"gw:reply:{instance_id}"

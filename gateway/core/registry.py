"""The registry of live sessions, keyed by (principal, the client's session id).

Two principals may use the same session id; one principal cannot see, cancel or
collide with another's. It also holds the live-stream limits, per principal and for
the process.
"""

from __future__ import annotations

import logging
import re

from ..errors import ServerBusy, SessionConflict, ShuttingDown, TooManySessions
from .session import Session

__all__ = ["ANONYMOUS", "SESSION_ID_CHARS", "SESSION_ID_PATTERN", "SESSION_ID_RE", "Registry"]

logger = logging.getLogger(__name__)

# What a client may name its session: safe in a log line, a header and a Redis key.
SESSION_ID_CHARS = (8, 128)
SESSION_ID_PATTERN = rf"^[A-Za-z0-9_.:-]{{{SESSION_ID_CHARS[0]},{SESSION_ID_CHARS[1]}}}$"
SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)

# The one principal when the gateway authenticates nobody (GATEWAY_API_KEYS and
# GATEWAY_PRINCIPAL_HEADER unset).
ANONYMOUS = "anonymous"

# Seconds a refused client is told to wait: streams end in seconds, not minutes.
_RETRY_AFTER = "1"


class Registry:
    def __init__(
        self, *, max_sessions: int | None = None, max_per_principal: int | None = None
    ) -> None:
        self._sessions: dict[tuple[str, str], Session] = {}
        self._per_principal: dict[str, int] = {}
        self._max_sessions = max_sessions
        self._max_per_principal = max_per_principal
        self.closing = False

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, model: str, principal: str = ANONYMOUS) -> Session:
        """Claim ``session_id`` for a new stream of ``principal``."""
        if self.closing:
            raise ShuttingDown("the gateway is shutting down")
        key = (principal, session_id)
        if key in self._sessions:
            raise SessionConflict(f"a live stream already has session id {session_id!r}")
        live = self._per_principal.get(principal, 0)
        if self._max_per_principal is not None and live >= self._max_per_principal:
            raise TooManySessions(
                f"at most {self._max_per_principal} live streams per client",
                headers={"retry-after": _RETRY_AFTER},
            )
        if self._max_sessions is not None and len(self._sessions) >= self._max_sessions:
            raise ServerBusy(
                "the gateway holds as many streams as it may", headers={"retry-after": _RETRY_AFTER}
            )
        session = Session(session_id, model, principal)
        self._sessions[key] = session
        self._per_principal[principal] = live + 1
        return session

    def get(self, session_id: str, principal: str = ANONYMOUS) -> Session | None:
        return self._sessions.get((principal, session_id))

    def remove(self, session: Session) -> None:
        key = (session.principal, session.id)
        if self._sessions.get(key) is session:
            del self._sessions[key]
            left = self._per_principal[session.principal] - 1
            if left:
                self._per_principal[session.principal] = left
            else:
                del self._per_principal[session.principal]

    async def stop(self, session_id: str, principal: str, wait: float) -> bool | None:
        """``Session.stop`` for this principal's stream of that id, if it has one here
        (``None`` if not): the cancel endpoint's and a forwarded cancel's path."""
        session = self.get(session_id, principal)
        return None if session is None else await session.stop(wait)

    async def shutdown(self) -> None:
        """Refuse new streams, stop every live one with reason ``shutdown``, wait for them.

        Each session's cleanup is bounded; callers bound the whole with ``move_on_after``.
        """
        self.closing = True
        sessions = list(self._sessions.values())
        if sessions:
            logger.info("[SSE] shutdown: stopping %d live stream(s)", len(sessions))
        for session in sessions:
            session.cancel("shutdown")
        for session in sessions:
            await session.ended.wait()

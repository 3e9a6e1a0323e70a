"""The registry of live sessions, keyed by the client's session id."""

from __future__ import annotations

import logging

from .errors import SessionConflict, ShuttingDown
from .session import Session

__all__ = ["Registry"]

logger = logging.getLogger(__name__)


class Registry:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self.closing = False

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def open(self, session_id: str, model: str) -> Session:
        """Claim ``session_id`` for a new stream."""
        if self.closing:
            raise ShuttingDown("the gateway is shutting down")
        if session_id in self._sessions:
            raise SessionConflict(f"a live stream already has session id {session_id!r}")
        session = Session(session_id, model)
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def remove(self, session: Session) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

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

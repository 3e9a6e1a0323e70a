"""The client-facing event protocol, framed as Server-Sent Events by sse-starlette."""

from __future__ import annotations

from typing import Any

from sse_starlette.event import JSONServerSentEvent, ServerSentEvent

__all__ = ["PING", "encode_event"]

_SEP = "\n"

PING = ServerSentEvent(comment="ping", sep=_SEP).encode()


def encode_event(event: str, seq: int, data: dict[str, Any]) -> bytes:
    """``event: <event>``, ``id: <seq>``, one ``data:`` line of compact JSON."""
    return JSONServerSentEvent(data, event=event, id=str(seq), sep=_SEP).encode()

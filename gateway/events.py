"""The client-facing event protocol, framed as Server-Sent Events by sse-starlette."""

from __future__ import annotations

import json
from typing import Any

from sse_starlette.event import JSONServerSentEvent, ServerSentEvent

__all__ = ["PING", "encode_event", "encode_token"]

_SEP = "\n"

PING = ServerSentEvent(comment="ping", sep=_SEP).encode()


def encode_event(event: str, seq: int, data: dict[str, Any]) -> bytes:
    """``event: <event>``, ``id: <seq>``, one ``data:`` line of compact JSON."""
    return JSONServerSentEvent(data, event=event, id=str(seq), sep=_SEP).encode()


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_token(seq: int, delta: str) -> bytes:
    """The same bytes as ``encode_event("token", seq, {"delta": delta})``, for the hot path.

    JSON never contains a raw CR or LF, so the data always fits on one line.
    """
    return b'id: %d\nevent: token\ndata: {"delta":%s}\n\n' % (seq, _dumps(delta).encode())

"""The client-facing event protocol, framed as Server-Sent Events by sse-starlette."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import msgspec
from sse_starlette.event import ServerSentEvent

__all__ = [
    "PING",
    "SSE_MEDIA_TYPE",
    "SUPERSEDED",
    "encode_event",
    "encode_reasoning",
    "encode_token",
    "json_string",
    "json_text",
]

SSE_MEDIA_TYPE = b"text/event-stream; charset=utf-8"

_SEP = "\n"

PING = ServerSentEvent(comment="ping", sep=_SEP).encode()
# To a client a newer one replaced on a resumable stream: no id, as it is not one of
# the stream's events (docs/resume.md).
SUPERSEDED = b'event: stopped\ndata: {"status":"stopped","reason":"superseded"}\n\n'

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# Left raw by ``_dumps``, escaped by ``json_text``: line separators, and lone surrogates.
_UNSAFE = re.compile("[\u2028\u2029\ud800-\udfff]")


def json_text(data: object) -> str:
    """Compact JSON that fits on one ``data:`` line for every client, and encodes to UTF-8.

    JSON allows U+2028 and U+2029 raw, but Python's ``str.splitlines`` and httpx's
    ``iter_lines`` split lines there. A provider may send a lone surrogate (``"\\ud83d"``,
    half an emoji split across two chunks), which no UTF-8 encoder writes. Escaped,
    each is the same text once parsed: a client joining the halves gets the emoji.
    """
    text = _dumps(data)
    if not text.isascii():
        text = _UNSAFE.sub(_escape, text)
    return text


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


_encode = msgspec.json.encode


def json_string(text: str) -> bytes:
    """``json_text(text).encode()`` for a delta's text: the hot path. An ASCII string,
    most tokens, has nothing to escape beyond what msgspec escapes, identically, in C."""
    if text.isascii():
        return _encode(text)
    return json_text(text).encode()


def encode_event(event: str, seq: int, data: Mapping[str, object]) -> bytes:
    """``id: <seq>``, ``event: <event>``, one ``data:`` line of compact JSON."""
    return ServerSentEvent(json_text(data), event=event, id=str(seq), sep=_SEP).encode()


def encode_token(seq: int, delta: str) -> bytes:
    """The same bytes as ``encode_event("token", seq, {"delta": delta})``, for the hot path.

    JSON never contains a raw CR or LF, so the data always fits on one line.
    """
    return b'id: %d\nevent: token\ndata: {"delta":%s}\n\n' % (seq, json_string(delta))


def encode_reasoning(seq: int, delta: str) -> bytes:
    """The same bytes as ``encode_event("reasoning", seq, {"delta": delta})``."""
    return b'id: %d\nevent: reasoning\ndata: {"delta":%s}\n\n' % (seq, json_string(delta))

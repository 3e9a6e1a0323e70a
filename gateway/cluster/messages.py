"""The messages instances send each other through Redis: their version, and how one
is read. Every message is untrusted input (anyone who can publish, an instance of
another release): one that is not a valid message of a version this instance knows is
``Malformed``, and the link ignores it with a rate-limited warning.

The format's version: see docs/scaling.md for the rule that changes it. A release reads
its own version and the one before, and writes ``SEND_VERSION``: the older one while a
newer is being introduced (until every instance reads it, a release later), so a
rolling upgrade between two adjacent releases loses no message. A reply is written in
the version of the request it answers. Read both through this module
(``messages.SEND_VERSION``): a test plays the next release by setting them.
"""

from __future__ import annotations

import json
import re

from ..logs import loggable

__all__ = [
    "MAX_PRINCIPAL_CHARS",
    "PROTOCOL_VERSION",
    "SEND_VERSION",
    "Malformed",
    "accepted_versions",
    "field",
    "parse",
]

PROTOCOL_VERSION = 1
SEND_VERSION = PROTOCOL_VERSION

# A valid message is a few hundred bytes; a larger one is not parsed at all.
_MAX_MESSAGE_CHARS = 8192
MAX_PRINCIPAL_CHARS = 1024


class Malformed(Exception):
    """A message from Redis that this instance does not accept."""


def accepted_versions() -> frozenset[int]:
    return frozenset({PROTOCOL_VERSION - 1, PROTOCOL_VERSION}) - {0}


def field(data: dict[str, object], name: str, pattern: re.Pattern[str] | None, limit: int) -> str:
    """A message's text field ``name``: present, at most ``limit`` characters, and
    matching ``pattern`` whole if given."""
    value = data.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise Malformed(f"{name} is missing or not a short string")
    if pattern is not None and not pattern.fullmatch(value):
        raise Malformed(f"{name} is not well formed")
    return value


def parse(raw: object) -> dict[str, object]:
    """A message's JSON object, of a version this instance knows."""
    if not isinstance(raw, str) or len(raw) > _MAX_MESSAGE_CHARS:
        raise Malformed("not text, or too large")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise Malformed("not JSON") from None
    if not isinstance(data, dict):
        raise Malformed("not a JSON object")
    version = data.get("v")
    if isinstance(version, bool) or version not in accepted_versions():
        raise Malformed(f"unknown version {loggable(version, 16)}")
    return data

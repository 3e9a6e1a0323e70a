"""What reaches the logs: client-supplied values made safe, and a handler when nobody set one.

A value a client chose (a model name, a percent-decoded path) must not be able to
write a second line, forge a level or move the terminal's cursor: control characters
(C0, C1, DEL, U+2028/U+2029) are written as escapes, and the value is cut to a bound.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys

__all__ = ["EscapeControlCharacters", "Formatter", "ensure_handler", "loggable", "use_format"]

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Longest client-supplied value written in one of the gateway's own lines.
_VALUE_LIMIT = 256
# Longest message a handler with the filter writes (the access log's request line).
_MESSAGE_LIMIT = 4096
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def loggable(value: object, limit: int = _VALUE_LIMIT) -> str:
    """``value`` as one bounded line: control characters escaped, cut at ``limit``."""
    text = str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    text = _CONTROL.sub(_escape, text)
    return f"{text}...({len(str(value))} chars)" if cut else text


class EscapeControlCharacters(logging.Filter):
    """A handler filter that escapes control characters in every message and bounds
    its length. hypercorn's access log writes the percent-decoded path (``%0A`` is a
    line break there), so hypercorn.toml puts this on its handlers; the traceback of
    an exception is formatted apart and keeps its lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > _MESSAGE_LIMIT or _CONTROL.search(message):
            record.msg = loggable(message, _MESSAGE_LIMIT)
            record.args = None
        return True


_json = False


def use_format(name: str) -> None:
    """``text`` or ``json`` (``GATEWAY_LOG_FORMAT``), for every ``Formatter``; set by
    ``create_app``, as formatters are made by whoever configures logging."""
    global _json
    _json = name == "json"


class Formatter(logging.Formatter):
    """Text (``%(asctime)s %(levelname)s %(name)s: %(message)s``) or, with
    ``GATEWAY_LOG_FORMAT=json``, one JSON object per line: ``time``, ``level``,
    ``logger``, ``message``, and the fields a gateway line carries (the end line's:
    docs/observability.md). hypercorn.toml names it for its handlers."""

    def __init__(self, fmt: str | None = _FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        if not _json:
            return super().format(record)
        at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        data: dict[str, object] = {
            "time": at.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "gateway", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        # ASCII: no raw line separator of any kind can reach the output.
        return json.dumps(data, default=str)


class _Fallback(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes a record only while no other handler would: decided at each record, as
    a server may configure logging after the app has started (hypercorn applies its
    ``logconfig_dict`` after the lifespan's start-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        super().emit(record)


def ensure_handler() -> None:
    """Make sure the ``gateway`` lines reach stderr when nobody configured logging.

    Under plain ``hypercorn gateway.app:app`` nobody does, and Python's last-resort
    handler shows WARNING and up only: the ``[SSE]`` lines would be lost. An operator's
    configuration (hypercorn's ``logconfig``, ``basicConfig``, a framework's) wins
    whenever it exists.
    """
    logger = logging.getLogger("gateway")
    if any(isinstance(handler, _Fallback) for handler in logger.handlers):
        return
    handler = _Fallback(sys.stderr)
    handler.setFormatter(Formatter())
    handler.addFilter(EscapeControlCharacters())
    logger.addHandler(handler)

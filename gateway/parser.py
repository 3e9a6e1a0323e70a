"""Incremental parser for an OpenAI-compatible streaming response body.

Bytes go in as they arrive, split anywhere; what comes out is the content deltas,
the finish reason, the usage and the ``[DONE]`` marker. Keep-alive comments
(DeepSeek's ``: keep-alive``) produce nothing, so they never count as progress.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import UpstreamProtocolError, UpstreamStatusError

__all__ = ["MAX_LINE_BYTES", "ParsedChunk", "ProviderStreamParser"]

MAX_LINE_BYTES = 1024 * 1024


@dataclass(slots=True)
class ParsedChunk:
    """What one ``feed()`` found: deltas in order, and the end markers if seen."""

    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False


class ProviderStreamParser:
    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._buffer = b""
        self._skip_lf = False
        self._data: list[str] = []
        self.done = False

    def feed(self, data: bytes) -> ParsedChunk:
        """Parse the next bytes; raise ``UpstreamProtocolError`` on malformed input."""
        out = ParsedChunk()
        if not data:
            return out  # an empty read must not forget a CR that ended the last one
        if self._skip_lf and data.startswith(b"\n"):
            data = data[1:]
        self._skip_lf = False
        buffer = self._buffer + data
        if b"\r" in buffer:
            # A CR ends a line now; if it was the first half of a CRLF split
            # across reads, the LF that starts the next read is not a second one.
            self._skip_lf = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = buffer.split(b"\n")
        if len(rest) > self._max:
            raise UpstreamProtocolError(f"provider sent a line longer than {self._max} bytes")
        self._buffer = rest
        for line in lines:
            self._line(line, out)
        return out

    def _line(self, line: bytes, out: ParsedChunk) -> None:
        if not line:
            if self._data:
                data = "\n".join(self._data)
                self._data = []
                self._event(data, out)
            return
        if line.startswith(b"data:"):
            value = line[6:] if line.startswith(b"data: ") else line[5:]
            try:
                self._data.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                raise UpstreamProtocolError("provider sent bytes that are not UTF-8") from None
            if sum(len(d) for d in self._data) > self._max:
                raise UpstreamProtocolError(f"provider sent an event over {self._max} bytes")
        # Comments (keep-alives), event:, id: and retry: carry nothing we relay.

    def _event(self, data: str, out: ParsedChunk) -> None:
        if self.done:
            return
        if data == "[DONE]":
            self.done = out.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise UpstreamProtocolError("provider sent a chunk that is not JSON") from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError("provider sent a chunk that is not a JSON object")
        if "error" in chunk:
            raise UpstreamStatusError(_error_message(chunk["error"]))
        choices = chunk.get("choices")
        if choices is None:
            choices = []
        if not isinstance(choices, list):
            raise UpstreamProtocolError("provider sent a chunk whose choices is not a list")
        for choice in choices:
            if not isinstance(choice, dict):
                raise UpstreamProtocolError("provider sent a choice that is not an object")
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if content:
                if not isinstance(content, str):
                    raise UpstreamProtocolError("provider sent delta content that is not text")
                out.deltas.append(content)
            reason = choice.get("finish_reason")
            if reason is not None:
                out.finish_reason = str(reason)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            out.usage = usage


_ERROR_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _error_message(error: Any) -> str:
    """A safe message for an in-stream error object. Its free text may echo the prompt
    or account details, so only a short identifier (``type`` or ``code``) is passed on."""
    if isinstance(error, dict):
        for field in ("type", "code"):
            value = error.get(field)
            if isinstance(value, str) and _ERROR_TYPE.fullmatch(value):
                return f"provider sent an error: {value}"
    return "provider sent an error"

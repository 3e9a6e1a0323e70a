"""Incremental parser for an OpenAI-compatible streaming response body.

Bytes go in as they arrive, split anywhere; what comes out is the deltas in the
provider's order (content as ``str``, ``Reasoning``, ``ToolCallDelta``), the finish
reason, the usage and the ``[DONE]`` marker. Keep-alive comments (DeepSeek's
``: keep-alive``) produce nothing, so they never count as progress.

What a provider writes is untrusted: only the model's output (content, reasoning, tool
call fragments) reaches the client as text. The finish reason is one of the known
values (else ``other``), the usage only numbers under identifier keys, and an error
object only a known error type.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .errors import UpstreamError, UpstreamProtocolError, UpstreamStatusError

__all__ = [
    "MAX_LINE_BYTES",
    "Delta",
    "ParsedChunk",
    "ProviderStreamParser",
    "Reasoning",
    "ToolCallDelta",
]

MAX_LINE_BYTES = 1024 * 1024

# OpenAI's finish reasons and DeepSeek's one extra; anything else is "other".
FINISH_REASONS = frozenset(
    {
        "stop",
        "length",
        "tool_calls",
        "content_filter",
        "function_call",
        "insufficient_system_resource",
    }
)
# Error types and codes that OpenAI-compatible providers send and that say nothing
# about the request: the only ones the client is told.
KNOWN_ERRORS = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "rate_limit_exceeded",
        "insufficient_quota",
        "server_error",
        "api_error",
        "overloaded_error",
        "timeout",
        "context_length_exceeded",
        "model_not_found",
        "invalid_api_key",
        "content_filter",
        "service_unavailable",
    }
)
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_USAGE_KEYS = 64
_USAGE_DEPTH = 3
# A tool call's id and name are short in every API; the index counts parallel calls.
_MAX_TOOL_FIELD = 256
_MAX_TOOL_INDEX = 1024
# msgspec (in C) decodes a chunk in a fifth of json's time. It refuses what strict JSON
# does not allow and json reads (NaN, 1e400, lone surrogates): those go to json, so every
# chunk reads as it did with json alone (tests/test_parser.py).
_decode = msgspec.json.Decoder().decode


# The chunk's shape, checked in C as msgspec decodes it: the fields the gateway reads,
# their types, nothing else kept. A chunk of another shape is read untyped, where each
# check is Python's and a wrong type is an error or ignored as it always was; both
# read every chunk alike (tests/test_parser.py). Untracked by the collector: decoded
# JSON holds no cycles.
class _TypedDelta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: Any = None


class _TypedChoice(msgspec.Struct, gc=False):
    delta: _TypedDelta | None = None
    finish_reason: str | None = None


class _TypedChunk(msgspec.Struct, gc=False):
    choices: list[_TypedChoice] | None = None
    usage: Any = None
    error: Any = msgspec.UNSET


_decode_typed = msgspec.json.Decoder(_TypedChunk).decode


@dataclass(frozen=True, slots=True)
class Reasoning:
    """``delta.reasoning_content`` (DeepSeek) or ``delta.reasoning`` (vLLM, OpenRouter,
    Ollama): the model's thinking, before or between its answer."""

    text: str
    # The provider's name for it, kept for clients of the OpenAI-compatible endpoint.
    field: str = "reasoning_content"


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One element of ``delta.tool_calls``: the ``id`` and ``name`` come once, in the
    first fragment of a call; ``arguments`` is the next piece of its JSON string."""

    index: int
    id: str | None
    name: str | None
    arguments: str

    def as_event(self) -> dict[str, object]:
        data: dict[str, object] = {"index": self.index}
        if self.id is not None:
            data["id"] = self.id
        if self.name is not None:
            data["name"] = self.name
        data["arguments"] = self.arguments
        return data


# Content is a plain ``str``: the hot path handles it without looking further.
Delta = str | Reasoning | ToolCallDelta


@dataclass(slots=True)
class ParsedChunk:
    """What one ``feed()`` found: deltas in order, the end markers if seen, and the
    error that ended the parse, if one did (the deltas before it are still here).
    ``plain`` says every delta is content."""

    deltas: list[Delta] = field(default_factory=list)
    plain: bool = True
    finish_reason: str | None = None
    usage: dict[str, object] | None = None
    done: bool = False
    error: UpstreamError | None = None


class ProviderStreamParser:
    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._buffer = b""
        self._skip_lf = False
        self._data: list[str] = []
        self.done = False
        self.error: UpstreamError | None = None

    def feed(self, data: bytes) -> ParsedChunk:
        """Parse the next bytes. Malformed input or an error object sets ``error``, after
        the deltas parsed before it; nothing is parsed after an error."""
        out = ParsedChunk()
        if self.error is not None:
            out.error = self.error
            return out
        try:
            if (
                # The common read: one event of one data line, nothing left over.
                not self._buffer
                and not self._data
                and not self._skip_lf
                and data.startswith(b"data: ")
                and data.endswith(b"\n\n")
                and data.count(b"\n") == 2
                and b"\r" not in data
                and len(data) <= self._max
            ):
                self._event(_text(data[6:-2]), out)
            else:
                self._feed(data, out)
        except UpstreamError as exc:
            self.error = out.error = exc
        return out

    def _feed(self, data: bytes, out: ParsedChunk) -> None:
        if not data:
            return  # an empty read must not forget a CR that ended the last one
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
        self._buffer = b""
        for line in lines:
            self._line(line, out)
        if len(rest) > self._max:
            raise UpstreamProtocolError(f"provider sent a line longer than {self._max} bytes")
        self._buffer = rest

    def _line(self, line: bytes, out: ParsedChunk) -> None:
        if not line:
            if self._data:
                data = "\n".join(self._data)
                self._data = []
                self._event(data, out)
            return
        if line.startswith(b"data:"):
            value = line[6:] if line.startswith(b"data: ") else line[5:]
            self._data.append(_text(value))
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
            chunk = _decode_typed(data)
        except (ValueError, RecursionError):
            # Another shape, or JSON only json reads.
            _untyped_chunk(_json(data), out)
            return
        if chunk.error is not msgspec.UNSET:
            raise _error(chunk.error)
        for choice in chunk.choices or ():
            delta = choice.delta
            if delta is not None:
                # _delta's reading, on fields whose types msgspec has checked; inline,
                # as this is the token path (tests/test_parser.py holds the two alike).
                reasoning, name = delta.reasoning_content, "reasoning_content"
                if not reasoning:
                    reasoning, name = delta.reasoning, "reasoning"
                if reasoning:
                    out.deltas.append(Reasoning(reasoning, name))
                    out.plain = False
                if delta.content:
                    out.deltas.append(delta.content)
                if delta.tool_calls:
                    _tool_calls(delta.tool_calls, out)
            if choice.finish_reason is not None:
                out.finish_reason = _known_reason(choice.finish_reason)
        if isinstance(chunk.usage, dict):
            out.usage = numbers_only(chunk.usage)


def _untyped_chunk(chunk: object, out: ParsedChunk) -> None:
    """A chunk as any JSON: what the typed decoding did not take."""
    if not isinstance(chunk, dict):
        raise UpstreamProtocolError("provider sent a chunk that is not a JSON object")
    if "error" in chunk:
        raise _error(chunk["error"])
    choices = chunk.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise UpstreamProtocolError("provider sent a chunk whose choices is not a list")
    for choice in choices:
        if not isinstance(choice, dict):
            raise UpstreamProtocolError("provider sent a choice that is not an object")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            _delta(delta, out)
        reason = choice.get("finish_reason")
        if reason is not None:
            out.finish_reason = _known_reason(reason)
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        out.usage = numbers_only(usage)


def _known_reason(reason: object) -> str:
    # Not always text: a set lookup of a list would raise TypeError.
    if isinstance(reason, str) and reason in FINISH_REASONS:
        return reason
    return "other"


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise UpstreamProtocolError("provider sent bytes that are not UTF-8") from None


def _json(data: str) -> object:
    try:
        return _decode(data)
    except (ValueError, RecursionError):
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than Python's stack, which a 1 MiB line allows.
        raise UpstreamProtocolError("provider sent a chunk that is not JSON") from None


def _delta(delta: dict[str, object], out: ParsedChunk) -> None:
    # One delta rarely holds more than one kind; when it does, thinking comes first.
    name = "reasoning_content"
    reasoning = delta.get(name)
    if not reasoning:
        name = "reasoning"
        reasoning = delta.get(name)
    if reasoning:
        if not isinstance(reasoning, str):
            raise UpstreamProtocolError("provider sent reasoning that is not text")
        out.deltas.append(Reasoning(reasoning, name))
        out.plain = False
    content = delta.get("content")
    if content:
        if not isinstance(content, str):
            raise UpstreamProtocolError("provider sent delta content that is not text")
        out.deltas.append(content)
    calls = delta.get("tool_calls")
    if calls:
        _tool_calls(calls, out)


def _tool_calls(calls: object, out: ParsedChunk) -> None:
    if not isinstance(calls, list):
        raise UpstreamProtocolError("provider sent tool_calls that is not a list")
    for position, call in enumerate(calls):
        out.deltas.append(_tool_call(call, position))
    out.plain = False


def _tool_call(call: object, position: int) -> ToolCallDelta:
    if not isinstance(call, dict):
        raise UpstreamProtocolError("provider sent a tool call that is not an object")
    # Some providers leave out the index of a lone call: its place in the list is its index.
    index = call.get("index", position)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < _MAX_TOOL_INDEX:
        raise UpstreamProtocolError("provider sent a tool call index that is not a small integer")
    function = call.get("function") or {}
    if not isinstance(function, dict):
        raise UpstreamProtocolError("provider sent a tool call function that is not an object")
    arguments = function.get("arguments") or ""
    if not isinstance(arguments, str):
        raise UpstreamProtocolError("provider sent tool call arguments that are not text")
    return ToolCallDelta(
        index,
        _short_text(call.get("id"), "id"),
        _short_text(function.get("name"), "name"),
        arguments,
    )


def _short_text(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_TOOL_FIELD:
        raise UpstreamProtocolError(f"provider sent a tool call {name} that is not short text")
    return value


def numbers_only(usage: Mapping[object, object], depth: int = 1) -> dict[str, object]:
    """The numbers of a usage object under identifier keys, nested objects of numbers
    included (DeepSeek's ``completion_tokens_details``); any text is dropped."""
    out: dict[str, object] = {}
    for key, value in list(usage.items())[:_USAGE_KEYS]:
        if not isinstance(key, str) or not _IDENTIFIER.fullmatch(key):
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                out[key] = value
        elif isinstance(value, dict) and depth < _USAGE_DEPTH:
            out[key] = numbers_only(value, depth + 1)
    return out


def provider_error_ids(error: object) -> dict[str, str]:
    """The ``type`` and ``code`` of a provider's error object that are short
    identifiers: safe for the operator's log, where they tell a wrong key from an
    unknown model. (A provider that is not OpenAI may put free text there.)"""
    found: dict[str, str] = {}
    if isinstance(error, dict):
        for name in ("type", "code"):
            value = error.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if isinstance(value, str) and _IDENTIFIER.fullmatch(value):
                found[name] = value
    return found


def _error(error: object) -> UpstreamStatusError:
    """An in-stream error object. Its free text may echo the prompt or account details,
    and even an identifier-shaped ``type`` may be the prompt: the client is told only a
    known error type; the operator's log gets every identifier."""
    ids = provider_error_ids(error)
    known = [value for value in ids.values() if value in KNOWN_ERRORS]
    message = f"provider sent an error: {known[0]}" if known else "provider sent an error"
    return UpstreamStatusError(message, provider_error=ids or None)

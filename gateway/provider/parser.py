"""Incremental parser for an OpenAI-compatible streaming response body.

Bytes go in as they arrive, split anywhere; what comes out is the deltas in the
provider's order (content as ``str``, ``Reasoning``, ``Refusal``, ``ToolCallDelta``,
``ContentPart``, and ``Extras``, which is not a delta of the answer), the finish reason,
the usage and the ``[DONE]`` marker. Keep-alive comments (DeepSeek's ``: keep-alive``)
produce nothing, so they never count as progress.

What a provider writes is untrusted: the model's output (content, reasoning, refusal,
tool call fragments) and the fields the gateway does not model (``Extras``, bounded in
size) reach the client as the provider wrote them. The finish reason is one of the
known values (else ``other``), the usage only numbers and nulls under identifier keys,
and an error object only a known error type. A choice that ends with
``finish_reason: "error"`` (OpenRouter) or carries an ``error`` object fails the stream.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..errors import UpstreamError, UpstreamProtocolError, UpstreamStatusError

__all__ = [
    "MAX_EXTRAS_BYTES",
    "MAX_LINE_BYTES",
    "MAX_TOKEN_COUNT",
    "ContentPart",
    "Delta",
    "Extras",
    "ParsedChunk",
    "ProviderStreamParser",
    "Reasoning",
    "Refusal",
    "ToolCallDelta",
    "decode_json",
    "fits",
    "known_error",
    "numbers_only",
    "token_counts",
]

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 1024 * 1024
# What one chunk may add that the gateway does not model (its extra fields, or one
# content part of an unknown type), as compact JSON; more is dropped.
MAX_EXTRAS_BYTES = 64 * 1024
# A token count above this is not plausible for one answer: it is kept from the metrics.
MAX_TOKEN_COUNT = 100_000_000
# JSON numbers every client reads exactly (JavaScript's safe integers).
_MAX_SAFE_INT = 2**53 - 1

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


# The chunk's shape, checked in C as msgspec decodes it: the fields of OpenAI's chunk,
# their types. A chunk of another shape, or with any field beyond these (a provider's
# extras, content as a list of parts), is read untyped, where each check is Python's
# and a wrong type is an error or ignored as it always was; both read every chunk alike
# (tests/test_parser.py). Untracked by the collector: decoded JSON holds no cycles.
class _TypedDelta(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    role: Any = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None
    tool_calls: Any = None


class _TypedChoice(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    index: Any = None
    delta: _TypedDelta | None = None
    finish_reason: str | None = None
    logprobs: Any = None


class _TypedChunk(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    id: Any = None
    object: Any = None
    created: Any = None
    model: Any = None
    system_fingerprint: Any = None
    service_tier: Any = None
    # Padding against length side channels (OpenAI's, Mistral's): no content, not
    # passed on.
    obfuscation: Any = None
    p: Any = None
    choices: list[_TypedChoice] | None = None
    usage: Any = None
    error: Any = msgspec.UNSET


# The fields of each level that the gateway reads or writes itself; any other is the
# provider's extra (``Extras``). A choice's ``error`` fails the stream.
_CHUNK_FIELDS = frozenset(_TypedChunk.__struct_fields__)
_CHOICE_FIELDS = frozenset(_TypedChoice.__struct_fields__) | {"error"}
_DELTA_FIELDS = frozenset(_TypedDelta.__struct_fields__)
# The fields of a tool call fragment that the gateway reads or writes itself.
_TOOL_CALL_FIELDS = frozenset({"index", "id", "type", "function"})
# Extra fields of the chunk that would stand for the gateway's own in its answers.
_RESERVED_EXTRAS = frozenset({"gateway"})


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
    first fragment of a call; ``arguments`` is the next piece of its JSON string.
    ``extras``: the fragment's other fields, as sent (Gemini's ``extra_content`` with
    the thought signature its next turn needs back)."""

    index: int
    id: str | None
    name: str | None
    arguments: str
    extras: dict[str, object] | None = None

    def as_event(self) -> dict[str, object]:
        data: dict[str, object] = {"index": self.index}
        if self.id is not None:
            data["id"] = self.id
        if self.name is not None:
            data["name"] = self.name
        data["arguments"] = self.arguments
        if self.extras is not None:
            data["extra"] = self.extras
        return data


@dataclass(frozen=True, slots=True)
class Refusal:
    """``delta.refusal``: the model declines (OpenAI's structured outputs); its text."""

    text: str


@dataclass(frozen=True, slots=True)
class ContentPart:
    """A part of a list-valued ``delta.content`` whose type the gateway does not know,
    passed on as the provider sent it (text parts are content, thinking parts
    reasoning)."""

    part: dict[str, object]


@dataclass(frozen=True, slots=True)
class Extras:
    """The fields of one provider chunk that the gateway does not model (Perplexity's
    ``citations``, Groq's ``x_groq``, Azure's filter results, Gemini's
    ``extra_content``), by level, as the provider sent them. It comes before that
    chunk's deltas, and is not one: no progress, no count."""

    chunk: dict[str, object] | None = None
    choice: dict[str, object] | None = None
    delta: dict[str, object] | None = None

    def as_event(self) -> dict[str, object]:
        levels = (("chunk", self.chunk), ("choice", self.choice), ("delta", self.delta))
        return {name: value for name, value in levels if value is not None}


# Content is a plain ``str``: the hot path handles it without looking further.
Delta = str | Reasoning | Refusal | ToolCallDelta | ContentPart | Extras


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
        # How the provider itself said the answer ended, where its API says more than
        # ``finish_reason`` can (Anthropic's stop_reason and stop_sequence).
        self.native_stop: dict[str, str | None] | None = None

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
            # Another shape, extra fields, or JSON only json reads.
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
                if delta.refusal:
                    out.deltas.append(Refusal(delta.refusal))
                    out.plain = False
                if delta.tool_calls:
                    _tool_calls(delta.tool_calls, out)
            reason = choice.finish_reason
            if reason is not None:
                if reason == "error":
                    raise _failed_choice({})
                out.finish_reason = _known_reason(reason)
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
    # The chunk's extras go before its deltas, so a client has them with the first.
    first = len(out.deltas)
    choice_extras: dict[str, object] = {}
    delta_extras: dict[str, object] = {}
    for choice in choices:
        if not isinstance(choice, dict):
            raise UpstreamProtocolError("provider sent a choice that is not an object")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            _delta(delta, out)
            delta_extras.update(_unknown(delta, _DELTA_FIELDS))
        reason = choice.get("finish_reason")
        if reason == "error" or isinstance(choice.get("error"), dict):
            raise _failed_choice(choice)
        if reason is not None:
            out.finish_reason = _known_reason(reason)
        choice_extras.update(_unknown(choice, _CHOICE_FIELDS))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        out.usage = numbers_only(usage)
    chunk_extras = {
        key: value
        for key, value in _unknown(chunk, _CHUNK_FIELDS).items()
        if key not in _RESERVED_EXTRAS
    }
    if chunk_extras or choice_extras or delta_extras:
        extras = Extras(chunk_extras or None, choice_extras or None, delta_extras or None)
        if _fits(extras.as_event()):
            out.deltas.insert(first, extras)
            out.plain = False


def _unknown(fields: dict[str, object], known: frozenset[str]) -> dict[str, object]:
    return {key: value for key, value in fields.items() if key not in known}


def _fits(value: object) -> bool:
    """Whether ``value`` is JSON of at most ``MAX_EXTRAS_BYTES``: what a client gets."""
    try:
        return len(json.dumps(value, ensure_ascii=False, allow_nan=False)) <= MAX_EXTRAS_BYTES
    except (ValueError, TypeError, RecursionError):
        # NaN or Infinity, which JSON has no words for, or nesting beyond the stack.
        return False


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
        if isinstance(content, list):
            _content_parts(content, out)
        elif isinstance(content, str):
            out.deltas.append(content)
        else:
            raise UpstreamProtocolError("provider sent delta content that is not text or parts")
    refusal = delta.get("refusal")
    if refusal:
        if not isinstance(refusal, str):
            raise UpstreamProtocolError("provider sent a refusal that is not text")
        out.deltas.append(Refusal(refusal))
        out.plain = False
    calls = delta.get("tool_calls")
    if calls:
        _tool_calls(calls, out)


def _content_parts(parts: list[object], out: ParsedChunk) -> None:
    """``delta.content`` as a list of parts (Mistral): text parts are content, thinking
    parts reasoning, in the provider's order; a part of another type is passed on."""
    for part in parts:
        if not isinstance(part, dict):
            raise UpstreamProtocolError("provider sent a content part that is not an object")
        kind = part.get("type")
        text = part.get("text")
        if kind == "text" and isinstance(text, str):
            if text:
                out.deltas.append(text)
            continue
        if kind == "thinking":
            thinking = _thinking_text(part.get("thinking"))
            if thinking is not None:
                if thinking:
                    out.deltas.append(Reasoning(thinking, "reasoning_content"))
                    out.plain = False
                continue
        if _fits(part):
            out.deltas.append(ContentPart(part))
            out.plain = False


def _thinking_text(thinking: object) -> str | None:
    """A thinking part's text: a string, or a list of text parts (Mistral's shape);
    ``None`` if it is neither."""
    if isinstance(thinking, str):
        return thinking
    if not isinstance(thinking, list):
        return None
    texts = []
    for piece in thinking:
        if not isinstance(piece, dict) or not isinstance(piece.get("text"), str):
            return None
        texts.append(piece["text"])
    return "".join(texts)


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
    extras = _unknown(call, _TOOL_CALL_FIELDS)
    return ToolCallDelta(
        index,
        _short_text(call.get("id"), "id"),
        _short_text(function.get("name"), "name"),
        arguments,
        extras if extras and _fits(extras) else None,
    )


def _short_text(value: object, name: str) -> str | None:
    """A tool call's id or name. Empty counts as absent: Qwen repeats ``"id": ""`` and
    GLM ``"name": ""`` on a call's later fragments, which must not wipe the first."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > _MAX_TOOL_FIELD:
        raise UpstreamProtocolError(f"provider sent a tool call {name} that is not short text")
    return value


# Each usage field a provider sent an implausible value for: told once per process.
_IMPLAUSIBLE: set[str] = set()


def _implausible(name: str) -> None:
    if name not in _IMPLAUSIBLE and len(_IMPLAUSIBLE) < _USAGE_KEYS:
        _IMPLAUSIBLE.add(name)
        logger.warning(
            "provider sent an implausible %s in its usage; not counted (logged once a field)",
            name,
        )


def numbers_only(usage: Mapping[object, object], depth: int = 1) -> dict[str, object]:
    """The numbers and nulls of a usage object under identifier keys, nested objects
    included (DeepSeek's ``completion_tokens_details``); text is dropped, and so are
    numbers no client reads exactly (integers beyond 2**53, NaN, infinities)."""
    out: dict[str, object] = {}
    for key, value in list(usage.items())[:_USAGE_KEYS]:
        if not isinstance(key, str) or not _IDENTIFIER.fullmatch(key):
            continue
        if value is None:
            out[key] = None
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float):
            # An int never through float: 10**400 has none (math.isfinite raised).
            exact = (
                -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
                if isinstance(value, int)
                else math.isfinite(value)
            )
            if exact:
                out[key] = value
            else:
                _implausible(key)
        elif isinstance(value, dict) and depth < _USAGE_DEPTH:
            out[key] = numbers_only(value, depth + 1)
    return out


def token_counts(usage: Mapping[str, object]) -> dict[str, int]:
    """The token counts of a provider's usage object for the metrics: OpenAI's fields,
    and DeepSeek's ``prompt_cache_hit_tokens`` for the cached prompt. Each must be a
    whole number from 0 to ``MAX_TOKEN_COUNT``; any other is left out of the metrics,
    and the first of each field is logged."""

    def count(name: str, value: object) -> int | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
            return value
        _implausible(name)
        return None

    def nested(name: str, key: str) -> int | None:
        details = usage.get(name)
        return count(f"{name}.{key}", details.get(key)) if isinstance(details, dict) else None

    found = {
        "prompt": count("prompt_tokens", usage.get("prompt_tokens")),
        "completion": count("completion_tokens", usage.get("completion_tokens")),
        "reasoning": nested("completion_tokens_details", "reasoning_tokens"),
        "cached_prompt": nested("prompt_tokens_details", "cached_tokens")
        or count("prompt_cache_hit_tokens", usage.get("prompt_cache_hit_tokens")),
    }
    return {kind: value for kind, value in found.items() if value}


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


def _failed_choice(choice: dict[str, object]) -> UpstreamStatusError:
    """A choice that says the generation failed: ``finish_reason: "error"`` (OpenRouter,
    with the provider's own reason in ``native_finish_reason``, such as Gemini's
    ``MALFORMED_FUNCTION_CALL``) or an ``error`` object on the choice. The native reason
    reaches the client when it is a short identifier."""
    ids = provider_error_ids(choice.get("error"))
    native = choice.get("native_finish_reason")
    detail = native if isinstance(native, str) and _IDENTIFIER.fullmatch(native) else None
    if detail is not None:
        ids["native_finish_reason"] = detail
    return UpstreamStatusError(
        "provider ended the answer with an error", provider_error=ids or None, detail=detail
    )


def _error(error: object) -> UpstreamStatusError:
    """An in-stream error object. Its free text may echo the prompt or account details,
    and even an identifier-shaped ``type`` may be the prompt: the client is told only a
    known error type; the operator's log gets every identifier."""
    ids = provider_error_ids(error)
    known = [value for value in ids.values() if value in KNOWN_ERRORS]
    message = f"provider sent an error: {known[0]}" if known else "provider sent an error"
    return UpstreamStatusError(message, provider_error=ids or None)


# For the other providers' parsers (provider/anthropic.py): the same reading of JSON,
# the same bound on what is passed on, the same telling of an error object.
decode_json = _json
fits = _fits
known_error = _error

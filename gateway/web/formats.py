"""How an answer is written to the client: the gateway's own events, OpenAI's
``chat.completion.chunk`` stream, or one ``chat.completion`` object.

A ``ChatStream`` counts the deltas and runs the one cancellation path; its format only
turns deltas and the outcome into bytes. Each format is made for one stream.
"""

from __future__ import annotations

import time

from starlette.responses import JSONResponse

from ..core.events import (
    SSE_MEDIA_TYPE,
    encode_event,
    encode_reasoning,
    encode_token,
    json_string,
    json_text,
)
from ..core.report import reported_usage, routing_report, terminal_event
from ..core.session import Completed, Failed, Session, Stopped
from ..errors import AnswerTooLarge, APIError
from ..provider.parser import ContentPart, Delta, Extras, Reasoning, Refusal, ToolCallDelta
from .responses import error_body, error_response

__all__ = ["AnswerFormat", "ChatCompletion", "ChatCompletionChunks", "GatewayEvents", "hold"]

_JSON = b"application/json"
# OpenAI has no finish reason for a stop; clients that check for known ones see "other".
CANCELLED = "cancelled"


class AnswerFormat:
    """The bytes of one answer. ``streaming`` formats start the response at once;
    the others wait for the outcome, which decides the status. ``resumable`` formats
    can be resumed after a dropped connection (``GATEWAY_RESUME_WINDOW``)."""

    streaming = True
    resumable = False
    media_type = SSE_MEDIA_TYPE

    def start(self, session: Session) -> bytes:
        raise NotImplementedError

    def contents(self, session: Session, texts: list[str]) -> bytes:
        """Content deltas: the hot path."""
        raise NotImplementedError

    def delta(self, session: Session, delta: Delta) -> bytes:
        """Any delta but content, and the provider's extras (``Extras``)."""
        raise NotImplementedError

    def terminal(self, session: Session) -> bytes:
        """The answer's end, from ``session.outcome`` and its counts."""
        raise NotImplementedError

    def status(self, session: Session) -> int:
        return 200

    def error(self, exc: APIError) -> JSONResponse:
        """A refusal before the answer starts (too many sessions, a conflict), in the
        surface's error envelope."""
        return error_response(exc)


class GatewayEvents(AnswerFormat):
    """``POST /api/chat/stream``: start, token, reasoning, refusal, tool_call,
    content_part and extra, then done, stopped or error (docs/api.md)."""

    resumable = True

    def __init__(self) -> None:
        # The provider's extras last told the client: told again only when they change
        # (Perplexity repeats its citations on every chunk).
        self._extras: dict[str, object] | None = None

    def start(self, session: Session) -> bytes:
        data = {"session_id": session.id, "model": session.model}
        return encode_event("start", session.next_seq(), data)

    def contents(self, session: Session, texts: list[str]) -> bytes:
        if len(texts) == 1:  # one token per provider chunk, as most read
            return encode_token(session.next_seq(), texts[0])
        return b"".join(encode_token(session.next_seq(), text) for text in texts)

    def delta(self, session: Session, delta: Delta) -> bytes:
        if isinstance(delta, Reasoning):
            return encode_reasoning(session.next_seq(), delta.text)
        if isinstance(delta, ToolCallDelta):
            return encode_event("tool_call", session.next_seq(), delta.as_event())
        if isinstance(delta, Refusal):
            return encode_event("refusal", session.next_seq(), {"delta": delta.text})
        if isinstance(delta, ContentPart):
            return encode_event("content_part", session.next_seq(), {"part": delta.part})
        assert isinstance(delta, Extras)
        extras = delta.as_event()
        if extras == self._extras:
            return b""
        self._extras = extras
        return encode_event("extra", session.next_seq(), extras)

    def terminal(self, session: Session) -> bytes:
        event, data = terminal_event(session)
        return encode_event(event, session.next_seq(), data)


def _gateway_report(session: Session) -> dict[str, object]:
    """Why the gateway ended an answer, and what of it reached the client: the
    ``stopped`` event's data, less what OpenAI's format says otherwise."""
    _, data = terminal_event(session)
    return {k: v for k, v in data.items() if k not in ("status", "first_delta_ms")}


def _failure_status(failed: Failed) -> int:
    return 500 if failed.code == "internal_error" else 502


def _failure_body(failed: Failed) -> dict[str, object]:
    """OpenAI's error envelope; the provider's native reason, if any, in the message."""
    message = failed.message if failed.detail is None else f"{failed.message} ({failed.detail})"
    return error_body(_failure_status(failed), failed.code, message)


def _tool_call_json(delta: ToolCallDelta) -> dict[str, object]:
    call: dict[str, object] = {"index": delta.index}
    if delta.id is not None:
        call["id"] = delta.id
        call["type"] = "function"
    function: dict[str, object] = {}
    if delta.name is not None:
        function["name"] = delta.name
    function["arguments"] = delta.arguments
    call["function"] = function
    if delta.extras is not None:
        call.update(delta.extras)  # never one of the names above (provider/parser.py)
    return call


class ChatCompletionChunks(AnswerFormat):
    """``POST /v1/chat/completions`` with ``stream: true``: OpenAI's chunks, ``[DONE]``
    at the end, the provider's extras (``reasoning_content``, DeepSeek's usage) kept."""

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._meta: dict[str, object] = {}
        self._head = b""

    def start(self, session: Session) -> bytes:
        self._meta = {
            "id": f"chatcmpl-{session.id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": session.model,
        }
        # Everything before a content delta, once: a content chunk is then one format.
        self._head = b"data: " + json_text(self._meta)[:-1].encode() + b',"choices":[{"index":0,'
        return self._chunk({"role": "assistant", "content": ""})

    def _chunk(
        self,
        delta: dict[str, object],
        finish_reason: str | None = None,
        **extra: object,
    ) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _data({**self._meta, "choices": [choice], **extra})

    def contents(self, session: Session, texts: list[str]) -> bytes:
        head = self._head
        return b"".join(
            b'%s"delta":{"content":%s},"logprobs":null,"finish_reason":null}]}\n\n'
            % (head, json_string(text))
            for text in texts
        )

    def delta(self, session: Session, delta: Delta) -> bytes:
        if isinstance(delta, Reasoning):
            return self._chunk({delta.field: delta.text})
        if isinstance(delta, ToolCallDelta):
            return self._chunk({"tool_calls": [_tool_call_json(delta)]})
        if isinstance(delta, Refusal):
            return self._chunk({"refusal": delta.text})
        if isinstance(delta, ContentPart):
            return self._chunk({"content": [delta.part]})
        assert isinstance(delta, Extras)
        # A chunk of their own, just before the deltas of the provider's chunk that
        # carried them; none of their names is one the gateway writes.
        choice = {
            "index": 0,
            "delta": delta.delta or {},
            "logprobs": None,
            "finish_reason": None,
            **(delta.choice or {}),
        }
        return _data({**self._meta, **(delta.chunk or {}), "choices": [choice]})

    def terminal(self, session: Session) -> bytes:
        outcome = session.outcome
        if isinstance(outcome, Failed):
            # OpenAI's in-stream error: the SDKs raise APIError on it.
            return _data(_failure_body(outcome))
        extra: dict[str, object] = {}
        if isinstance(outcome, Completed):
            if session.routed:
                extra["gateway"] = routing_report(session)
            out = self._chunk({}, outcome.finish_reason or "stop", **extra)
        else:
            assert isinstance(outcome, Stopped)
            extra["gateway"] = _gateway_report(session)
            out = self._chunk({}, CANCELLED, **extra)
        usage, _ = reported_usage(session)
        if self._include_usage and usage is not None:
            out += _data({**self._meta, "choices": [], "usage": usage, **extra})
        return out + b"data: [DONE]\n\n"


def _data(chunk: dict[str, object]) -> bytes:
    return b"data: " + json_text(chunk).encode() + b"\n\n"


def hold(held: int, text: str, max_bytes: int) -> int:
    """The bytes an answer held whole holds with ``text`` added; ``AnswerTooLarge``
    past ``max_bytes`` (``GATEWAY_MAX_ANSWER_BYTES``): the stream fails and the provider
    is closed, instead of the process holding any size of answer."""
    held += len(text.encode("utf-8", "surrogatepass"))
    if held > max_bytes:
        raise AnswerTooLarge(
            f"the answer is over GATEWAY_MAX_ANSWER_BYTES ({max_bytes} bytes); "
            "ask for it with stream: true"
        )
    return held


class ChatCompletion(AnswerFormat):
    """``POST /v1/chat/completions`` without ``stream``: the provider still streams
    (so a client that leaves still stops it), and the answer is assembled here."""

    streaming = False
    media_type = _JSON

    def __init__(self, max_bytes: int = 8 * 1024 * 1024) -> None:
        # What the answer may hold, in UTF-8 bytes of its text, reasoning, refusal and
        # tool arguments; past it, the stream fails (AnswerTooLarge) and the provider is
        # closed, instead of the process holding (and joining) any size of answer.
        self._max_bytes = max_bytes
        self._bytes = 0
        # Text, and the parts of unknown types between it, in the provider's order.
        self._content: list[str | ContentPart] = []
        self._parts = False
        self._refusal: list[str] = []
        self._reasoning: dict[str, list[str]] = {}
        self._calls: dict[int, dict[str, object]] = {}
        self._arguments: dict[int, list[str]] = {}
        self._call_extras: dict[int, dict[str, object]] = {}
        # The provider's extras, by level; a later value of a field replaces an earlier.
        self._extras: dict[str, dict[str, object]] = {"chunk": {}, "choice": {}, "delta": {}}

    def start(self, session: Session) -> bytes:
        return b""

    def contents(self, session: Session, texts: list[str]) -> bytes:
        for text in texts:
            self._hold(text)
        self._content.extend(texts)
        return b""

    def _hold(self, text: str) -> None:
        self._bytes = hold(self._bytes, text, self._max_bytes)

    def delta(self, session: Session, delta: Delta) -> bytes:
        if isinstance(delta, Reasoning):
            self._hold(delta.text)
            self._reasoning.setdefault(delta.field, []).append(delta.text)
        elif isinstance(delta, Refusal):
            self._hold(delta.text)
            self._refusal.append(delta.text)
        elif isinstance(delta, ContentPart):
            self._content.append(delta)
            self._parts = True
        elif isinstance(delta, Extras):
            for level, fields in (
                ("chunk", delta.chunk),
                ("choice", delta.choice),
                ("delta", delta.delta),
            ):
                self._extras[level].update(fields or {})
        else:
            assert isinstance(delta, ToolCallDelta)
            # One rule wherever fragments are joined: the first id and name win (the
            # parser has already dropped empty ones), the arguments are joined.
            call = self._calls.setdefault(delta.index, {})
            if delta.id is not None:
                call.setdefault("id", delta.id)
            if delta.name is not None:
                call.setdefault("name", delta.name)
            if delta.extras is not None:
                self._call_extras.setdefault(delta.index, {}).update(delta.extras)
            self._hold(delta.arguments)
            self._arguments.setdefault(delta.index, []).append(delta.arguments)
        return b""

    def status(self, session: Session) -> int:
        outcome = session.outcome
        return _failure_status(outcome) if isinstance(outcome, Failed) else 200

    def _message_content(self) -> object:
        if not self._parts:
            return "".join(self._content)  # type: ignore[arg-type]  # no parts: all text
        # Parts of unknown types kept in place, the text around them as text parts.
        parts: list[object] = []
        for piece in self._content:
            if isinstance(piece, ContentPart):
                parts.append(piece.part)
            elif parts and isinstance(parts[-1], dict) and parts[-1].get("type") == "text":
                parts[-1] = {"type": "text", "text": f"{parts[-1]['text']}{piece}"}
            else:
                parts.append({"type": "text", "text": piece})
        return parts

    def terminal(self, session: Session) -> bytes:
        outcome = session.outcome
        if isinstance(outcome, Failed):
            return json_text(_failure_body(outcome)).encode()
        message: dict[str, object] = {
            **self._extras["delta"],
            "role": "assistant",
            # As OpenAI: null when the answer is only tool calls or a refusal.
            "content": (
                self._message_content()
                if self._content or not (self._calls or self._refusal)
                else None
            ),
        }
        if self._refusal:
            message["refusal"] = "".join(self._refusal)
        for name, parts in self._reasoning.items():
            message[name] = "".join(parts)
        if self._calls:
            message["tool_calls"] = [
                {
                    **self._call_extras.get(index, {}),
                    "id": call.get("id"),
                    "type": "function",
                    "function": {
                        "name": call.get("name"),
                        "arguments": "".join(self._arguments[index]),
                    },
                }
                for index, call in sorted(self._calls.items())
            ]
        answer: dict[str, object] = {
            "id": f"chatcmpl-{session.id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": session.model,
            **self._extras["chunk"],
        }
        if isinstance(outcome, Completed):
            finish_reason = outcome.finish_reason or "stop"
            if session.routed:
                answer["gateway"] = routing_report(session)
        else:
            assert isinstance(outcome, Stopped)
            finish_reason = CANCELLED
            answer["gateway"] = _gateway_report(session)
        answer_usage, _ = reported_usage(session)
        choice = {
            **self._extras["choice"],
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        answer["choices"] = [choice]
        if answer_usage is not None:
            answer["usage"] = answer_usage
        return json_text(answer).encode()

"""How an answer is written to the client: the gateway's own events, OpenAI's
``chat.completion.chunk`` stream, or one ``chat.completion`` object.

A ``ChatStream`` counts the deltas and runs the one cancellation path; its format only
turns deltas and the outcome into bytes. Each format is made for one stream.
"""

from __future__ import annotations

import time

from .events import encode_event, encode_reasoning, encode_token, json_string, json_text
from .parser import Reasoning, ToolCallDelta
from .responses import error_body
from .session import Completed, Failed, Session, Stopped

__all__ = ["AnswerFormat", "ChatCompletion", "ChatCompletionChunks", "GatewayEvents"]

_SSE = b"text/event-stream; charset=utf-8"
_JSON = b"application/json"
# OpenAI has no finish reason for a stop; clients that check for known ones see "other".
CANCELLED = "cancelled"


class AnswerFormat:
    """The bytes of one answer. ``streaming`` formats start the response at once;
    the others wait for the outcome, which decides the status."""

    streaming = True
    media_type = _SSE

    def start(self, session: Session) -> bytes:
        raise NotImplementedError

    def contents(self, session: Session, texts: list[str]) -> bytes:
        """Content deltas: the hot path."""
        raise NotImplementedError

    def delta(self, session: Session, delta: Reasoning | ToolCallDelta) -> bytes:
        raise NotImplementedError

    def terminal(self, session: Session) -> bytes:
        """The answer's end, from ``session.outcome`` and its counts."""
        raise NotImplementedError

    def status(self, session: Session) -> int:
        return 200


class GatewayEvents(AnswerFormat):
    """``POST /api/chat/stream``: start, token, reasoning, tool_call, then done, stopped
    or error (docs/api.md)."""

    def start(self, session: Session) -> bytes:
        data = {"session_id": session.id, "model": session.model}
        return encode_event("start", session.next_seq(), data)

    def contents(self, session: Session, texts: list[str]) -> bytes:
        if len(texts) == 1:  # one token per provider chunk, as most read
            return encode_token(session.next_seq(), texts[0])
        return b"".join(encode_token(session.next_seq(), text) for text in texts)

    def delta(self, session: Session, delta: Reasoning | ToolCallDelta) -> bytes:
        if isinstance(delta, Reasoning):
            return encode_reasoning(session.next_seq(), delta.text)
        return encode_event("tool_call", session.next_seq(), delta.as_event())

    def terminal(self, session: Session) -> bytes:
        event, data = session.terminal_event()
        return encode_event(event, session.next_seq(), data)


def _gateway_report(session: Session) -> dict[str, object]:
    """Why the gateway ended an answer, and what of it reached the client: the
    ``stopped`` event's data, less what OpenAI's format says otherwise."""
    _, data = session.terminal_event()
    return {k: v for k, v in data.items() if k not in ("status", "first_delta_ms")}


def _failure_status(failed: Failed) -> int:
    return 500 if failed.code == "internal_error" else 502


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

    def delta(self, session: Session, delta: Reasoning | ToolCallDelta) -> bytes:
        if isinstance(delta, Reasoning):
            return self._chunk({delta.field: delta.text})
        return self._chunk({"tool_calls": [_tool_call_json(delta)]})

    def terminal(self, session: Session) -> bytes:
        outcome = session.outcome
        if isinstance(outcome, Failed):
            # OpenAI's in-stream error: the SDKs raise APIError on it.
            return _data(error_body(_failure_status(outcome), outcome.code, outcome.message))
        extra: dict[str, object] = {}
        if isinstance(outcome, Completed):
            out = self._chunk({}, outcome.finish_reason or "stop")
        else:
            assert isinstance(outcome, Stopped)
            extra["gateway"] = _gateway_report(session)
            out = self._chunk({}, CANCELLED, **extra)
        usage, _ = session.usage()
        if self._include_usage:
            out += _data({**self._meta, "choices": [], "usage": usage, **extra})
        return out + b"data: [DONE]\n\n"


def _data(chunk: dict[str, object]) -> bytes:
    return b"data: " + json_text(chunk).encode() + b"\n\n"


class ChatCompletion(AnswerFormat):
    """``POST /v1/chat/completions`` without ``stream``: the provider still streams
    (so a client that leaves still stops it), and the answer is assembled here."""

    streaming = False
    media_type = _JSON

    def __init__(self) -> None:
        self._content: list[str] = []
        self._reasoning: dict[str, list[str]] = {}
        self._calls: dict[int, dict[str, object]] = {}
        self._arguments: dict[int, list[str]] = {}

    def start(self, session: Session) -> bytes:
        return b""

    def contents(self, session: Session, texts: list[str]) -> bytes:
        self._content.extend(texts)
        return b""

    def delta(self, session: Session, delta: Reasoning | ToolCallDelta) -> bytes:
        if isinstance(delta, Reasoning):
            self._reasoning.setdefault(delta.field, []).append(delta.text)
            return b""
        call = self._calls.setdefault(delta.index, {})
        if delta.id is not None:
            call["id"] = delta.id
        if delta.name is not None:
            call["name"] = delta.name
        self._arguments.setdefault(delta.index, []).append(delta.arguments)
        return b""

    def status(self, session: Session) -> int:
        outcome = session.outcome
        return _failure_status(outcome) if isinstance(outcome, Failed) else 200

    def terminal(self, session: Session) -> bytes:
        outcome = session.outcome
        if isinstance(outcome, Failed):
            body = error_body(_failure_status(outcome), outcome.code, outcome.message)
            return json_text(body).encode()
        message: dict[str, object] = {
            "role": "assistant",
            "content": "".join(self._content) if self._content or not self._calls else None,
        }
        for name, parts in self._reasoning.items():
            message[name] = "".join(parts)
        if self._calls:
            message["tool_calls"] = [
                {
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
        }
        if isinstance(outcome, Completed):
            finish_reason = outcome.finish_reason or "stop"
        else:
            assert isinstance(outcome, Stopped)
            finish_reason = CANCELLED
            answer["gateway"] = _gateway_report(session)
        answer_usage, _ = session.usage()
        answer["choices"] = [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ]
        answer["usage"] = answer_usage
        return json_text(answer).encode()

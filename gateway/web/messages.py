"""``POST /v1/messages``: Anthropic's Messages API, for apps on the Anthropic SDKs.

The request is checked and kept two ways: as the client sent it (its known fields),
which an Anthropic provider is sent as it is; and as a Chat Completions request, which
an OpenAI-compatible provider is sent (``chat_form``). The answer, from either, is
written in Messages' events (``MessagesEvents``) or as one ``message``
(``MessagesAnswer``), on the same Session, registry and cancellation path as every
stream. Errors have Anthropic's envelope (``{"type": "error", "error": {...}}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from ..core.events import json_string, json_text
from ..core.report import reported_usage, routing_report, terminal_event
from ..core.session import Completed, Failed, Session, Stopped
from ..errors import APIError, BadRequest
from ..provider.anthropic import CHAT_USAGE_FIELDS
from ..provider.parser import ContentPart, Delta, Extras, Reasoning, Refusal, ToolCallDelta
from ..settings import Settings
from .formats import AnswerFormat, hold
from .validation import ProviderRequest, chat_payload

__all__ = [
    "MessagesAnswer",
    "MessagesEvents",
    "anthropic_error",
    "chat_form",
    "error_response",
    "messages_body",
]

# The Messages fields the gateway takes; any other is ignored and not forwarded.
_FIELDS = (
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "metadata",
    "service_tier",
)
# The shape of each optional field (its content is the provider's to judge, or the
# translation's).
_SHAPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "system": ((str, list), "a string or a list of text blocks"),
    "stop_sequences": (list, "a list of strings"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "top_k": (int, "an integer"),
    "tools": (list, "a list of tools"),
    "tool_choice": (dict, "an object"),
    "thinking": (dict, "an object"),
    "metadata": (dict, "an object"),
    "service_tier": (str, "a string"),
}
# Chat Completions' finish reasons back as Messages' stop reasons.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
# What a stream a Stop ended says: no stop reason of Anthropic's means "stopped by the
# client"; the gateway's report beside it says why.
CANCELLED = "cancelled"
# Anthropic's error types by status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
# A thinking budget as reasoning_effort, for an OpenAI-compatible provider.
_EFFORTS = ((2048, "low"), (8192, "medium"))


def anthropic_error(status: int, code: str, message: str) -> dict[str, object]:
    """Anthropic's error envelope; ``code`` is the gateway's own (docs/api.md)."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message, "code": code}}


def _failure(outcome: Failed) -> dict[str, object]:
    """A failed answer's envelope: ``overloaded_error`` when the provider said it was
    (its in-stream error, or its 529's body), as Anthropic itself would."""
    overloaded = (outcome.provider_error or {}).get("type") == "overloaded_error"
    kind = "overloaded_error" if overloaded else "api_error"
    error = {"type": kind, "message": outcome.message, "code": outcome.code}
    return {"type": "error", "error": error}


def error_response(exc: APIError) -> JSONResponse:
    body = anthropic_error(exc.status_code, exc.code, exc.message)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _fail(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_body")


def messages_body(body: object, settings: Settings) -> tuple[dict[str, Any], bool]:
    """The client's Messages request, its known fields as sent (checked); and
    ``stream``."""
    if not isinstance(body, dict):
        raise _fail("the body must be a JSON object")
    model = body.get("model", settings.model)
    if not isinstance(model, str) or not 0 < len(model) <= 256:
        raise _fail("model must be a string of 1 to 256 characters")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages must be a non-empty list")
    if len(messages) > settings.max_messages:
        raise _fail(f"messages must have at most {settings.max_messages} entries")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _fail(f"messages[{i}] must be an object with role user or assistant")
        content = message.get("content")
        if not isinstance(content, str) and not (
            isinstance(content, list) and all(isinstance(b, dict) for b in content)
        ):
            raise _fail(f"messages[{i}].content must be a string or a list of blocks")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _fail("max_tokens must be a positive integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _fail("stream must be true or false")
    for name, (kinds, what) in _SHAPES.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise _fail(f"{name} must be {what}")
    native = {name: body[name] for name in _FIELDS if name in body}
    native["model"] = model
    native["stream"] = True  # the provider is always streamed from
    return native, stream


def chat_form(native: Mapping[str, Any], settings: Settings) -> ProviderRequest:
    """The Chat Completions request for a Messages one, checked as any
    ``/v1/chat/completions`` body is; ``BadRequest`` (``not_translatable``) naming what
    has no Chat Completions form. Thinking blocks and ``cache_control`` hints in the
    history are left out: they are Claude's own (docs/api.md)."""
    messages: list[dict[str, Any]] = []
    system = native.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system, "system")})
    for i, turn in enumerate(native["messages"]):
        where = f"messages[{i}]"
        content = turn["content"]
        if turn["role"] == "assistant":
            messages.append(_assistant(content, where))
            continue
        if isinstance(content, str):
            messages.append({"role": "user", "content": content})
            continue
        blocks = content
        parts: list[dict[str, Any]] = []
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "tool_result":
                result = block.get("content", "")
                text = _text(result, f"{where}.content[{j}].content")
                messages.append(
                    {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
                )
            elif kind == "text":
                parts.append({"type": "text", "text": block.get("text")})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": _image(block, where, j)}})
            else:
                raise _untranslatable(f"{where}.content[{j}]", f"a {kind} block has no form there")
        if parts:
            messages.append({"role": "user", "content": parts})
    body: dict[str, Any] = {"model": native["model"], "messages": messages}
    body["max_tokens"] = native["max_tokens"]
    for name, target in (("temperature", "temperature"), ("top_p", "top_p")):
        if name in native:
            body[target] = native[name]
    if "top_k" in native:
        raise _untranslatable("top_k", "Chat Completions has none")
    if native.get("stop_sequences"):
        body["stop"] = native["stop_sequences"]
    user = (native.get("metadata") or {}).get("user_id")
    if user is not None:
        body["user"] = user
    _tools(native, body)
    thinking = native.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise _fail("thinking.budget_tokens must be an integer")
        body["reasoning_effort"] = next((e for b, e in _EFFORTS if budget <= b), "high")
    return chat_payload(body, settings)


def _untranslatable(field: str, what: str) -> BadRequest:
    return BadRequest(
        f"{field} cannot be sent to an OpenAI-compatible provider: {what}",
        code="not_translatable",
    )


def _text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise _untranslatable(f"{where}[{j}]", "only text blocks are taken here")
            texts.append(_string(block.get("text"), f"{where}[{j}].text"))
        return "\n\n".join(texts)
    raise _fail(f"{where} must be a string or a list of text blocks")


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{where} must be a string")
    return value


def _image(block: Mapping[str, Any], where: str, j: int) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if isinstance(source, dict) and source.get("type") == "url":
        return str(source.get("url"))
    raise _untranslatable(
        f"{where}.content[{j}].source", "an image source of that type has no form there"
    )


def _assistant(content: object, where: str) -> dict[str, Any]:
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    assert isinstance(blocks, list)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            texts.append(_string(block.get("text"), f"{where}.content[{j}].text"))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            function = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        elif kind not in ("thinking", "redacted_thinking"):
            raise _untranslatable(f"{where}.content[{j}]", f"a {kind} block has no form there")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _tools(native: Mapping[str, Any], body: dict[str, Any]) -> None:
    tools = native.get("tools")
    if tools:
        out = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
                raise _untranslatable(f"tools[{i}]", "a server tool is Anthropic's to run")
            function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
            if "description" in tool:
                function["description"] = tool["description"]
            out.append({"type": "function", "function": function})
        body["tools"] = out
    choice = native.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            body["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "any", "none"):
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        if choice.get("disable_parallel_tool_use"):
            body["parallel_tool_calls"] = False


def _usage(session: Session) -> dict[str, object]:
    """The answer's usage in Messages' fields: as an Anthropic provider sent it, or
    from an OpenAI-compatible one's."""
    usage, _ = reported_usage(session)
    if not usage:
        return {"input_tokens": 0, "output_tokens": 0}
    if "output_tokens" in usage:
        # An Anthropic provider's: its own fields (the numbers), less those added for
        # Chat Completions' clients.
        return {k: v for k, v in usage.items() if k not in CHAT_USAGE_FIELDS}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt = usage.get("prompt_tokens")
    out: dict[str, object] = {
        "input_tokens": prompt - cached if isinstance(prompt, int) and cached else prompt,
        "output_tokens": usage.get("completion_tokens"),
    }
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _stop(session: Session) -> dict[str, str | None]:
    """``stop_reason`` and ``stop_sequence``: an Anthropic provider's own, else from
    the finish reason; ``cancelled`` for a stopped answer."""
    outcome = session.outcome
    if not isinstance(outcome, Completed):
        return {"stop_reason": CANCELLED, "stop_sequence": None}
    if outcome.native_stop is not None:
        return outcome.native_stop
    reason = _STOP_REASONS.get(outcome.finish_reason or "stop", "end_turn")
    return {"stop_reason": reason, "stop_sequence": None}


def _report(session: Session) -> dict[str, object] | None:
    """The gateway's report on the answer: why it was stopped (its ``stopped``
    event's data), who served it (with GATEWAY_CONFIG)."""
    if isinstance(session.outcome, Stopped):
        _, data = terminal_event(session)
        return {k: v for k, v in data.items() if k not in ("status", "first_delta_ms")}
    return routing_report(session) if session.routed else None


_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"text_delta","text":%s}}\n\n'
)


class _MessagesFormat(AnswerFormat):
    def error(self, exc: APIError) -> JSONResponse:
        return error_response(exc)


class MessagesEvents(_MessagesFormat):
    """``POST /v1/messages`` with ``stream: true``: ``message_start``, content blocks
    (text, thinking with its signature, tool_use with its input in pieces, and an
    Anthropic provider's other blocks as it sent them), ``message_delta`` (with the
    gateway's report when a Stop ended it) and ``message_stop``; a provider failure is
    Anthropic's ``error`` event."""

    def __init__(self) -> None:
        self._block: str | None = None
        self._index = -1
        # A tool call's index → its block's.
        self._calls: dict[int, int] = {}

    @staticmethod
    def _event(kind: str, data: dict[str, object]) -> bytes:
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), json_text(data).encode())

    def start(self, session: Session) -> bytes:
        message: dict[str, object] = {
            "id": f"msg_{session.id}",
            "type": "message",
            "role": "assistant",
            "model": session.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return self._event("message_start", {"type": "message_start", "message": message})

    def _open(self, kind: str, block: dict[str, object]) -> bytes:
        out = self._close()
        self._block = kind
        self._index += 1
        start = {"type": "content_block_start", "index": self._index, "content_block": block}
        return out + self._event("content_block_start", start)

    def _close(self) -> bytes:
        if self._block is None:
            return b""
        self._block = None
        stop = {"type": "content_block_stop", "index": self._index}
        return self._event("content_block_stop", stop)

    def _delta(self, delta: dict[str, object]) -> bytes:
        data = {"type": "content_block_delta", "index": self._index, "delta": delta}
        return self._event("content_block_delta", data)

    def contents(self, session: Session, texts: list[str]) -> bytes:
        out = b"" if self._block == "text" else self._open("text", {"type": "text", "text": ""})
        # The hot path: one format, as _delta would write it.
        index = self._index
        return out + b"".join(_TEXT_DELTA % (index, json_string(text)) for text in texts)

    def delta(self, session: Session, delta: Delta) -> bytes:
        if isinstance(delta, Refusal):
            return self.contents(session, [delta.text])
        if isinstance(delta, Reasoning):
            out = b""
            if self._block != "thinking":
                out = self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            return out + self._delta({"type": "thinking_delta", "thinking": delta.text})
        if isinstance(delta, ToolCallDelta):
            out = b""
            if delta.index not in self._calls:
                block: dict[str, object] = {"type": "tool_use", "id": delta.id}
                block.update(name=delta.name, input={}, **(delta.extras or {}))
                out = self._open("tool_use", block)
                self._calls[delta.index] = self._index
            if not delta.arguments:
                return out
            if self._calls[delta.index] != self._index:
                return out  # a call's pieces interleaved with another's: not Messages'
            return out + self._delta({"type": "input_json_delta", "partial_json": delta.arguments})
        if isinstance(delta, ContentPart):
            return b""
        assert isinstance(delta, Extras)
        return self._extras(delta)

    def _extras(self, extras: Extras) -> bytes:
        """An Anthropic provider's signature, citations and other blocks (a server
        tool's use and result, redacted thinking), as sent, their deltas in them;
        another provider's extras have no place in Messages."""
        given = extras.delta or {}
        block = given.get("content_block")
        if isinstance(block, dict):
            # Open until the next block: a server tool's input comes in its deltas.
            return self._open("block", block)
        kind = given.get("type")
        if kind == "citations_delta":
            out = b""
            if self._block != "text":
                out = self._open("text", {"type": "text", "text": "", "citations": []})
            return out + self._delta(given)
        if (kind == "signature_delta" and self._block == "thinking") or (
            kind == "input_json_delta" and self._block == "block"
        ):
            return self._delta(given)
        return b""

    def terminal(self, session: Session) -> bytes:
        outcome = session.outcome
        if isinstance(outcome, Failed):
            error = _failure(outcome)
            return self._close() + self._event("error", error)
        data: dict[str, object] = {
            "type": "message_delta",
            "delta": _stop(session),
            "usage": _usage(session),
        }
        report = _report(session)
        if report is not None:
            data["gateway"] = report
        end = self._event("message_stop", {"type": "message_stop"})
        return self._close() + self._event("message_delta", data) + end


class MessagesAnswer(_MessagesFormat):
    """``POST /v1/messages`` without ``stream``: the provider still streams (so a
    client that leaves still stops it), and the ``message`` is assembled here,
    bounded by ``GATEWAY_MAX_ANSWER_BYTES``."""

    streaming = False
    media_type = b"application/json"

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._content: list[dict[str, Any]] = []
        self._calls: dict[int, dict[str, Any]] = {}

    def _hold(self, text: str) -> None:
        self._bytes = hold(self._bytes, text, self._max_bytes)

    def start(self, session: Session) -> bytes:
        return b""

    def _append(self, kind: str, field: str, text: str) -> None:
        self._hold(text)
        last = self._content[-1] if self._content else None
        if last is not None and last["type"] == kind:
            last[field] += text
        else:
            block = {"type": kind, field: text}
            if kind == "thinking":
                block["signature"] = ""
            self._content.append(block)

    def contents(self, session: Session, texts: list[str]) -> bytes:
        for text in texts:
            self._append("text", "text", text)
        return b""

    def delta(self, session: Session, delta: Delta) -> bytes:
        if isinstance(delta, Refusal):
            self._append("text", "text", delta.text)
        elif isinstance(delta, Reasoning):
            self._append("thinking", "thinking", delta.text)
        elif isinstance(delta, ToolCallDelta):
            call = self._calls.get(delta.index)
            if call is None:
                call = {"type": "tool_use", "id": delta.id, "name": delta.name, "input": ""}
                call.update(delta.extras or {})
                self._calls[delta.index] = call
                self._content.append(call)
            self._hold(delta.arguments)
            call["input"] += delta.arguments
        elif isinstance(delta, Extras):
            given = delta.delta or {}
            last = self._content[-1] if self._content else None
            block = given.get("content_block")
            if isinstance(block, dict):
                self._content.append(dict(block))
            elif given.get("type") == "signature_delta" and last and last["type"] == "thinking":
                last["signature"] += str(given.get("signature", ""))
        return b""

    def status(self, session: Session) -> int:
        outcome = session.outcome
        if isinstance(outcome, Failed):
            return 500 if outcome.code == "internal_error" else 502
        return 200

    def terminal(self, session: Session) -> bytes:
        outcome = session.outcome
        if isinstance(outcome, Failed):
            return json_text(_failure(outcome)).encode()
        for call in self._calls.values():
            try:
                call["input"] = json.loads(call["input"] or "{}")
            except ValueError:
                call["input"] = {}  # a stop cut it short: what there is has no JSON form
        message: dict[str, object] = {
            "id": f"msg_{session.id}",
            "type": "message",
            "role": "assistant",
            "model": session.model,
            "content": self._content,
            **_stop(session),
            "usage": _usage(session),
        }
        report = _report(session)
        if report is not None:
            message["gateway"] = report
        return json_text(message).encode()

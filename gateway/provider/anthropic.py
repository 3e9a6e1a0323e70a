"""Anthropic's Messages API as a provider (``kind = "anthropic"``, docs/routing.md).

Two directions: a Chat Completions request (what the gateway's surfaces take, checked
by web/validation.py) becomes a Messages request (``messages_request``), and the
Messages stream becomes the gateway's deltas (``AnthropicStreamParser``, the same
``feed()`` as the OpenAI parser's, so the relay reads either alike).

What has no faithful translation is refused with a 400 naming the field: nothing a
client sent is dropped without a word.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from ..errors import BadRequest, UpstreamProtocolError
from .parser import (
    MAX_LINE_BYTES,
    Extras,
    ParsedChunk,
    ProviderStreamParser,
    Reasoning,
    ToolCallDelta,
    decode_json,
    fits,
    known_error,
    numbers_only,
)

__all__ = [
    "CHAT_USAGE_FIELDS",
    "STOP_REASONS",
    "THINKING_BUDGETS",
    "AnthropicStreamParser",
    "chat_usage",
    "messages_request",
]

# Messages' stop reasons, as Chat Completions' finish reasons.
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# ``reasoning_effort`` as a thinking budget, in tokens (Anthropic's minimum is 1024).
THINKING_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}
_NO_THINKING = ("none", "minimal")
# Identifiers a provider may name its stop reason with; a stop sequence's length.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_STOP_SEQUENCE = 1024
# A tool_use block's fields the gateway reads itself.
_TOOL_USE_FIELDS = frozenset({"type", "id", "name", "input"})
# What chat_usage adds to Anthropic's usage.
CHAT_USAGE_FIELDS = frozenset(
    {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    }
)
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def _refuse(field: str, why: str) -> BadRequest:
    return BadRequest(
        f"{field} cannot be sent to an Anthropic provider: {why}", code="not_translatable"
    )


def messages_request(payload: Mapping[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
    """The Messages request for a checked Chat Completions ``payload``; ``max_tokens``
    when the client gave none (Anthropic requires one). ``BadRequest`` naming the first
    field that cannot be translated."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(payload["messages"]):
        where = f"messages[{i}]"
        role = message["role"]
        if "name" in message:
            raise _refuse(f"{where}.name", "Messages has no names on turns")
        if role in ("system", "developer"):
            if turns:
                raise _refuse(where, f"a {role} message after the conversation began")
            system += _text_blocks(message["content"], f"{where}.content")
            continue
        if role == "assistant":
            blocks = _assistant(message, where)
            if blocks:
                _append(turns, "assistant", blocks)
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": message["tool_call_id"],
                "content": _text_blocks(message["content"], f"{where}.content"),
            }
            _append(turns, "user", [result])
        else:
            _append(turns, "user", _user_blocks(message["content"], f"{where}.content"))
    request: dict[str, Any] = {"model": model, "messages": turns, "stream": True}
    if system:
        request["system"] = system
    limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
    request["max_tokens"] = int(limit) if limit is not None else max_tokens
    _options(payload, request)
    return request


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # Tool results after one assistant turn go back in one user turn, as Messages wants.
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"] += blocks
    else:
        turns.append({"role": role, "content": list(blocks)})


def _text_blocks(content: object, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    assert isinstance(content, list)  # checked by the validation
    for j, part in enumerate(content):
        if part.get("type") != "text":
            raise _refuse(f"{where}[{j}]", "only text parts are taken here")
        blocks.append({"type": "text", "text": part["text"]})
    return blocks


def _user_blocks(content: object, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    assert isinstance(content, list)
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part["image_url"]["url"], f"{where}[{j}].image_url.url"))
        else:
            raise _refuse(f"{where}[{j}]", f"a {kind} part has no Messages form here")
    return blocks


def _image(url: str, where: str) -> dict[str, Any]:
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    head, comma, data = url.partition(",")
    media_type = head.removeprefix("data:").removesuffix(";base64")
    if not (comma and head.startswith("data:") and head.endswith(";base64")):
        raise _refuse(where, "an image must be an http(s) URL or a base64 data: URL")
    if media_type not in _IMAGE_TYPES:
        raise _refuse(where, f"images must be one of {', '.join(_IMAGE_TYPES)}")
    try:
        base64.b64decode(data, validate=True)
    except binascii.Error:
        raise _refuse(where, "the data: URL is not base64") from None
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    if message.get("reasoning_content"):
        raise _refuse(
            f"{where}.reasoning_content", "Anthropic's thinking blocks need their signature"
        )
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            text = part.get("text") if part.get("type") == "text" else part.get("refusal")
            if not isinstance(text, str):
                raise _refuse(f"{where}.content[{j}]", "not a text or refusal part")
            blocks.append({"type": "text", "text": text})
    for k, call in enumerate(message.get("tool_calls") or ()):
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"] or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise _refuse(
                f"{where}.tool_calls[{k}].function.arguments", "tool input must be a JSON object"
            )
        blocks.append(
            {"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments}
        )
    return blocks


def _options(payload: Mapping[str, Any], request: dict[str, Any]) -> None:
    for name in ("seed", "presence_penalty", "frequency_penalty", "logit_bias"):
        if name in payload:
            raise _refuse(name, "Messages has no such option")
    if payload.get("n", 1) != 1:
        raise _refuse("n", "Messages answers once")
    response_format = payload.get("response_format")
    if response_format is not None and response_format.get("type") != "text":
        raise _refuse("response_format", "use a tool with an input schema instead")
    temperature = payload.get("temperature")
    if temperature is not None:
        if temperature > 1:
            raise _refuse("temperature", "Anthropic's range is 0 to 1")
        request["temperature"] = temperature
    if "top_p" in payload:
        request["top_p"] = payload["top_p"]
    stop = payload.get("stop")
    if stop is not None:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if "user" in payload:
        request["metadata"] = {"user_id": payload["user"]}
    tools = payload.get("tools")
    if tools:
        request["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = _tool_choice(payload.get("tool_choice"))
    if payload.get("parallel_tool_calls") is False:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        request["tool_choice"] = choice
    _thinking(payload, request)


def _tool(tool: Mapping[str, Any], where: str) -> dict[str, Any]:
    function = tool["function"]
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise _refuse(f"{where}.function.{unknown[0]}", "Messages tools have no such field")
    out: dict[str, Any] = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if "description" in function:
        out["description"] = function["description"]
    if "strict" in function:
        out["strict"] = function["strict"]
    return out


def _tool_choice(choice: object) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    assert isinstance(choice, dict)
    return {"type": "tool", "name": choice["function"]["name"]}


def _thinking(payload: Mapping[str, Any], request: dict[str, Any]) -> None:
    """``thinking`` as the client sent it (Anthropic's own field), else from
    ``reasoning_effort``; a budget needs ``max_tokens`` above it and no temperature."""
    thinking = payload.get("thinking")
    effort = payload.get("reasoning_effort")
    if thinking is None and effort is not None and effort not in _NO_THINKING:
        budget = THINKING_BUDGETS.get(effort)
        if budget is None:
            known = ", ".join([*THINKING_BUDGETS, *_NO_THINKING])
            raise _refuse("reasoning_effort", f"one of {known} is translated")
        thinking = {"type": "enabled", "budget_tokens": budget}
    if thinking is None:
        return
    request["thinking"] = thinking
    budget = thinking.get("budget_tokens")
    if isinstance(budget, int | float) and request["max_tokens"] <= budget:
        field = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
        raise _refuse(field, f"with thinking it must be above the budget ({budget} tokens)")
    if "temperature" in request and thinking.get("type") == "enabled":
        raise _refuse("temperature", "Anthropic does not take it with thinking on")


# The token path: a content_block_delta of text, thinking or tool input, its shape
# checked in C as msgspec decodes it. Any other event, or a delta of another type,
# fails this decoding and is read untyped (``_event``), as every event could be.
class _Text(msgspec.Struct, tag="text_delta", tag_field="type", gc=False):
    text: str


class _Thinking(msgspec.Struct, tag="thinking_delta", tag_field="type", gc=False):
    thinking: str


class _Json(msgspec.Struct, tag="input_json_delta", tag_field="type", gc=False):
    partial_json: str


class _BlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type", gc=False):
    index: int
    delta: _Text | _Thinking | _Json


_decode_delta = msgspec.json.Decoder(_BlockDelta).decode
# One read holding one content_block_delta event: the common read.
_DELTA_EVENT = b"event: content_block_delta\ndata: "


class AnthropicStreamParser(ProviderStreamParser):
    """A Messages stream (``message_start``, content blocks, ``message_delta``,
    ``message_stop``) as the gateway's deltas: text, ``Reasoning`` (thinking), and
    ``ToolCallDelta`` (a ``tool_use`` block's id and name, then its input JSON in
    pieces), in the provider's order. Signatures, citations, redacted thinking and
    blocks the gateway does not model come as ``Extras``. ``ping`` is a keep-alive, and
    an ``error`` event fails the stream. The SSE framing (lines, ``event:`` lines, CRs,
    bounds) is the OpenAI parser's."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        super().__init__(max_line_bytes)
        # A tool_use block's index in the message → its tool call's index (0, 1, ...).
        self._tools: dict[int, int] = {}
        self._usage: dict[str, object] = {}

    def feed(self, data: bytes) -> ParsedChunk:
        if (
            data.startswith(_DELTA_EVENT)
            and data.endswith(b"\n\n")
            and data.count(b"\n") == 3
            and not self._buffer
            and not self._data
            and not self._skip_lf
            and self.error is None
            and not self.done
            and b"\r" not in data
            and len(data) <= self._max
        ):
            try:
                event = _decode_delta(data[len(_DELTA_EVENT) : -2])
            except (ValueError, RecursionError):
                pass  # another event's shape, or JSON only json reads: the whole way
            else:
                out = ParsedChunk()
                self._typed(event, out)
                return out
        return super().feed(data)

    def _typed(self, event: _BlockDelta, out: ParsedChunk) -> None:
        """``_delta``'s reading, on a delta whose shape msgspec has checked."""
        delta = event.delta
        if type(delta) is _Text:
            if delta.text:
                out.deltas.append(delta.text)
        elif type(delta) is _Thinking:
            out.plain = False
            if delta.thinking:
                out.deltas.append(Reasoning(delta.thinking, "reasoning_content"))
        else:
            assert type(delta) is _Json
            out.plain = False
            call = self._tools.get(event.index)
            if call is None:
                # A server tool's input: as sent, as _delta passes it.
                given: dict[str, object] = {"type": "input_json_delta"}
                given["partial_json"] = delta.partial_json
                if fits(given):
                    out.deltas.append(Extras(delta=given))
            elif delta.partial_json:
                out.deltas.append(ToolCallDelta(call, None, None, delta.partial_json))

    def _event(self, data: str, out: ParsedChunk) -> None:
        if self.done:
            return
        try:
            typed = _decode_delta(data)
        except (ValueError, RecursionError):
            pass
        else:
            self._typed(typed, out)
            return
        event = decode_json(data)
        if not isinstance(event, dict):
            raise UpstreamProtocolError("provider sent an event that is not a JSON object")
        kind = event.get("type")
        if kind == "content_block_delta":
            self._delta(_object(event.get("delta"), "delta"), event.get("index"), out)
        elif kind == "content_block_start":
            self._start(_object(event.get("content_block"), "content_block"), event, out)
        elif kind == "message_start":
            usage = _object(event.get("message"), "message").get("usage")
            if isinstance(usage, dict):
                self._usage.update(numbers_only(usage))
        elif kind == "message_delta":
            given = event.get("delta")
            delta = given if isinstance(given, dict) else {}
            reason = delta.get("stop_reason")
            if reason is not None:
                out.finish_reason = (
                    STOP_REASONS.get(reason, "other") if isinstance(reason, str) else "other"
                )
                self.native_stop = _native_stop(reason, delta)
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._usage.update(numbers_only(usage))
                out.usage = chat_usage(self._usage)
        elif kind == "message_stop":
            self.done = out.done = True
        elif kind == "error":
            raise known_error(event.get("error"))
        # ping (a keep-alive), content_block_stop, and event types added later: nothing.

    def _delta(self, delta: dict[str, Any], index: object, out: ParsedChunk) -> None:
        kind = delta.get("type")
        if kind == "text_delta":
            text = _string(delta.get("text"), "text")
            if text:
                out.deltas.append(text)
            return
        out.plain = False
        if kind == "thinking_delta":
            thinking = _string(delta.get("thinking"), "thinking")
            if thinking:
                out.deltas.append(Reasoning(thinking, "reasoning_content"))
        elif kind == "input_json_delta" and isinstance(index, int) and index in self._tools:
            piece = _string(delta.get("partial_json"), "partial_json")
            if piece:
                out.deltas.append(ToolCallDelta(self._tools[index], None, None, piece))
        elif fits(delta):
            # signature_delta, citations_delta, a server tool's input (web search's
            # query: the provider runs it, not the client), and kinds added later.
            out.deltas.append(Extras(delta=delta))

    def _start(self, block: dict[str, Any], event: dict[str, Any], out: ParsedChunk) -> None:
        kind = block.get("type")
        if kind == "text":
            text = _string(block.get("text", ""), "text")
            if text:
                out.deltas.append(text)
            return
        out.plain = False
        if kind == "thinking":
            thinking = _string(block.get("thinking", ""), "thinking")
            if thinking:
                out.deltas.append(Reasoning(thinking, "reasoning_content"))
        elif kind == "tool_use":
            index = event.get("index")
            if not isinstance(index, int) or index in self._tools:
                raise UpstreamProtocolError("provider sent a tool_use block without a new index")
            call = self._tools[index] = len(self._tools)
            given = block.get("input")
            # Usually empty, its JSON following in pieces; some answers hold it whole.
            arguments = json.dumps(given) if isinstance(given, dict) and given else ""
            # The block's other fields (who called it: ``caller``), as sent.
            extras = {k: v for k, v in block.items() if k not in _TOOL_USE_FIELDS}
            out.deltas.append(
                ToolCallDelta(
                    call,
                    _name(block.get("id"), "id"),
                    _name(block.get("name"), "name"),
                    arguments,
                    extras if extras and fits(extras) else None,
                )
            )
        elif fits(block):
            # redacted_thinking, server tools' blocks and results: as sent.
            out.deltas.append(Extras(delta={"content_block": block}))


def chat_usage(usage: Mapping[str, object]) -> dict[str, object]:
    """Messages' usage with Chat Completions' fields added: ``prompt_tokens`` counts the
    cache's tokens too (as OpenAI's does), ``cached_tokens`` the cache reads, and
    ``reasoning_tokens`` the thinking when the provider says. Anthropic's own fields stay."""
    out = dict(usage)

    def count(name: str) -> int:
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    prompt = (
        count("input_tokens")
        + count("cache_creation_input_tokens")
        + count("cache_read_input_tokens")
    )
    out["prompt_tokens"] = prompt
    out["completion_tokens"] = count("output_tokens")
    out["total_tokens"] = prompt + count("output_tokens")
    out["prompt_tokens_details"] = {"cached_tokens": count("cache_read_input_tokens")}
    details = usage.get("output_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("thinking_tokens"), int):
        out["completion_tokens_details"] = {"reasoning_tokens": details["thinking_tokens"]}
    return out


def _native_stop(reason: object, delta: Mapping[str, object]) -> dict[str, str | None] | None:
    """Claude's own stop reason, and the stop sequence it met (one of the client's),
    for /v1/messages, when they are short text; ``None`` otherwise."""
    sequence = delta.get("stop_sequence")
    if not isinstance(reason, str) or not _IDENTIFIER.fullmatch(reason):
        return None
    if not (isinstance(sequence, str) and len(sequence) <= _MAX_STOP_SEQUENCE):
        sequence = None
    return {"stop_reason": reason, "stop_sequence": sequence}


def _object(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"provider sent a {name} that is not an object")
    return value


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise UpstreamProtocolError(f"provider sent {name} that is not text")
    return value


def _name(value: object, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise UpstreamProtocolError(f"provider sent a tool_use {name} that is not short text")
    return value

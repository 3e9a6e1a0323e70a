"""What a chat request may hold, checked before any session exists; and the rules the
OpenAPI description is built from (openapi.py), so that the two cannot drift apart.

Every refusal is a ``BadRequest`` (400) naming the field, or 408/413/415 for the body
itself.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections.abc import Callable
from typing import NoReturn, Required, TypedDict

import anyio
from starlette.requests import ClientDisconnect, Request

from ..core.registry import SESSION_ID_CHARS, SESSION_ID_RE
from ..errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from ..settings import Settings

__all__ = [
    "FORWARDED_FIELDS",
    "IMAGE_DETAILS",
    "MAX_MODEL_CHARS",
    "MAX_SHORT_CHARS",
    "MAX_STOP",
    "MAX_TOOLS",
    "MESSAGE_FIELDS",
    "PART_REQUIRED",
    "PART_STRINGS",
    "PART_TYPES",
    "PENALTY",
    "RESPONSE_FORMATS",
    "ROLES",
    "TEMPERATURE",
    "TOOL_CHOICES",
    "TOOL_NAME_PATTERN",
    "TOP_P",
    "ProviderRequest",
    "chat_payload",
    "json_body",
    "new_session_id",
    "session_id_from",
    "stream_options",
]

logger = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
# The content part types each role may send (OpenAI's Chat Completions API).
PART_TYPES = {
    "system": ("text",),
    "developer": ("text",),
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
    "tool": ("text",),
}
# A non-text part's object: its string fields, and those of which it needs one.
PART_STRINGS = {
    "image_url": ("url", "detail"),
    "input_audio": ("data", "format"),
    "file": ("file_data", "file_id", "filename"),
}
PART_REQUIRED = {
    "image_url": ("url",),
    "input_audio": ("data",),
    "file": ("file_data", "file_id"),
}
IMAGE_DETAILS = ("auto", "low", "high")
# The message fields kept besides role and content, per role.
MESSAGE_FIELDS = {
    "system": ("name",),
    "developer": ("name",),
    "user": ("name",),
    # DeepSeek's thinking mode wants its reasoning_content back within a tool-call loop.
    "assistant": ("name", "tool_calls", "reasoning_content"),
    "tool": ("tool_call_id",),
}
TOOL_CHOICES = ("none", "auto", "required")
TOOL_NAME_PATTERN = "^[A-Za-z0-9_-]{1,64}$"
TOOL_NAME_RE = re.compile(TOOL_NAME_PATTERN)
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_TOOLS = 128
MAX_STOP = 4
MAX_SHORT_CHARS = 256
TEMPERATURE = (0, 2)
TOP_P = (0, 1)
PENALTY = (-2, 2)
# Real model names are short; a longer one is a mistake or an attack on the logs.
MAX_MODEL_CHARS = 256


class ProviderRequest(TypedDict, total=False):
    """The request the provider is sent: the client's known fields, checked; besides
    these four, any of ``FORWARDED_FIELDS``, as the client sent it."""

    model: Required[str]
    messages: Required[list[dict[str, object]]]
    stream: Required[bool]
    stream_options: Required[dict[str, bool]]


def last_event_id_from(value: str | None) -> int:
    """A resume's ``Last-Event-ID``: the id of the last event the client has; none
    means it has none (0)."""
    if value is None or not value.strip():
        return 0
    value = value.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise BadRequest(
            "Last-Event-ID must be the id of an event of this stream (a number)",
            code="invalid_last_event_id",
        )
    return int(value)


def session_id_from(value: str | None) -> str:
    if value is None:
        raise BadRequest("the X-Session-Id header is required", code="missing_session_id")
    if not SESSION_ID_RE.fullmatch(value):
        raise BadRequest(
            f"X-Session-Id must be {SESSION_ID_CHARS[0]}-{SESSION_ID_CHARS[1]} characters "
            "of A-Z a-z 0-9 _ . : -",
            code="invalid_session_id",
        )
    return value


async def json_body(request: Request, limit: int, within: float) -> object:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType("the request body must be application/json")
    too_large = PayloadTooLarge(f"the request body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else None
    if length is not None and length > limit:
        raise too_large  # answered before reading a byte of it
    body = bytearray()
    receive = request.receive
    with anyio.move_on_after(within) as scope:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            body += message.get("body", b"")
            if len(body) > limit:
                raise too_large
            # Whole once its Content-Length is there: the server's "no more body"
            # message is not waited for (under Trio, one scheduling round on the
            # first token's path; docs/benchmarks.md, "The first token").
            if not message.get("more_body", False) or len(body) == length:
                break
    if scope.cancelled_caught:
        logger.info("request body not received within %gs: answered 408", within)
        # The rest of the body may still come: the connection cannot be reused.
        raise RequestTimeout(
            f"the request body did not arrive within {within:g} seconds",
            headers={"connection": "close"},
        )
    try:
        return json.loads(body)
    except ValueError:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply", code="invalid_json") from None


def chat_payload(body: object, settings: Settings) -> ProviderRequest:
    """Validate the client's body and build the provider request: the known fields, each
    as the client sent it; unknown fields are left out."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", code="invalid_body")
    if len(messages) > settings.max_messages:
        raise BadRequest(
            f"messages must have at most {settings.max_messages} entries", code="invalid_body"
        )
    clean = [_message(m, f"messages[{i}]", settings) for i, m in enumerate(messages)]
    model = body.get("model", settings.model)
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string", code="invalid_body")
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"model is longer than {MAX_MODEL_CHARS} characters", code="invalid_body")
    _check_text(model, "model")
    payload: ProviderRequest = {
        "model": model,
        "messages": clean,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for name, value in body.items():  # in the client's order
        check = _FIELDS.get(name)
        if check is not None:
            check(value, name)
            _check_strings(value, name)
            payload[name] = value  # type: ignore[literal-required]
    return payload


def stream_options(body: object) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage`` of an OpenAI-style request (the
    endpoint's own options, not forwarded: the provider is always streamed from)."""
    assert isinstance(body, dict)  # chat_payload has checked
    stream = body.get("stream", False)
    if stream is not None:
        _boolean(stream, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            _fail("stream_options must be an object")
        include_usage = options.get("include_usage", False)
        if include_usage is not None:
            _boolean(include_usage, "stream_options.include_usage")
    return bool(stream), bool(include_usage)


def new_session_id() -> str:
    """For an OpenAI-style request without ``X-Session-Id``: unguessable, so only the
    client that has it (from the ``x-session-id`` response header) can cancel."""
    return f"gw-{secrets.token_urlsafe(24)}"


def _fail(message: str) -> NoReturn:
    raise BadRequest(message, code="invalid_body")


def _message(message: object, where: str, settings: Settings) -> dict[str, object]:
    if not isinstance(message, dict):
        _fail(f"{where} must be an object")
    role = message.get("role")
    if role not in ROLES:
        _fail(f"{where}.role must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        _check_text(content, f"{where}.content")
        chars = len(content)
    elif isinstance(content, list) and content:
        chars = sum(_part(part, role, f"{where}.content[{j}]") for j, part in enumerate(content))
    elif content is None and role == "assistant" and message.get("tool_calls"):
        chars = 0
    else:
        _fail(
            f"{where}.content must be a string or a non-empty list of parts"
            + (" (or null beside tool_calls)" if role == "assistant" else "")
        )
    if chars > settings.max_message_chars:
        _fail(f"{where}.content is longer than {settings.max_message_chars} characters")
    kept = MESSAGE_FIELDS[role]
    for name in kept:
        if name in message:
            value = message[name]
            if name == "tool_calls":
                _assistant_tool_calls(value, f"{where}.tool_calls")
            elif not isinstance(value, str) or (name != "reasoning_content" and not value):
                _fail(f"{where}.{name} must be a string")
            _check_strings(value, f"{where}.{name}")
    if role == "tool" and "tool_call_id" not in message:
        _fail(f"{where}.tool_call_id is required on a tool message")
    # The known fields, in the client's order: what it sent, less what is unknown.
    return {k: v for k, v in message.items() if k in ("role", "content") or k in kept}


def _part(part: object, role: str, where: str) -> int:
    """Check one content part; its text's length counts towards the message's limit."""
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES[role]:
        _fail(f"{where} must be an object whose type is one of {', '.join(PART_TYPES[role])}")
    kind = part["type"]
    value = part.get(kind)
    if kind in ("text", "refusal"):
        if not isinstance(value, str):
            _fail(f"{where}.{kind} must be a string")
        _check_text(value, f"{where}.{kind}")
        return len(value)
    if not isinstance(value, dict):
        _fail(f"{where}.{kind} must be an object")
    for name in PART_STRINGS[kind]:
        if name in value and not isinstance(value[name], str):
            _fail(f"{where}.{kind}.{name} must be a string")
    required = PART_REQUIRED[kind]
    if not any(isinstance(value.get(name), str) and value[name] for name in required):
        _fail(f"{where}.{kind} needs a non-empty string {' or '.join(required)}")
    if kind == "image_url" and value.get("detail", "auto") not in IMAGE_DETAILS:
        _fail(f"{where}.image_url.detail must be one of {', '.join(IMAGE_DETAILS)}")
    _check_strings(value, f"{where}.{kind}")
    return 0


def _assistant_tool_calls(value: object, where: str) -> None:
    if not isinstance(value, list) or not value:
        _fail(f"{where} must be a non-empty list")
    for k, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or call.get("type", "function") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            _fail(
                f"{where}[{k}] must be "
                '{"id", "type": "function", "function": {"name", "arguments"}} with strings'
            )


def _tools(value: object, name: str) -> None:
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        _fail(f"{name} must be a list of at most {MAX_TOOLS} tools")
    for k, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not TOOL_NAME_RE.fullmatch(function["name"])
            or not isinstance(function.get("description", ""), str)
            or not isinstance(function.get("parameters", {}), dict)
            or not isinstance(function.get("strict", False), bool)
        ):
            _fail(
                f"{name}[{k}] must be "
                '{"type": "function", "function": {"name", "description"?, "parameters"?}} '
                f"with a name of {TOOL_NAME_PATTERN}"
            )


def _tool_choice(value: object, name: str) -> None:
    if value in TOOL_CHOICES:
        return
    function = value.get("function") if isinstance(value, dict) else None
    if (
        not isinstance(value, dict)
        or value.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        _fail(f'{name} must be one of {", ".join(TOOL_CHOICES)} or {{"type": "function", ...}}')


def _response_format(value: object, name: str) -> None:
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        _fail(f"{name} must be an object whose type is one of {', '.join(RESPONSE_FORMATS)}")
    if value["type"] == "json_schema" and not isinstance(value.get("json_schema"), dict):
        _fail(f"{name}.json_schema must be an object")


def _number(low: float, high: float) -> Callable[[object, str], None]:
    def check(value: object, name: str) -> None:
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            _fail(f"{name} must be a number from {low:g} to {high:g}")

    return check


def _positive_integer(value: object, name: str) -> None:
    # JSON has one number type: 5.0 is the integer 5 (as JSON Schema says too).
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(f"{name} must be a positive integer")


def _integer(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(f"{name} must be an integer")


def _boolean(value: object, name: str) -> None:
    if not isinstance(value, bool):
        _fail(f"{name} must be true or false")


def _stop(value: object, name: str) -> None:
    if isinstance(value, str):
        return
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_STOP
        or not all(isinstance(v, str) for v in value)
    ):
        _fail(f"{name} must be a string or a list of 1 to {MAX_STOP} strings")


def _logit_bias(value: object, name: str) -> None:
    check = _number(-100, 100)
    if not isinstance(value, dict):
        _fail(f"{name} must be an object of token ids to numbers")
    for key, bias in value.items():
        check(bias, f"{name}[{key!r}]" if len(str(key)) < 32 else name)


def _short_string(value: object, name: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_SHORT_CHARS:
        _fail(f"{name} must be a string of 1 to {MAX_SHORT_CHARS} characters")


def _thinking(value: object, name: str) -> None:
    """Anthropic's own ``thinking`` object (``{"type": "enabled", "budget_tokens": N}``),
    sent to Anthropic providers only (provider/routing.py)."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        _fail(f"{name} must be an object with a type, as Anthropic's")
    if "budget_tokens" in value:
        _positive_integer(value["budget_tokens"], f"{name}.budget_tokens")


def _one(value: object, name: str) -> None:
    if value != 1 or isinstance(value, bool):
        _fail(f"{name} must be 1: the gateway streams one answer")


def _check_strings(value: object, where: str) -> None:
    """Every string inside ``value`` must be sendable as UTF-8 (see ``_check_text``)."""
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_strings(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, where)


# The top-level fields forwarded to the provider, each with its check. Anything else
# in the body is ignored (docs/api.md).
_FIELDS: dict[str, Callable[[object, str], None]] = {
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "response_format": _response_format,
    "temperature": _number(*TEMPERATURE),
    "top_p": _number(*TOP_P),
    "max_tokens": _positive_integer,
    "max_completion_tokens": _positive_integer,
    "stop": _stop,
    "seed": _integer,
    "presence_penalty": _number(*PENALTY),
    "frequency_penalty": _number(*PENALTY),
    "logit_bias": _logit_bias,
    "reasoning_effort": _short_string,
    "thinking": _thinking,
    "user": _short_string,
    "n": _one,
}
FORWARDED_FIELDS = tuple(_FIELDS)


def _check_text(value: str, field: str) -> None:
    """Refuse text that cannot be sent as UTF-8: JSON's ``\\udfff`` escapes decode to lone
    surrogates, which no encoder after this point could write."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{field} is not valid Unicode text (it has a lone surrogate)", code="invalid_body"
        ) from None

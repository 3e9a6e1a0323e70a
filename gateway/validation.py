"""What a chat request may hold, checked before any session exists; and the rules the
OpenAPI description is built from (openapi.py), so that the two cannot drift apart.

Every refusal is a ``BadRequest`` (400) naming the field, or 408/413/415 for the body
itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from typing import NotRequired, TypedDict

import anyio
from starlette.requests import Request

from .errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from .settings import Settings

__all__ = [
    "MAX_MODEL_CHARS",
    "ROLES",
    "SESSION_ID_CHARS",
    "SESSION_ID_PATTERN",
    "SESSION_ID_RE",
    "TEMPERATURE",
    "ProviderRequest",
    "chat_payload",
    "json_body",
    "session_id_from",
]

logger = logging.getLogger(__name__)

# What a client may name its session: safe in a log line, a header and a Redis key.
SESSION_ID_CHARS = (8, 128)
SESSION_ID_PATTERN = rf"^[A-Za-z0-9_.:-]{{{SESSION_ID_CHARS[0]},{SESSION_ID_CHARS[1]}}}$"
SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
ROLES = ("system", "user", "assistant")
TEMPERATURE = (0, 2)
# Real model names are short; a longer one is a mistake or an attack on the logs.
MAX_MODEL_CHARS = 256


class ProviderRequest(TypedDict):
    """The request the provider is sent: the client's known fields, checked."""

    model: str
    messages: list[dict[str, str]]
    stream: bool
    stream_options: dict[str, bool]
    temperature: NotRequired[float]
    max_tokens: NotRequired[int]


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
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # answered before reading a byte of it
    body = bytearray()
    with anyio.move_on_after(within) as scope:
        async with contextlib.aclosing(request.stream()) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > limit:
                    raise too_large
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
    """Validate the client's body and build the provider request from known fields only."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", code="invalid_body")
    if len(messages) > settings.max_messages:
        raise BadRequest(
            f"messages must have at most {settings.max_messages} entries", code="invalid_body"
        )
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", code="invalid_body")
        if message.get("role") not in ROLES:
            raise BadRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}", code="invalid_body"
            )
        if not isinstance(message.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string", code="invalid_body")
        _check_text(message["content"], f"messages[{i}].content")
        if len(message["content"]) > settings.max_message_chars:
            raise BadRequest(
                f"messages[{i}].content is longer than {settings.max_message_chars} characters",
                code="invalid_body",
            )
        clean.append({"role": message["role"], "content": message["content"]})
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
    if "temperature" in body:
        temperature = body["temperature"]
        if (
            not isinstance(temperature, int | float)
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or not TEMPERATURE[0] <= temperature <= TEMPERATURE[1]
        ):
            raise BadRequest(
                f"temperature must be a number from {TEMPERATURE[0]} to {TEMPERATURE[1]}",
                code="invalid_body",
            )
        payload["temperature"] = temperature
    if "max_tokens" in body:
        max_tokens = body["max_tokens"]
        # JSON has one number type: 5.0 is the integer 5 (as JSON Schema says too).
        if isinstance(max_tokens, float) and max_tokens.is_integer():
            max_tokens = int(max_tokens)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens must be a positive integer", code="invalid_body")
        payload["max_tokens"] = max_tokens
    return payload


def _check_text(value: str, field: str) -> None:
    """Refuse text that cannot be sent as UTF-8: JSON's ``\\udfff`` escapes decode to lone
    surrogates, which no encoder after this point could write."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{field} is not valid Unicode text (it has a lone surrogate)", code="invalid_body"
        ) from None

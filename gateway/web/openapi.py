"""The OpenAPI description of the HTTP API, served at ``/openapi.json``.

Written by hand, next to docs/api.md; tests/test_openapi.py keeps it true: every
route is described, and schemathesis checks the running gateway against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.registry import SESSION_ID_PATTERN
from ..settings import Settings
from .validation import (
    FORWARDED_FIELDS,
    IMAGE_DETAILS,
    MAX_MODEL_CHARS,
    MAX_SHORT_CHARS,
    MAX_STOP,
    MAX_TOOLS,
    MESSAGE_FIELDS,
    PART_REQUIRED,
    PART_STRINGS,
    PART_TYPES,
    PENALTY,
    RESPONSE_FORMATS,
    ROLES,
    TEMPERATURE,
    TOOL_CHOICES,
    TOOL_NAME_PATTERN,
    TOP_P,
)

__all__ = ["openapi"]

# One Server-Sent Event; `data` is JSON text whose fields docs/api.md lists per event.
_EVENT = {
    "type": "object",
    "required": ["event", "data", "id"],
    "properties": {
        "event": {
            "enum": [
                "start",
                "reasoning",
                "token",
                "refusal",
                "tool_call",
                "content_part",
                "extra",
                "done",
                "stopped",
                "error",
            ]
        },
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
    },
}
# /v1/chat/completions: OpenAI's stream, data lines only: a chunk, an error, or [DONE].
_CHUNK_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}},
}
_SESSION_ID_IN_PATH = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}
_SESSION_ID = {"type": "string", "pattern": SESSION_ID_PATTERN}
_STRING = {"type": "string"}


def _part(kind: str) -> dict[str, Any]:
    """One content part, from validation's tables of its fields."""
    if kind not in PART_STRINGS:  # text, refusal: a string under the type's name
        return {"required": ["type", kind], "properties": {"type": {"const": kind}, kind: _STRING}}
    inner: dict[str, Any] = {
        "type": "object",
        "properties": {name: _STRING for name in PART_STRINGS[kind]},
        "anyOf": [
            {"required": [name], "properties": {name: {"minLength": 1}}}
            for name in PART_REQUIRED[kind]
        ],
    }
    if kind == "image_url":
        inner["properties"]["detail"] = {"enum": list(IMAGE_DETAILS)}
    return {"required": ["type", kind], "properties": {"type": {"const": kind}, kind: inner}}


_ASSISTANT_TOOL_CALL = {
    "type": "object",
    "required": ["id", "function"],
    "properties": {
        "id": _STRING,
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": _STRING, "arguments": _STRING},
        },
    },
}
_MESSAGE_FIELD_SCHEMAS: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1},
    "tool_calls": {"type": "array", "minItems": 1, "items": _ASSISTANT_TOOL_CALL},
    "reasoning_content": _STRING,
    "tool_call_id": {"type": "string", "minLength": 1},
}


def _function(properties: dict[str, Any]) -> dict[str, Any]:
    """``{"type": "function", "function": {"name", ...}}``: a tool, or a tool choice."""
    return {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": properties},
        },
    }


_TOOL = _function(
    {
        "name": {"type": "string", "pattern": TOOL_NAME_PATTERN},
        "description": _STRING,
        "parameters": {"type": "object"},
        "strict": {"type": "boolean"},
    }
)


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _number(bounds: tuple[float, float]) -> dict[str, Any]:
    return {"type": "number", "minimum": bounds[0], "maximum": bounds[1]}


def _message(role: str, max_chars: int) -> dict[str, Any]:
    """One role's message. The text limit is per message (all its text parts together);
    the schema can only bound each part."""
    parts = {
        "type": "array",
        "minItems": 1,
        "items": {"oneOf": [{"type": "object", **_part(kind)} for kind in PART_TYPES[role]]},
    }
    content: list[dict[str, Any]] = [{"type": "string", "maxLength": max_chars}, parts]
    if role == "assistant":
        content.append({"type": "null"})
    properties = {
        "role": {"const": role},
        "content": {"anyOf": content},
        **{name: _MESSAGE_FIELD_SCHEMAS[name] for name in MESSAGE_FIELDS[role]},
    }
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if role == "assistant":
        # As in OpenAI's API: content may be null or left out beside tool_calls.
        schema["required"] = ["role"]
        schema["anyOf"] = [
            {"required": ["tool_calls"]},
            {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
        ]
    else:
        schema["required"] = ["role", "content", *(["tool_call_id"] if role == "tool" else [])]
    return schema


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


_AMBIGUOUS = _error("a principal header sent twice, or two framings of the body")
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "required": True}}


def _forwarded() -> dict[str, Any]:
    """The top-level fields forwarded to the provider (validation.FORWARDED_FIELDS)."""
    short = {"type": "string", "minLength": 1, "maxLength": MAX_SHORT_CHARS}
    fields = {
        "tools": {"type": "array", "maxItems": MAX_TOOLS, "items": _TOOL},
        "tool_choice": {"anyOf": [{"enum": list(TOOL_CHOICES)}, _function({"name": _STRING})]},
        "parallel_tool_calls": {"type": "boolean"},
        "response_format": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": list(RESPONSE_FORMATS)}},
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {
                "required": ["json_schema"],
                "properties": {"json_schema": {"type": "object"}},
            },
        },
        "temperature": _number(TEMPERATURE),
        "top_p": _number(TOP_P),
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "stop": {
            "anyOf": [
                _STRING,
                {"type": "array", "minItems": 1, "maxItems": MAX_STOP, "items": _STRING},
            ]
        },
        "seed": {"type": "integer"},
        "presence_penalty": _number(PENALTY),
        "frequency_penalty": _number(PENALTY),
        "logit_bias": {"type": "object", "additionalProperties": _number((-100, 100))},
        "reasoning_effort": short,
        "thinking": {
            "type": "object",
            "description": "Anthropic's own thinking settings, sent to Anthropic providers "
            "only (docs/routing.md)",
            "required": ["type"],
            "properties": {
                "type": {"type": "string"},
                "budget_tokens": {"type": "integer", "minimum": 1},
            },
        },
        "user": short,
        "n": {"const": 1},
    }
    if set(fields) != set(FORWARDED_FIELDS):
        # A field validation forwards but this does not describe, or the reverse.
        raise RuntimeError(
            "openapi.py and validation.FORWARDED_FIELDS disagree: "
            f"{sorted(set(fields) ^ set(FORWARDED_FIELDS))}"
        )
    return fields


@dataclass(frozen=True)
class _Context:
    settings: Settings
    security: list[dict[str, list[str]]]
    unauthorized: dict[str, Any]
    chat: dict[str, Any]
    refusals: dict[str, Any]


def _context(settings: Settings) -> _Context:
    """What several paths share: who may call, the chat body, the refusals."""
    authenticated = bool(settings.api_keys)
    security: list[dict[str, list[str]]] = [{"bearer": []}] if authenticated else []
    unauthorized = {"401": _error("no principal: a missing or wrong key, or an untrusted peer")}
    message = {"oneOf": [_message(role, settings.max_message_chars) for role in ROLES]}
    chat: dict[str, Any] = {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": settings.max_messages,
                "items": message,
            },
            "model": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_CHARS},
            **_forwarded(),
        },
    }
    refusals: dict[str, Any] = {
        "400": _error(
            "a missing or malformed session id, a bad body, or an "
            "ambiguous request (a header sent twice, two framings)"
        ),
        **unauthorized,
        "404": _error("model_not_found: no route of GATEWAY_CONFIG serves the model"),
        "408": _error("the body did not arrive within GATEWAY_BODY_TIMEOUT"),
        "409": _error("a live stream already has this session id"),
        "413": _error("the body is larger than GATEWAY_MAX_BODY_BYTES"),
        "415": _error("the body is not JSON"),
        "429": _error(
            "GATEWAY_MAX_SESSIONS_PER_PRINCIPAL live streams already",
            _RETRY_AFTER,
        ),
        "503": _error("shutting down, or GATEWAY_MAX_SESSIONS live streams already"),
    }
    return _Context(settings, security, unauthorized, chat, refusals)


def _chat_stream(c: _Context) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Stream one answer as Server-Sent Events",
            "security": c.security,
            "parameters": [
                {
                    "name": "X-Session-Id",
                    "in": "header",
                    "required": True,
                    "schema": _SESSION_ID,
                }
            ],
            "requestBody": _json_body(c.chat),
            "responses": {
                "200": {
                    "description": "events: start; token, reasoning, refusal, "
                    "tool_call, content_part and extra, in the provider's order; then "
                    "one of done, stopped, error (with GATEWAY_CONFIG, each says "
                    "the provider and provider_model that served, and the attempts: "
                    "docs/routing.md)",
                    "headers": {"X-Session-Id": {"schema": _SESSION_ID, "required": True}},
                    "content": {"text/event-stream": {"schema": _EVENT}},
                },
                **c.refusals,
            },
        }
    }


def _chat_completions(c: _Context) -> dict[str, Any]:
    return {
        "post": {
            "summary": "OpenAI's Chat Completions, with the gateway's Stop",
            "security": c.security,
            "parameters": [
                {
                    "name": "X-Session-Id",
                    "in": "header",
                    "required": False,
                    "schema": _SESSION_ID,
                }
            ],
            "requestBody": _json_body(
                {
                    **c.chat,
                    "properties": {
                        **c.chat["properties"],
                        "stream": {"type": ["boolean", "null"]},
                        "stream_options": {
                            "type": ["object", "null"],
                            "properties": {"include_usage": {"type": ["boolean", "null"]}},
                        },
                    },
                }
            ),
            "responses": {
                "200": {
                    "description": "stream: true: chat.completion.chunk events "
                    "(content, reasoning_content or reasoning, refusal, tool_calls; "
                    "the provider's extra fields as it sent them), then [DONE]; else "
                    "one chat.completion object",
                    "headers": {"X-Session-Id": {"schema": _SESSION_ID, "required": True}},
                    "content": {
                        "text/event-stream": {"schema": _CHUNK_EVENT},
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["id", "object", "choices"],
                                "properties": {"object": {"const": "chat.completion"}},
                            }
                        },
                    },
                },
                **c.refusals,
                "502": _error(
                    "stream: false and the provider failed, or the answer grew "
                    "over GATEWAY_MAX_ANSWER_BYTES"
                ),
            },
        }
    }


_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message", "code"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "code": {"type": "string"},
            },
        },
    },
}


def _anthropic_error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ANTHROPIC_ERROR}},
    }


_BLOCKS = {"type": "array", "items": {"type": "object"}}
_MESSAGES_BODY = {
    "type": "object",
    "required": ["messages", "max_tokens"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"enum": ["user", "assistant"]},
                    "content": {"oneOf": [{"type": "string"}, _BLOCKS]},
                },
            },
        },
        "max_tokens": {"type": "integer", "minimum": 1},
        "system": {"oneOf": [{"type": "string"}, _BLOCKS]},
        "stop_sequences": {"type": "array", "items": {"type": "string"}},
        "temperature": {"type": "number"},
        "top_p": {"type": "number"},
        "top_k": {"type": "integer"},
        "tools": _BLOCKS,
        "tool_choice": {"type": "object"},
        "thinking": {"type": "object"},
        "metadata": {"type": "object"},
        "stream": {"type": "boolean"},
    },
}


def _anthropic_refusals(c: _Context) -> dict[str, Any]:
    """The refusals of every path, in Anthropic's envelope on /v1/messages."""
    return {
        status: _anthropic_error(response["description"]) for status, response in c.refusals.items()
    }


def _messages(c: _Context) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Anthropic's Messages API, with the gateway's Stop (docs/api.md)",
            "security": c.security,
            "parameters": [
                {"name": "X-Session-Id", "in": "header", "required": False, "schema": _SESSION_ID}
            ],
            "requestBody": _json_body(_MESSAGES_BODY),
            "responses": {
                "200": {
                    "description": "stream: true: Messages events (message_start, content "
                    "blocks, message_delta, message_stop; an error event if the provider "
                    "failed); else one message",
                    "headers": {"X-Session-Id": {"schema": _SESSION_ID, "required": True}},
                    "content": {
                        "text/event-stream": {"schema": {"type": "string"}},
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["id", "type", "content"],
                                "properties": {"type": {"const": "message"}},
                            }
                        },
                    },
                },
                **_anthropic_refusals(c),
                "502": _anthropic_error(
                    "stream: false and the provider failed, or the answer grew over "
                    "GATEWAY_MAX_ANSWER_BYTES"
                ),
            },
        }
    }


def _count_tokens(c: _Context) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Anthropic's token count, for a model an Anthropic provider serves",
            "security": c.security,
            "requestBody": _json_body(
                {"type": "object", "properties": _MESSAGES_BODY["properties"]}
            ),
            "responses": {
                "200": {
                    "description": "the provider's count",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["input_tokens"],
                                "properties": {"input_tokens": {"type": "integer"}},
                            }
                        }
                    },
                },
                **_anthropic_refusals(c),
                "502": _anthropic_error("the provider failed"),
            },
        }
    }


def _models(c: _Context) -> dict[str, Any]:
    return {
        "get": {
            "summary": "GATEWAY_MODEL, then the provider's own list if it has one",
            "security": c.security,
            "responses": {
                "400": _AMBIGUOUS,
                "200": {
                    "description": "the models",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["object", "data"],
                                "properties": {
                                    "object": {"const": "list"},
                                    "data": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["id"],
                                            "properties": {"id": {"type": "string"}},
                                        },
                                    },
                                },
                            }
                        }
                    },
                },
                **c.unauthorized,
            },
        }
    }


def _chat_resume(c: _Context) -> dict[str, Any]:
    return {
        "get": {
            "summary": (
                "Resume a stream after a dropped connection: every event after "
                "Last-Event-ID, then the live ones (GATEWAY_RESUME_WINDOW; docs/resume.md)"
            ),
            "security": c.security,
            "parameters": [
                _SESSION_ID_IN_PATH,
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                },
            ],
            "responses": {
                "200": {
                    "description": (
                        "the events after Last-Event-ID, ids unchanged; a client "
                        "superseded by a newer one gets stopped (reason superseded)"
                    ),
                    "content": {"text/event-stream": {"schema": _EVENT}},
                },
                "400": _error("Last-Event-ID is not a number"),
                **c.unauthorized,
                "404": _error(
                    "not_resumable: no stream of this principal to resume with that "
                    "id (unknown, expired, its events gone, or resume off)"
                ),
                "503": _error(
                    "resume_unavailable: the stream may live on another instance, "
                    "and Redis cannot be reached"
                ),
            },
        }
    }


def _chat_cancel(c: _Context) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Stop a live stream; answered once the provider is closed",
            "security": c.security,
            "parameters": [_SESSION_ID_IN_PATH],
            "responses": {
                "400": _AMBIGUOUS,
                "200": {
                    "description": "stopped",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["ok", "cancelled", "session_id"],
                                "properties": {
                                    "ok": {"const": True},
                                    "cancelled": {"const": True},
                                    "session_id": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                **c.unauthorized,
                "404": {
                    "description": "no live stream of this principal has that id",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["ok", "reason"],
                                "properties": {
                                    "ok": {"const": False},
                                    "reason": {"const": "not_found"},
                                },
                            }
                        }
                    },
                },
                "503": _error(
                    "cancel_unavailable: the stream may live on another instance "
                    "and Redis cannot be reached (docs/scaling.md)"
                ),
                "504": _error("the stream did not end within GATEWAY_CANCEL_WAIT"),
            },
        }
    }


def _demo_provider(c: _Context) -> dict[str, Any]:
    return {
        "get": {
            "summary": "Demo mode: what the built-in simulator did for a session",
            "security": c.security,
            "parameters": [_SESSION_ID_IN_PATH],
            "responses": {
                "200": {
                    "description": "the simulator's record",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": [
                                    "session_id",
                                    "planned",
                                    "generated",
                                    "outcome",
                                ],
                                "properties": {
                                    "session_id": {"type": "string"},
                                    "planned": {"type": "integer"},
                                    "generated": {"type": "integer"},
                                    "outcome": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                **c.unauthorized,
                "400": _AMBIGUOUS,
                "404": _error("not in demo mode, or no stream for that id"),
            },
        }
    }


def _healthz(_: _Context) -> dict[str, Any]:
    return {
        "get": {
            "summary": "Liveness, and the number of live streams",
            "responses": {
                "200": {"$ref": "#/components/responses/Health"},
                "503": {"$ref": "#/components/responses/Health"},
            },
        }
    }


def _metrics(c: _Context) -> dict[str, Any]:
    return {
        "get": {
            "summary": "Prometheus metrics (docs/observability.md)",
            "security": [{"bearer": []}] if c.settings.metrics_key else [],
            "responses": {
                "200": {
                    "description": "Prometheus's text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "400": _error("the Authorization header was sent more than once"),
                "401": _error("GATEWAY_METRICS_KEY is set and was not presented"),
                "404": _error("GATEWAY_METRICS=off"),
            },
        }
    }


def _openapi(_: _Context) -> dict[str, Any]:
    return {
        "get": {
            "summary": "This description",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }


def _index(_: _Context) -> dict[str, Any]:
    return {
        "get": {
            "summary": "The reference chat page",
            "responses": {
                "200": {
                    "description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    }


# Every path of the API and the builder of its description, in the order served.
_PATHS: dict[str, Callable[[_Context], dict[str, Any]]] = {
    "/api/chat/stream": _chat_stream,
    "/v1/chat/completions": _chat_completions,
    "/v1/messages": _messages,
    "/v1/messages/count_tokens": _count_tokens,
    "/v1/models": _models,
    "/api/chat/stream/{session_id}": _chat_resume,
    "/api/chat/cancel/{session_id}": _chat_cancel,
    "/api/demo/provider/{session_id}": _demo_provider,
    "/healthz": _healthz,
    "/metrics": _metrics,
    "/openapi.json": _openapi,
    "/": _index,
}

_COMPONENTS: dict[str, Any] = {
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "type", "param"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                    },
                }
            },
        }
    },
    "responses": {
        "Health": {
            "description": "ok, or shutting_down (503)",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["status", "sessions"],
                        "properties": {
                            "status": {"enum": ["ok", "shutting_down"]},
                            "sessions": {"type": "integer", "minimum": 0},
                            "instance": {"type": "string"},
                            "cluster": {"enum": ["ok", "unavailable"]},
                        },
                    }
                }
            },
        }
    },
    "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
}


def openapi(settings: Settings) -> dict[str, Any]:
    c = _context(settings)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stop-gateway",
            "version": "0.1.0",
            "description": "A streaming gateway for LLM chat that stops the provider "
            "the moment the user presses Stop. See docs/api.md.",
        },
        "paths": {path: build(c) for path, build in _PATHS.items()},
        "components": _COMPONENTS,
    }

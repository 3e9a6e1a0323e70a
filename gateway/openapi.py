"""The OpenAPI description of the HTTP API, served at ``/openapi.json``.

Written by hand, next to docs/api.md; tests/test_openapi.py keeps it true: every
route is described, and schemathesis checks the running gateway against it.
"""

from __future__ import annotations

from typing import Any

from .settings import Settings
from .validation import MAX_MODEL_CHARS, ROLES, SESSION_ID_PATTERN, TEMPERATURE

__all__ = ["openapi"]

# One Server-Sent Event; `data` is JSON text whose fields docs/api.md lists per event.
_EVENT = {
    "type": "object",
    "required": ["event", "data", "id"],
    "properties": {
        "event": {"enum": ["start", "token", "done", "stopped", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
    },
}
_SESSION_ID_IN_PATH = {
    "name": "session_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}
_SESSION_ID = {"type": "string", "pattern": SESSION_ID_PATTERN}


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


def openapi(settings: Settings) -> dict[str, Any]:
    authenticated = bool(settings.api_keys)
    security: list[dict[str, list[str]]] = [{"bearer": []}] if authenticated else []
    unauthorized = {"401": _error("no principal: a missing or wrong key, or an untrusted peer")}
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": list(ROLES)},
            "content": {"type": "string", "maxLength": settings.max_message_chars},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stop-gateway",
            "version": "0.1.0",
            "description": "A streaming gateway for LLM chat that stops the provider "
            "the moment the user presses Stop. See docs/api.md.",
        },
        "paths": {
            "/api/chat/stream": {
                "post": {
                    "summary": "Stream one answer as Server-Sent Events",
                    "security": security,
                    "parameters": [
                        {
                            "name": "X-Session-Id",
                            "in": "header",
                            "required": True,
                            "schema": _SESSION_ID,
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["messages"],
                                    "properties": {
                                        "messages": {
                                            "type": "array",
                                            "minItems": 1,
                                            "maxItems": settings.max_messages,
                                            "items": message,
                                        },
                                        "model": {
                                            "type": "string",
                                            "minLength": 1,
                                            "maxLength": MAX_MODEL_CHARS,
                                        },
                                        "temperature": {
                                            "type": "number",
                                            "minimum": TEMPERATURE[0],
                                            "maximum": TEMPERATURE[1],
                                        },
                                        "max_tokens": {"type": "integer", "minimum": 1},
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "events: start, token..., then one of done, "
                            "stopped, error",
                            "headers": {"X-Session-Id": {"schema": _SESSION_ID, "required": True}},
                            "content": {"text/event-stream": {"schema": _EVENT}},
                        },
                        "400": _error(
                            "a missing or malformed session id, a bad body, or an "
                            "ambiguous request (a header sent twice, two framings)"
                        ),
                        **unauthorized,
                        "408": _error("the body did not arrive within GATEWAY_BODY_TIMEOUT"),
                        "409": _error("a live stream already has this session id"),
                        "413": _error("the body is larger than GATEWAY_MAX_BODY_BYTES"),
                        "415": _error("the body is not JSON"),
                        "429": _error(
                            "GATEWAY_MAX_SESSIONS_PER_PRINCIPAL live streams already",
                            _RETRY_AFTER,
                        ),
                        "503": _error(
                            "shutting down, or GATEWAY_MAX_SESSIONS live streams already"
                        ),
                    },
                }
            },
            "/api/chat/cancel/{session_id}": {
                "post": {
                    "summary": "Stop a live stream; answered once the provider is closed",
                    "security": security,
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
                        **unauthorized,
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
            },
            "/api/demo/provider/{session_id}": {
                "get": {
                    "summary": "Demo mode: what the built-in simulator did for a session",
                    "security": security,
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
                        **unauthorized,
                        "400": _AMBIGUOUS,
                        "404": _error("not in demo mode, or no stream for that id"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness, and the number of live streams",
                    "responses": {
                        "200": {"$ref": "#/components/responses/Health"},
                        "503": {"$ref": "#/components/responses/Health"},
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This description",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/": {
                "get": {
                    "summary": "The reference chat page",
                    "responses": {
                        "200": {
                            "description": "HTML",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
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
        },
    }

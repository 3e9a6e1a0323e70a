"""A streaming gateway for LLM chat that stops the provider the moment the user presses Stop.

The public names are the app factory, the settings and the error types; the parts
(``web``, ``core``, ``provider``, ``resume``, ``cluster``, ``server``, ``tools``) are
the gateway's own and may change (docs/architecture.md).
"""

from __future__ import annotations

from .errors import (
    AnswerTooLarge,
    APIError,
    BadRequest,
    CancelTimeout,
    CancelUnavailable,
    ConfigError,
    GatewayError,
    ModelNotFound,
    NotResumable,
    PayloadTooLarge,
    RequestTimeout,
    ResumeUnavailable,
    ServerBusy,
    SessionConflict,
    ShuttingDown,
    TooManySessions,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamMisconfigured,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamUnavailable,
)
from .settings import Settings
from .web.routes import create_app

__all__ = [
    "APIError",
    "AnswerTooLarge",
    "BadRequest",
    "CancelTimeout",
    "CancelUnavailable",
    "ConfigError",
    "GatewayError",
    "ModelNotFound",
    "NotResumable",
    "PayloadTooLarge",
    "RequestTimeout",
    "ResumeUnavailable",
    "ServerBusy",
    "SessionConflict",
    "Settings",
    "ShuttingDown",
    "TooManySessions",
    "Unauthorized",
    "UnsupportedMediaType",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamMisconfigured",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamUnavailable",
    "create_app",
]

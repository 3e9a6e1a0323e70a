"""A streaming gateway for LLM chat that stops the provider the moment the user presses Stop."""

from __future__ import annotations

from .api import create_app
from .contract import CheckResult, ContractOptions, run_contract
from .errors import (
    APIError,
    BadRequest,
    CancelTimeout,
    CancelUnavailable,
    ConfigError,
    GatewayError,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    SessionConflict,
    ShuttingDown,
    TooManySessions,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamUnavailable,
)
from .formats import AnswerFormat, ChatCompletion, ChatCompletionChunks, GatewayEvents
from .parser import ProviderStreamParser
from .registry import Registry
from .server import load_config, serve
from .session import Completed, Failed, Outcome, Session, Stopped
from .settings import Settings
from .simulator import Simulator, SimulatorConfig, StreamRecord

__all__ = [
    "APIError",
    "AnswerFormat",
    "BadRequest",
    "CancelTimeout",
    "CancelUnavailable",
    "ChatCompletion",
    "ChatCompletionChunks",
    "CheckResult",
    "Completed",
    "ConfigError",
    "ContractOptions",
    "Failed",
    "GatewayError",
    "GatewayEvents",
    "Outcome",
    "PayloadTooLarge",
    "ProviderStreamParser",
    "Registry",
    "RequestTimeout",
    "ServerBusy",
    "Session",
    "SessionConflict",
    "Settings",
    "ShuttingDown",
    "Simulator",
    "SimulatorConfig",
    "Stopped",
    "StreamRecord",
    "TooManySessions",
    "Unauthorized",
    "UnsupportedMediaType",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamUnavailable",
    "create_app",
    "load_config",
    "run_contract",
    "serve",
]

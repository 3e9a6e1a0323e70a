"""The gateway's exceptions: one small hierarchy.

``httpx`` errors are mapped to ``UpstreamError`` subclasses in ``upstream.py`` and
nowhere else; HTTP-facing errors carry their status and a stable ``code``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of everything the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A setting is missing or malformed; raised once, at start-up."""


class HTTPError(GatewayError):
    """A request the gateway refuses; rendered as ``{"error": {"code", "message"}}``."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if code is not None:
            self.code = code


class BadRequest(HTTPError):
    status_code = 400
    code = "bad_request"


class Unauthorized(HTTPError):
    status_code = 401
    code = "unauthorized"


class RequestTimeout(HTTPError):
    status_code = 408
    code = "body_timeout"


class PayloadTooLarge(HTTPError):
    status_code = 413
    code = "body_too_large"


class TooManySessions(HTTPError):
    """This principal has as many live streams as it may."""

    status_code = 429
    code = "too_many_sessions"


class ServerBusy(HTTPError):
    """The process holds as many live streams as it may."""

    status_code = 503
    code = "server_busy"


class UnsupportedMediaType(HTTPError):
    status_code = 415
    code = "unsupported_media_type"


class SessionConflict(HTTPError):
    status_code = 409
    code = "session_conflict"


class ShuttingDown(HTTPError):
    status_code = 503
    code = "shutting_down"


class UpstreamError(GatewayError):
    """The provider could not be reached or answered badly.

    ``code`` is the one sent to the client in the ``error`` event.
    """

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int | None = None,
        provider_error: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.upstream_status = upstream_status
        # The provider's error type and code, short identifiers only: for the
        # operator's log, never the client.
        self.provider_error = provider_error


class UpstreamUnavailable(UpstreamError):
    """No connection to the provider: refused, unresolvable, connect timeout."""

    code = "upstream_unavailable"


class UpstreamStatusError(UpstreamError):
    """The provider answered with an HTTP error status or an error object."""

    code = "upstream_error"


class UpstreamDisconnected(UpstreamError):
    """The provider's connection broke in the middle of the stream."""

    code = "upstream_disconnected"


class UpstreamProtocolError(UpstreamError):
    """The provider's stream is not the OpenAI streaming format."""

    code = "upstream_protocol"

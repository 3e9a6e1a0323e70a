"""The gateway's exceptions: one small hierarchy.

``httpx`` errors are mapped to ``UpstreamError`` subclasses in ``provider/client.py`` and
nowhere else (and h11's and the socket's to httpx's in ``provider/transport.py``). What the
HTTP API answers with is an ``APIError``: its status and a stable ``code``, rendered
once, by ``responses.error_response``.
"""

from __future__ import annotations

import anyio
import trio


class GatewayError(Exception):
    """Base class of everything the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A setting is missing or malformed; raised once, at start-up."""


class APIError(GatewayError):
    """An answer of the HTTP API that is an error; rendered as
    ``{"error": {"code", "message"}}`` with ``status_code``. (Named apart from
    ``httpx.HTTPError``, which the same modules import.)"""

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


class BadRequest(APIError):
    status_code = 400
    code = "bad_request"


class Unauthorized(APIError):
    status_code = 401
    code = "unauthorized"


class RequestTimeout(APIError):
    status_code = 408
    code = "body_timeout"


class PayloadTooLarge(APIError):
    status_code = 413
    code = "body_too_large"


class TooManySessions(APIError):
    """This principal has as many live streams as it may."""

    status_code = 429
    code = "too_many_sessions"


class ServerBusy(APIError):
    """The process holds as many live streams as it may."""

    status_code = 503
    code = "server_busy"


class UnsupportedMediaType(APIError):
    status_code = 415
    code = "unsupported_media_type"


class ModelNotFound(APIError):
    """No route serves the model the request names (docs/routing.md)."""

    status_code = 404
    code = "model_not_found"


class SessionConflict(APIError):
    status_code = 409
    code = "session_conflict"


class NotResumable(APIError):
    """No stream of this principal with that id can be resumed here (unknown, expired,
    its events gone, or resume is off)."""

    status_code = 404
    code = "not_resumable"


class ResumeUnavailable(APIError):
    """The stream may live on another instance, and Redis cannot be reached to resume it."""

    status_code = 503
    code = "resume_unavailable"


class ShuttingDown(APIError):
    status_code = 503
    code = "shutting_down"


class CancelUnavailable(APIError):
    """The cancel needs another instance, and Redis cannot be reached to ask it."""

    status_code = 503
    code = "cancel_unavailable"


class CancelTimeout(APIError):
    """The stream did not end within ``GATEWAY_CANCEL_WAIT``."""

    status_code = 504
    code = "cancel_timeout"


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
        detail: str | None = None,
        cause: str | None = None,
        note: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.upstream_status = upstream_status
        # Why no connection could be made (CONNECT_CAUSES), for the operator's log and
        # metrics; the client sees only ``code``. ``note``: what the operator's log adds
        # (OpenSSL's words for a certificate's fault).
        self.cause = cause
        self.note = note
        # The provider's error type and code, short identifiers only: for the
        # operator's log, never the client.
        self.provider_error = provider_error
        # A short identifier the client may see: the provider's own reason for a failed
        # generation (``native_finish_reason``).
        self.detail = detail


class UpstreamUnavailable(UpstreamError):
    """No connection to the provider: refused, unresolvable, connect timeout."""

    code = "upstream_unavailable"


class UpstreamMisconfigured(UpstreamUnavailable):
    """The provider answered, but no trusted TLS connection could be made (its
    certificate, its name, the gateway's trust or client certificate): retrying will
    not help until the operator acts (docs/operations.md)."""

    code = "upstream_misconfigured"


# Why a connection to the provider failed (docs/operations.md): the first four are the
# provider or the network (``upstream_unavailable``), the others TLS
# (``upstream_misconfigured``).
CONNECT_CAUSES = (
    "connect_refused",
    "dns_failure",
    "connect_timeout",
    "connect_failed",
    "tls_handshake",
    "cert_untrusted",
    "cert_hostname_mismatch",
    "cert_expired",
)


class UpstreamStatusError(UpstreamError):
    """The provider answered with an HTTP error status or an error object."""

    code = "upstream_error"


class UpstreamDisconnected(UpstreamError):
    """The provider's connection broke in the middle of the stream."""

    code = "upstream_disconnected"


class UpstreamProtocolError(UpstreamError):
    """The provider's stream is not the OpenAI streaming format."""

    code = "upstream_protocol"


class AnswerTooLarge(UpstreamError):
    """An answer the gateway has to hold whole (``stream: false``) grew over
    ``GATEWAY_MAX_ANSWER_BYTES``: the stream ends, the provider is closed."""

    code = "answer_too_large"


# What writing to a client that has gone away raises. BusyResourceError: hypercorn's
# Trio worker closes a connection whose request body was left unread while the answer
# is still being written (seen answering 413 to a body still arriving).
CLIENT_GONE = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    trio.BusyResourceError,
)

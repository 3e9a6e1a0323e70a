"""JSON error responses: ``{"error": {"code", "message", "type", "param"}}`` with the
error's status, built here and nowhere else; and what a client that has gone away looks
like.

``type`` and ``param`` make the envelope OpenAI's too, so the OpenAI SDKs read the
gateway's errors as their own (they pick the exception class from the status).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from ..errors import CLIENT_GONE, APIError

__all__ = ["error_body", "error_json", "error_response"]

logger = logging.getLogger(__name__)


class _ErrorResponse(JSONResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except CLIENT_GONE:
            # Refused requests whose client left are not the gateway's errors.
            logger.info("client went away before its %d answer was written", self.status_code)


# OpenAI's error types by status; any other 4xx is a request error, any 5xx a server's.
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def error_body(status: int, code: str, message: str) -> dict[str, object]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"code": code, "message": message, "type": kind, "param": None}}


def error_json(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return _ErrorResponse(error_body(status, code, message), status_code=status, headers=headers)


def error_response(exc: APIError) -> JSONResponse:
    return error_json(exc.status_code, exc.code, exc.message, exc.headers)

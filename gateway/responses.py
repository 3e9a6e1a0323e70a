"""JSON error responses: ``{"error": {"code", "message"}}`` with the error's status,
built here and nowhere else; and what a client that has gone away looks like."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anyio
import trio
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError

__all__ = ["CLIENT_GONE", "error_json", "error_response"]

logger = logging.getLogger(__name__)

# What writing to a client that has gone away raises. BusyResourceError: hypercorn's
# Trio worker closes a connection whose request body was left unread while the answer
# is still being written (seen answering 413 to a body still arriving).
CLIENT_GONE = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    trio.BusyResourceError,
)


class _ErrorResponse(JSONResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except CLIENT_GONE:
            # Refused requests whose client left are not the gateway's errors.
            logger.info("client went away before its %d answer was written", self.status_code)


def error_json(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return _ErrorResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def error_response(exc: APIError) -> JSONResponse:
    return error_json(exc.status_code, exc.code, exc.message, exc.headers)

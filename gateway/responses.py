"""JSON error responses: ``{"error": {"code", "message"}}`` with the error's status."""

from __future__ import annotations

from starlette.responses import JSONResponse

from .errors import HTTPError

__all__ = ["error_response"]


def error_response(exc: HTTPError) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status_code
    )

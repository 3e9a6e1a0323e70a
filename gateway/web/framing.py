"""Requests whose length is ambiguous are refused before anything reads them.

A request with both ``Content-Length`` and ``Transfer-Encoding`` is how request
smuggling starts: a proxy in front may frame it by one header, the server by the
other. RFC 9112 (6.3) lets a server refuse it, and the connection must not be reused
after it; hypercorn's h11 would frame it by ``Transfer-Encoding`` and keep the
connection open, so it is answered 400 here with ``Connection: close``.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import BadRequest
from .responses import error_response

__all__ = ["RefuseAmbiguousFraming"]


class RefuseAmbiguousFraming:
    """Pure ASGI (a BaseHTTPMiddleware would hide disconnects from the streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope["headers"]}
            if b"content-length" in names and b"transfer-encoding" in names:
                refusal = BadRequest(
                    "a request may not have both Content-Length and Transfer-Encoding",
                    code="ambiguous_framing",
                    headers={"connection": "close"},
                )
                await error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

"""The provider side: the HTTP client, the streaming request, and the one place
where ``httpx`` errors become ours.

The client speaks HTTP/1.1 only: closing an HTTP/1.1 response before its end closes
the TCP connection, so the provider sees EOF and stops generating. httpcore's
HTTP/2 only frees the stream slot and sends no RST_STREAM (encode/httpcore #943).

``httpx2`` (the maintained fork of httpx, same API) was chosen by test; see
docs/architecture.md and tests/test_pool_leak.py.
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx2 as httpx

from .errors import (
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamUnavailable,
)
from .settings import Settings
from .transport import BODY_EXTENSION, H11Transport

__all__ = ["UpstreamResponse", "create_client", "open_stream"]

# Bounds for work done while cleaning up: closing a socket, reading an error body.
_CLOSE_TIMEOUT = 2.0
_ERROR_BODY_LIMIT = 64 * 1024


def create_client(settings: Settings) -> httpx.AsyncClient:
    # No read timeout: the gap between content deltas is the session's idle
    # timeout, which keep-alive comments must not reset and httpx's would.
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=None,
        write=settings.connect_timeout,
        pool=settings.connect_timeout,
    )
    keepalive = min(100, settings.upstream_max_connections)
    limits = httpx.Limits(
        max_connections=settings.upstream_max_connections, max_keepalive_connections=keepalive
    )
    headers = {"accept": "text/event-stream", "accept-encoding": "identity"}
    if settings.upstream_api_key:
        headers["authorization"] = f"Bearer {settings.upstream_api_key}"
    transport: httpx.AsyncBaseTransport | None = None
    if not _proxied(settings.upstream_url):
        transport = H11Transport(
            max_connections=settings.upstream_max_connections, max_keepalive=keepalive
        )
    # Behind an HTTP proxy (HTTPS_PROXY and friends), httpx's own transport, which
    # speaks to proxies; the lean one does not.
    return httpx.AsyncClient(
        http1=True,
        http2=False,
        timeout=timeout,
        limits=limits,
        headers=headers,
        transport=transport,
    )


def _proxied(url: str | None) -> bool:
    if url is None:
        return False  # the built-in simulator, on loopback
    parsed = httpx.URL(url)
    proxies = urllib.request.getproxies_environment()
    if parsed.scheme not in proxies and "all" not in proxies:
        return False
    return not urllib.request.proxy_bypass(parsed.host)


class UpstreamResponse:
    """An open streaming response from the provider."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        body = response.extensions.get(BODY_EXTENSION)
        encoding = response.headers.get("content-encoding", "identity").lower()
        self._receive: Callable[[], Awaitable[bytes]]
        if body is not None and encoding == "identity":
            self._receive = body.receive
        else:
            self._receive = _reader(response.aiter_bytes())

    async def read(self) -> bytes:
        """The next bytes of the body; ``b""`` at its end."""
        try:
            return await self._receive()
        except httpx.HTTPError as exc:
            raise _map_error(exc, connected=True) from exc

    async def aclose(self) -> None:
        """Close the response; before its end this closes the TCP connection.

        Shielded and bounded, so it runs to completion inside a cancelled scope.
        """
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await self._response.aclose()


async def open_stream(
    client: httpx.AsyncClient,
    base_url: str,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> UpstreamResponse:
    """POST ``{base_url}/chat/completions`` and return once the headers are in."""
    request = client.build_request(
        "POST", f"{base_url}/chat/completions", json=payload, headers=headers
    )
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _map_error(exc, connected=False) from exc
    if response.status_code >= 400:
        try:
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                await _drain_limited(response)
        except httpx.HTTPError:
            pass
        finally:
            await UpstreamResponse(response).aclose()
        # The provider's body may echo the prompt or account details: only the status
        # reaches the client.
        raise UpstreamStatusError(
            f"provider answered HTTP {response.status_code}",
            upstream_status=response.status_code,
        )
    return UpstreamResponse(response)


def _reader(chunks: AsyncIterator[bytes]) -> Callable[[], Awaitable[bytes]]:
    async def receive() -> bytes:
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            return b""

    return receive


async def _drain_limited(response: httpx.Response) -> None:
    """Read a short error body to its end, so the connection can go back to the pool;
    a longer one is cut and its connection closed."""
    read = 0
    async for chunk in response.aiter_bytes():
        read += len(chunk)
        if read > _ERROR_BODY_LIMIT:
            break


def _map_error(exc: httpx.HTTPError, *, connected: bool) -> UpstreamError:
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamUnavailable(f"provider not reachable: {type(exc).__name__}")
    if isinstance(exc, httpx.ConnectError | httpx.UnsupportedProtocol):
        return UpstreamUnavailable("provider refused the connection")
    if isinstance(exc, httpx.DecodingError):
        return UpstreamProtocolError("provider sent a body that cannot be decoded")
    if isinstance(exc, httpx.TransportError):
        if connected:
            return UpstreamDisconnected("provider connection lost mid-stream")
        return UpstreamUnavailable("provider closed the connection before answering")
    return UpstreamError(f"provider request failed: {type(exc).__name__}")

"""The provider side: the HTTP client, the streaming request, and the one place
where ``httpx`` errors become ours.

The client speaks HTTP/1.1 only: closing an HTTP/1.1 response before its end closes
the TCP connection, so the provider sees EOF and stops generating. httpcore's
HTTP/2 only frees the stream slot and sends no RST_STREAM (encode/httpcore #943).

``httpx2`` (the maintained fork of httpx, same API) was chosen by test; see
docs/architecture.md and tests/test_pool_leak.py.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import httpx2 as httpx

from ..config import ProviderConfig, load_tls
from ..errors import (
    ConfigError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamMisconfigured,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamUnavailable,
)
from ..settings import Settings
from .parser import provider_error_ids
from .transport import BODY_EXTENSION, HTTP1Transport, PreparedPost, TLSHandshakeTimeout

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_PATH",
    "COUNT_TOKENS_PATH",
    "MESSAGES_PATH",
    "ModelList",
    "UpstreamResponse",
    "chat_url",
    "create_client",
    "list_models",
    "open_stream",
    "post_for_json",
]

# Where a stream is asked for, under the provider's base URL, by the API it speaks.
CHAT_PATH = "/chat/completions"
MESSAGES_PATH = "/messages"
COUNT_TOKENS_PATH = "/messages/count_tokens"
# Bounds for work done while cleaning up: closing a socket, reading an error body.
_CLOSE_TIMEOUT = 2.0
_ERROR_BODY_LIMIT = 64 * 1024


def create_client(settings: Settings, provider: ProviderConfig | None = None) -> httpx.AsyncClient:
    """The HTTP client for ``provider`` (by default the ``GATEWAY_UPSTREAM_*`` one):
    its key in its auth header, its extra headers, its connect timeout."""
    if provider is None:
        provider = settings.providers_and_routes()[0][0]
    connect = provider.connect_timeout or settings.connect_timeout
    # No read timeout: the gap between content deltas is the session's idle
    # timeout, which keep-alive comments must not reset and httpx's would.
    timeout = httpx.Timeout(connect=connect, read=None, write=connect, pool=connect)
    keepalive = min(100, settings.upstream_max_connections)
    limits = httpx.Limits(
        max_connections=settings.upstream_max_connections, max_keepalive_connections=keepalive
    )
    headers = {"accept": "text/event-stream", "accept-encoding": "identity"}
    headers.update(provider.headers)
    if provider.api_key:
        if provider.auth_header == "authorization":
            headers["authorization"] = f"Bearer {provider.api_key}"
        else:
            headers[provider.auth_header] = provider.api_key
    tls = tls_context(provider)
    lean = None
    if not _proxied(provider.base_url):
        lean = HTTP1Transport(
            max_connections=settings.upstream_max_connections,
            max_keepalive=keepalive,
            ssl_context=tls,
        )
    # Behind an HTTP proxy (HTTPS_PROXY and friends), httpx's own transport, which
    # speaks to proxies; the lean one does not.
    return ProviderClient(
        lean=lean,
        http1=True,
        http2=False,
        timeout=timeout,
        limits=limits,
        headers=headers,
        transport=lean,
        verify=tls or True,
    )


def tls_context(provider: ProviderConfig) -> ssl.SSLContext | None:
    """The TLS context for an https provider: the system's trust (``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` as Python reads them) plus the provider's ``ca_file``, its client
    certificate, or no verification at all (``verify = false``, with a warning)."""
    if provider.base_url is None or not provider.base_url.startswith("https:"):
        return None
    if not provider.verify:
        logger.warning(
            "provider %s: TLS verification is off (verify = false): any certificate is "
            "accepted, and anyone on the path can read and change its traffic",
            provider.name,
        )
        context = httpx.create_ssl_context(verify=False)
    else:
        context = httpx.create_ssl_context()
    try:
        load_tls(context, provider)
    except ValueError as exc:
        # Checked when the settings were read; the file changed since.
        raise ConfigError(f"provider {provider.name}: {exc}") from None
    return context


class ProviderClient(httpx.AsyncClient):
    """httpx's client, and the lean transport beneath it if there is one: the stream's
    request goes to that transport directly. The client's layers (auth, redirects,
    event hooks, its cookie jar) are nothing a stream uses, and they were a tenth of a
    millisecond on the first token's path (docs/benchmarks.md, "The first token"); a
    provider's cookies are not kept from one user's stream for the next."""

    def __init__(self, *, lean: HTTP1Transport | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lean = lean
        self._timeouts = self.timeout.as_dict()
        self._posts: dict[str, PreparedPost] = {}

    async def post_json(self, url: str, payload: Mapping[str, object]) -> httpx.Response:
        """POST ``payload`` to ``url`` through the lean transport, with the client's
        headers, as ``json=`` would."""
        assert self.lean is not None
        if self.is_closed:
            raise httpx.ConnectError("the client is closed (the gateway is stopping)")
        prepared = self._posts.get(url)
        if prepared is None:
            headers = self.build_request("POST", url, content=b"").headers
            headers["content-type"] = "application/json"
            prepared = self.lean.prepare_post(httpx.URL(url), headers)
            self._posts[url] = prepared
        # As httpx encodes ``json=``.
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return await self.lean.post(prepared, body.encode(), self._timeouts)


def _proxied(url: str | None) -> bool:
    if url is None:
        return False  # the built-in simulator, on loopback
    parsed = httpx.URL(url)
    proxies = urllib.request.getproxies_environment()
    if parsed.scheme not in proxies and "all" not in proxies:
        return False
    return not urllib.request.proxy_bypass(parsed.host)


class UpstreamResponse:
    """An open streaming response from the provider.

    The body is read as sent, never decoded: the gateway asks for ``identity``, and
    ``open_stream`` refuses any other encoding (a few MB of gzip can hold gigabytes of
    newlines, decoded in one go on the event loop).
    """

    def __init__(self, response: httpx.Response) -> None:
        body = response.extensions.get(BODY_EXTENSION)
        self._receive: Callable[[], Awaitable[bytes]]
        self._close: Callable[[], Awaitable[None]]
        self._abort: Callable[[], bool] | None = None
        # Through httpx's own transport (a proxy), a read is cancelled by abort().
        self._reading: anyio.CancelScope | None = None
        if body is not None:
            # The body is all the stream needs: httpx's response around it (its
            # headers, its stream wrapper) is let go, objects fewer per stream for the
            # garbage collector to walk.
            self._receive = body.receive
            self._abort = body.abort
            self._close = body.aclose
        else:
            self._receive = _reader(response.aiter_raw())
            self._close = response.aclose
        self.aborted = False
        # The configured provider's name (provider/routing.py), for its metrics.
        self.provider = ""

    async def read(self) -> bytes:
        """The next bytes of the body; ``b""`` at its end, or once aborted."""
        try:
            if self._abort is not None:
                return await self._receive()
            if self.aborted:
                return b""
            with anyio.CancelScope() as self._reading:
                return await self._receive()
            return b""
        except httpx.HTTPError as exc:
            if self.aborted:
                return b""
            raise _map_error(exc, connected=True) from exc
        finally:
            self._reading = None

    def abort(self) -> None:
        """Close the provider's connection now, from any task, wherever the reader is:
        the provider sees EOF at once and a waiting ``read()`` returns ``b""``. The
        reader still calls ``aclose()``."""
        self.aborted = True
        if self._abort is not None and self._abort():
            return
        if self._reading is not None:
            self._reading.cancel()

    async def aclose(self) -> None:
        """Close the response; before its end this closes the TCP connection.

        Shielded and bounded, so it runs to completion inside a cancelled scope.
        """
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await self._close()


@functools.lru_cache(maxsize=32)
def chat_url(base_url: str, path: str = CHAT_PATH) -> str:
    """``<base>/chat/completions`` (or another ``path``), the base's query (Azure's
    ``api-version``) kept."""
    parts = urllib.parse.urlsplit(base_url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path + path))


# GET <base>/models: a listing, not a stream; it must not hold a request up for long.
_MODELS_TIMEOUT = 5.0
_MAX_MODELS = 1000
_MAX_MODEL_ID = 256
# SDKs and chat UIs list the models often; a provider's list rarely changes.
_MODELS_TTL = 60.0


class ModelList:
    """The provider's model ids, asked at most once per ``ttl`` seconds; callers that
    arrive during a fetch share it. An empty answer (no such endpoint, a failure, a body
    over the bound or unreadable) is kept as long: the provider is not asked again on
    every request."""

    def __init__(self, ttl: float = _MODELS_TTL) -> None:
        self._ttl = ttl
        self._ids: list[str] = []
        self._expires = -math.inf
        self._lock: anyio.Lock | None = None

    async def ids(self, client: httpx.AsyncClient, base_url: str, max_bytes: int) -> list[str]:
        if anyio.current_time() < self._expires:
            return self._ids
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if anyio.current_time() >= self._expires:
                self._ids = await list_models(client, base_url, max_bytes)
                self._expires = anyio.current_time() + self._ttl
        return self._ids


async def list_models(client: httpx.AsyncClient, base_url: str, max_bytes: int) -> list[str]:
    """The model ids the provider lists at ``<base>/models``; none if it does not answer
    one (many OpenAI-compatible providers have no such endpoint). The body is read as
    sent, never decoded (any ``Content-Encoding`` is refused: a gzip bomb stays a few
    KB), and at most ``max_bytes`` of it."""
    parts = urllib.parse.urlsplit(base_url)
    url = urllib.parse.urlunsplit(parts._replace(path=parts.path + "/models"))
    request = client.build_request("GET", url, headers={"accept": "application/json"})
    body = bytearray()
    try:
        with anyio.fail_after(_MODELS_TIMEOUT):
            response = await client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    return []
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    logger.warning("provider's model list came %s-encoded; not read", encoding)
                    return []
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > max_bytes:
                        logger.warning(
                            "provider's model list is over GATEWAY_MAX_MODELS_BYTES (%d); not read",
                            max_bytes,
                        )
                        return []
            finally:
                await UpstreamResponse(response).aclose()
    except (httpx.HTTPError, TimeoutError):
        return []
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError, RecursionError):
        # RecursionError: nesting deeper than Python's stack (a 500 on every call before).
        return []
    if not isinstance(data, list):
        return []
    # What the provider wrote is untrusted: short string ids only, and not too many.
    ids = [m.get("id") for m in data[:_MAX_MODELS] if isinstance(m, dict)]
    return [i for i in ids if isinstance(i, str) and 0 < len(i) <= _MAX_MODEL_ID]


# A small JSON answer (Anthropic's token count): bounded in time and size.
_JSON_TIMEOUT = 10.0
_JSON_LIMIT = 64 * 1024


async def post_for_json(
    client: httpx.AsyncClient, base_url: str, path: str, payload: Mapping[str, object]
) -> tuple[int, object]:
    """POST ``payload`` to ``{base_url}{path}`` and read a small JSON answer: its status
    and body (``None`` when it is not JSON). Errors are mapped as a stream's are."""
    request = client.build_request(
        "POST", chat_url(base_url, path), json=payload, headers={"accept": "application/json"}
    )
    try:
        with anyio.fail_after(_JSON_TIMEOUT):
            response = await client.send(request, stream=True)
            answer = UpstreamResponse(response)
            try:
                body = await _read_limited(answer, _JSON_LIMIT)
            finally:
                await answer.aclose()
    except TimeoutError:
        raise UpstreamUnavailable("provider did not answer in time") from None
    except httpx.HTTPError as exc:
        raise _map_error(exc, connected=False) from exc
    try:
        return response.status_code, json.loads(body)
    except (ValueError, RecursionError):
        return response.status_code, None


async def open_stream(
    client: httpx.AsyncClient,
    base_url: str,
    payload: Mapping[str, object],
    headers: dict[str, str] | None = None,
    path: str = CHAT_PATH,
) -> UpstreamResponse:
    """POST ``{base_url}{path}`` and return once the headers are in."""
    try:
        url = chat_url(base_url, path)
        if isinstance(client, ProviderClient) and client.lean is not None and headers is None:
            response = await client.post_json(url, payload)
        else:
            request = client.build_request("POST", url, json=payload, headers=headers)
            response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _map_error(exc, connected=False) from exc
    status = response.status_code
    if status >= 400:
        body = b""
        failed = UpstreamResponse(response)
        try:
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                body = await _read_limited(failed)
        except UpstreamError:
            pass
        finally:
            # Not kept for another request: a provider that answers with an error may
            # be overloaded, and a route's next target opens its own (docs/routing.md).
            failed.abort()
            await failed.aclose()
        # The provider's body may echo the prompt or account details: only the status
        # reaches the client; its error type and code reach the log.
        raise UpstreamStatusError(
            f"provider answered HTTP {status}",
            upstream_status=status,
            provider_error=_error_ids(body),
        )
    problem = _not_a_stream(response)
    if problem is not None:
        await UpstreamResponse(response).aclose()
        raise UpstreamProtocolError(problem, upstream_status=status)
    return UpstreamResponse(response)


def _not_a_stream(response: httpx.Response) -> str | None:
    """Why a non-error answer is not an event stream the gateway can relay, if it is not."""
    status = response.status_code
    if status != 200:
        # A redirect is not followed: a provider's base URL does not move.
        return f"provider answered HTTP {status}, not a stream"
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "text/event-stream":
        return "provider answered 200 without an event stream"
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return "provider sent a content encoding the gateway did not ask for"
    return None


def _error_ids(body: bytes) -> dict[str, str] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return provider_error_ids(error) or None


def _reader(chunks: AsyncIterator[bytes]) -> Callable[[], Awaitable[bytes]]:
    async def receive() -> bytes:
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            return b""

    return receive


async def _read_limited(response: UpstreamResponse, limit: int = _ERROR_BODY_LIMIT) -> bytes:
    """A short body, to its end; a longer one cut. Read as sent, never decoded."""
    body = bytearray()
    while chunk := await response.read():
        body += chunk
        if len(body) > limit:
            break
    return bytes(body)


def _map_error(exc: httpx.HTTPError, *, connected: bool) -> UpstreamError:
    if not connected and isinstance(exc, httpx.TransportError):
        cause, note = _connect_cause(exc)
        if cause in _TLS_CAUSES:
            # The client is told only that the gateway needs attention; the log says why.
            return UpstreamMisconfigured(
                "no trusted connection to the provider could be made", cause=cause, note=note
            )
        if cause is not None:
            return UpstreamUnavailable(_UNAVAILABLE[cause], cause=cause, note=note)
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamUnavailable(f"provider not reachable: {type(exc).__name__}")
    if isinstance(exc, httpx.UnsupportedProtocol):
        return UpstreamUnavailable("provider refused the connection")
    if isinstance(exc, httpx.DecodingError):
        return UpstreamProtocolError("provider sent a body that cannot be decoded")
    if isinstance(exc, httpx.TransportError):
        if connected:
            return UpstreamDisconnected("provider connection lost mid-stream")
        return UpstreamUnavailable("provider closed the connection before answering")
    return UpstreamError(f"provider request failed: {type(exc).__name__}")


_TLS_CAUSES = frozenset(
    {"tls_handshake", "cert_untrusted", "cert_hostname_mismatch", "cert_expired"}
)
# What the client is told when the provider or the network failed.
_UNAVAILABLE = {
    "connect_refused": "provider refused the connection",
    "dns_failure": "provider's host name did not resolve",
    "connect_timeout": "provider not reachable: ConnectTimeout",
    "connect_failed": "provider not reachable",
}
# OpenSSL's verify results (X509_V_ERR_*): not yet valid, expired; host name, e-mail,
# IP address mismatch. Every other one is a certificate not trusted.
_EXPIRED = frozenset({9, 10})
_NAME_MISMATCH = frozenset({62, 63, 64})


def _connect_cause(exc: BaseException) -> tuple[str | None, str | None]:
    """Why a connection (or the exchange before the response head) failed, from the
    exceptions beneath httpx's (both transports raise ``from`` the socket's and ssl's
    own), and a short detail for the operator's log."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        error = todo.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ssl.SSLCertVerificationError):
            code = error.verify_code
            if code in _EXPIRED:
                return "cert_expired", error.verify_message
            if code in _NAME_MISMATCH:
                return "cert_hostname_mismatch", error.verify_message
            return "cert_untrusted", error.verify_message
        if isinstance(error, ssl.SSLError):
            # A handshake refused by either side: no common version or cipher, a plain
            # HTTP port, a client certificate required or rejected.
            return "tls_handshake", error.reason or str(error)
        if isinstance(error, TLSHandshakeTimeout):
            # Accepted (the kernel does that), then silent: a provider stuck or
            # overloaded, as likely as one misconfigured; the note says which step.
            return "connect_timeout", "the TLS handshake did not finish in time"
        if isinstance(error, socket.gaierror):
            return "dns_failure", error.strerror
        if isinstance(error, ConnectionRefusedError):
            return "connect_refused", None
        if isinstance(error, BaseExceptionGroup):
            todo.extend(error.exceptions)
        todo.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect_timeout", None
    if isinstance(exc, httpx.ConnectError):
        return "connect_failed", str(exc)
    return None, None

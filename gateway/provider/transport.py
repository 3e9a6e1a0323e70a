"""A lean httpx transport for the provider: HTTP/1.1 over an anyio stream.

httpx keeps its client API, request building and timeouts; only the bytes skip
httpcore's layers. h11 writes the request (it checks every header it sends);
httptools (llhttp, in C) parses the response, as the token path's first step: a token
costs one socket read and one parser call (docs/benchmarks.md, step 7). A read hands
over every body byte already parsed, so deltas that arrive together leave together.

HTTP/1.1 only, by design (see client.py). Closing a response before its end closes
the socket at once, so the provider sees EOF. Connections whose response was read to
its end go back to a small idle pool.
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import AsyncIterator
from types import TracebackType

import anyio
import h11
import httptools
import httpx2 as httpx
import sniffio
import trio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSStream

__all__ = ["BODY_EXTENSION", "HTTP1Transport", "PreparedPost", "TLSHandshakeTimeout"]

# The response extension holding the body's ``receive()`` fast path.
BODY_EXTENSION = "gateway.body"

_READ_SIZE = 64 * 1024
# Idle connections older than this are closed rather than reused (httpx's default).
_KEEPALIVE_EXPIRY = 5.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A response head longer than this is refused (h11's bound, which this transport had).
_MAX_HEAD_BYTES = 16 * 1024

_Origin = tuple[str, str, int]
# What the socket (and TLS) raise when the connection fails.
_NETWORK_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)
_MAPPED_ERRORS = (TimeoutError, *_NETWORK_ERRORS)
# What the response parser raises on bytes that are not HTTP/1.1 (an upgrade included).
_PARSE_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class TLSHandshakeTimeout(TimeoutError):
    """The connect timeout ran out during the TLS handshake, not the TCP connect."""


class _Mapped:
    """httpx's exceptions for what the socket and a deadline raise during one kind
    of step: the one place they are mapped (httpx's ``map_httpcore_exceptions`` is the
    model). Built once per step; a read, the hot path, calls ``mapped`` only when it fails."""

    __slots__ = ("_network", "_request", "_timeout", "_what")

    def __init__(
        self,
        request: httpx.Request | None,
        what: str,
        timeout: type[httpx.TimeoutException],
        network: type[httpx.NetworkError],
    ) -> None:
        self._request = request
        self._what = what
        self._timeout = timeout
        self._network = network

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, _MAPPED_ERRORS):
            raise self.mapped(exc) from exc

    def mapped(self, exc: BaseException) -> httpx.TransportError:
        if isinstance(exc, TimeoutError):
            return self._timeout(f"{self._what} timed out", request=self._request)
        return self._network(f"{self._what} failed: {exc!r}", request=self._request)


class _Connection:
    __slots__ = ("idle_since", "origin", "socket", "stream")

    def __init__(self, stream: ByteStream, origin: _Origin) -> None:
        self.stream = stream
        self.origin = origin
        self.idle_since = 0.0
        # Kept: anyio builds its table of attributes on every ``extra()``.
        self.socket = stream.extra(SocketAttribute.raw_socket, None)

    def looks_dead(self) -> bool:
        """An idle connection with something to read has been closed by the server
        (or has sent bytes no request asked for): either way it cannot be reused."""
        sock = self.socket
        if sock is None or sock.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))


class HTTP1Transport(httpx.AsyncBaseTransport):
    """An ``httpx`` transport for plain and TLS HTTP/1.1 with keep-alive.

    ``max_connections`` bounds the responses open at once (a request waits for a slot
    up to the pool timeout); ``max_keepalive`` bounds the idle connections kept.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        max_keepalive: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._slots = anyio.Semaphore(max_connections)
        self._max_keepalive = max_keepalive
        self._ssl_context = ssl_context
        self._idle: list[_Connection] = []
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}", request=request)
        if request.method == "HEAD":
            # Its response's length would be taken for a body to wait for; the gateway
            # never asks for a head alone.
            raise httpx.UnsupportedProtocol("HEAD is not supported", request=request)
        origin = (url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme])
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = await request.aread()
        return await self._open(origin, _serialized(request, body), request, timeouts)

    def prepare_post(self, url: httpx.URL, headers: httpx.Headers) -> PreparedPost:
        """The head of every POST to ``url`` with ``headers`` but its length, checked
        once by h11 as ``handle_async_request`` checks each request's: a stream's
        request is then a concatenation, not a request built and checked anew."""
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}")
        fields = [
            (k, v)
            for k, v in headers.raw
            if k.lower() not in (b"content-length", b"transfer-encoding")
        ]
        head = h11.Connection(h11.CLIENT).send(
            h11.Request(
                method=b"POST", target=url.raw_path, headers=[*fields, (b"content-length", b"0")]
            )
        )
        # h11 ends the head with the length it was given: the prefix is what comes before.
        prefix, _, _ = head.rpartition(b"content-length: 0\r\n")
        origin = (url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme])
        return PreparedPost(origin, prefix)

    async def post(
        self, prepared: PreparedPost, body: bytes, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        """``prepared``'s POST with ``body``: what ``handle_async_request`` does with a
        request, without building one."""
        data = b"%scontent-length: %d\r\n\r\n%s" % (prepared.head, len(body), body)
        return await self._open(prepared.origin, data, None, timeouts)

    async def _open(
        self,
        origin: _Origin,
        data: bytes,
        request: httpx.Request | None,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        await self._acquire(request, timeouts.get("pool"))
        try:
            connection = await self._take_idle(origin)
            if connection is not None:
                try:
                    return await self._exchange(connection, data, request, timeouts)
                except httpx.WriteError:
                    # The server had closed the kept-alive connection: the request
                    # could not be written whole, so it cannot have been acted on, and
                    # one retry on a fresh connection is safe. Once it was written,
                    # a failure is not retried: the provider may have read it, and a
                    # second chat request is a second bill.
                    pass
            connection = await self._connect(request, origin, timeouts.get("connect"))
            return await self._exchange(connection, data, request, timeouts)
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await anyio.aclose_forcefully(connection.stream)

    async def _acquire(self, request: httpx.Request | None, within: float | None) -> None:
        try:
            # A free slot is taken without a checkpoint: on the first token's path, a
            # scheduling round here let the client's start go before the provider's
            # request (docs/benchmarks.md, "The first token").
            self._slots.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        try:
            with anyio.fail_after(within):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no free upstream connection slot", request=request) from exc

    async def _take_idle(self, origin: _Origin) -> _Connection | None:
        """The newest usable idle connection to ``origin``. On the way, every idle
        connection that has expired or that its server closed is closed (with no task
        watching the pool, this is where they go)."""
        now = anyio.current_time()
        found = None
        keep, stale = [], []
        for connection in reversed(self._idle):  # newest first
            if now - connection.idle_since > _KEEPALIVE_EXPIRY or connection.looks_dead():
                stale.append(connection)
            elif found is None and connection.origin == origin:
                found = connection
            else:
                keep.append(connection)
        keep.reverse()
        # Settled before the first await, so a connection released meanwhile is kept.
        self._idle = keep
        for connection in stale:
            await anyio.aclose_forcefully(connection.stream)
        return found

    async def _release(self, connection: _Connection, reusable: bool) -> None:
        try:
            if reusable and not self._closed and len(self._idle) < self._max_keepalive:
                connection.idle_since = anyio.current_time()
                self._idle.append(connection)
            else:
                await anyio.aclose_forcefully(connection.stream)
        finally:
            self._slots.release()

    async def _connect(
        self, request: httpx.Request | None, origin: _Origin, within: float | None
    ) -> _Connection:
        scheme, host, port = origin
        errors = _Mapped(
            request, f"connecting to {host}:{port}", httpx.ConnectTimeout, httpx.ConnectError
        )
        deadline = None if within is None else anyio.current_time() + within
        with errors:
            with anyio.fail_after(within):
                stream: ByteStream = await anyio.connect_tcp(host, port)
            if scheme == "https":
                left = None if deadline is None else deadline - anyio.current_time()
                stream = await self._handshake(stream, host, left)
        return _Connection(stream, origin)

    async def _handshake(self, tcp: ByteStream, host: str, within: float | None) -> ByteStream:
        """TLS over the connected ``tcp`` stream, which is closed if it fails."""
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        try:
            with anyio.fail_after(within):
                return await TLSStream.wrap(
                    tcp, hostname=host, ssl_context=self._ssl_context, standard_compatible=False
                )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(tcp)
            if isinstance(exc, TimeoutError):
                # The provider accepted, then never finished its part of the handshake:
                # told apart from a connect that timed out.
                raise TLSHandshakeTimeout from exc
            raise

    async def _exchange(
        self,
        connection: _Connection,
        data: bytes,
        request: httpx.Request | None,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        try:
            await self._write(connection, data, request, timeouts.get("write"))
            stream = _ResponseStream(self, connection, request, timeouts.get("read"))
            head = await stream.receive_head()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(connection.stream)
            raise
        return httpx.Response(
            status_code=head.status,
            headers=head.headers,
            stream=stream,
            request=request,
            # httpx wraps the stream; the gateway finds the fast path here.
            extensions={
                "http_version": head.version,
                "reason_phrase": head.reason,
                BODY_EXTENSION: stream,
            },
        )

    async def _write(
        self,
        connection: _Connection,
        data: bytes,
        request: httpx.Request | None,
        within: float | None,
    ) -> None:
        rest = _write_now(connection, data)
        if rest is None:
            return
        errors = _Mapped(request, "sending the request", httpx.WriteTimeout, httpx.WriteError)
        with errors, anyio.fail_after(within):
            # The request, what the socket did not take of it, or (``b""``, asyncio) the
            # wait for what the transport holds to drain, as anyio's send waits for it.
            await connection.stream.send(rest)


def _write_now(connection: _Connection, data: bytes) -> bytes | None:
    """``data`` handed to the connection's socket at once, as far as it takes it without
    waiting: what anyio's ``send`` does, without the scheduling round it yields after
    (one of the few on the first token's path: docs/benchmarks.md, "The first token").
    Returns what is left for ``send``: ``None`` when nothing is; ``b""`` on asyncio when
    its transport now holds more than its high-water mark; the rest of ``data`` when
    the socket did not take it all, or ``data`` when it was not written (under TLS, or
    a connection already broken: ``send`` raises what it raises)."""
    stream = connection.stream
    if isinstance(stream, TLSStream):
        return data
    # asyncio and uvloop: the stream's transport (uvloop's socket object cannot send).
    transport = getattr(stream, "_transport", None)
    protocol = getattr(stream, "_protocol", None)
    if transport is not None and protocol is not None:
        if (
            protocol.exception is not None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or not protocol.write_event.is_set()
        ):
            return data
        transport.write(data)
        return None if protocol.write_event.is_set() else b""
    # Trio: its non-blocking socket, which no task is writing to.
    sock = connection.socket
    if not isinstance(sock, socket.socket) or sniffio.current_async_library() != "trio":
        return data
    try:
        sent = sock.send(data)
    except OSError:  # would block, or broken: ``send`` waits, or raises
        return data
    return None if sent == len(data) else data[sent:]


class PreparedPost:
    """A POST's origin and head but its length (``HTTP1Transport.prepare_post``)."""

    __slots__ = ("head", "origin")

    def __init__(self, origin: _Origin, head: bytes) -> None:
        self.origin = origin
        self.head = head


def _serialized(request: httpx.Request, body: bytes) -> bytes:
    # A connection's h11 only writes: it refuses a header that would break the
    # request's framing (a CR or LF in a value).
    conn = h11.Connection(h11.CLIENT)
    headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"transfer-encoding"]
    if not any(k.lower() == b"content-length" for k, _ in headers) and (
        body or request.method not in ("GET", "HEAD")
    ):
        headers.append((b"content-length", str(len(body)).encode()))
    data = conn.send(
        h11.Request(method=request.method, target=request.url.raw_path, headers=headers)
    )
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    return data


class _Response:
    """httptools' callbacks for one response: its head, then the body as parsed.

    The parser and this object refer to each other; ``_ResponseStream.aclose`` breaks
    the cycle, so a stream's end frees both without the garbage collector.
    """

    __slots__ = (
        "complete",
        "extra",
        "head_done",
        "head_size",
        "headers",
        "keep_alive",
        "parser",
        "parts",
        "reason",
        "status",
        "version",
    )

    def __init__(self) -> None:
        self.status = 0
        self.version = b"HTTP/1.1"
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.head_done = False
        self.parts: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        # Bytes after the response's end: nothing a request asked for.
        self.extra = False
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason  # a span split across reads comes in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer: nothing the gateway reads
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status < 200:
            # 1xx: an interim response, without a body; the final one follows.
            self.reason, self.headers = b"", []
            return
        self.status = status
        self.version = b"HTTP/" + self.parser.get_http_version().encode()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.head_done and not self.complete:
            assert self.parser is not None
            self.keep_alive = self.parser.should_keep_alive()
            self.complete = True

    def ends_at_close(self) -> bool:
        """The body has no length and no chunks: the server's close is its end."""
        if self.status in (204, 304):
            return False
        length = False
        for name, value in self.headers:
            name = name.lower()
            if name == b"transfer-encoding":
                return not value.lower().rstrip().endswith(b"chunked")
            length = length or name == b"content-length"
        return not length


class _ResponseStream(httpx.AsyncByteStream):
    """The body of one response; ``receive()`` is the fast path the gateway reads."""

    def __init__(
        self,
        transport: HTTP1Transport,
        connection: _Connection,
        request: httpx.Request | None,
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._connection = connection
        self._request = request
        self._read_timeout = read_timeout
        self._errors = _Mapped(request, "reading the response", httpx.ReadTimeout, httpx.ReadError)
        self._response = _Response()
        # Bytes read since the last body byte (or the first read).
        self._framing = 0
        self._failed: httpx.RemoteProtocolError | None = None
        self._closed = False
        # Aborted by a stop: never back to the pool, even if the body had ended.
        self._aborted = False

    async def receive_head(self) -> _Response:
        response = self._response
        while not response.head_done:
            await self._read()
        return response

    async def receive(self) -> bytes:
        """Every body byte parsed so far, reading once if none is; ``b""`` at the end."""
        response = self._response
        while True:
            parts = response.parts
            if parts:
                response.parts = []
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if response.complete:
                return b""
            await self._read()

    def abort(self) -> bool:
        """Close the connection now, from any task: the provider sees it closed at once,
        and a ``receive()`` waiting on it returns or fails. ``aclose()`` still follows.
        ``False`` if this stream cannot be aborted."""
        if self._closed:
            return True
        self._aborted = True
        stream = self._connection.stream
        # Under TLS, the TCP stream beneath.
        stream = getattr(stream, "transport_stream", stream)
        # anyio's asyncio stream: its transport closes the socket (uvloop's sockets
        # refuse shutdown()), and a transport, unlike a descriptor number, is never reused.
        abort = getattr(getattr(stream, "_transport", None), "abort", None)
        if callable(abort):
            abort()
            return True
        sock = stream.extra(SocketAttribute.raw_socket, None)
        if sock is None:
            return False
        # Trio: closed, not just shut down, so that the provider sees it even while it
        # is blocked writing to us (a close with unread data resets the connection).
        # Trio is told first, so a task blocked on the socket wakes; the socket object
        # reads -1 once closed, so nothing can reach a descriptor reused since.
        trio.lowlevel.notify_closing(sock)
        sock.close()
        return True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.receive():
            yield chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        response = self._response
        response.parser = None
        reusable = (
            response.complete and response.keep_alive and not response.extra and not self._aborted
        )
        await self._transport._release(self._connection, reusable)

    async def _read(self) -> None:
        """One read from the socket, parsed: the head's fields, or body bytes in
        ``parts``."""
        if self._failed is not None:
            raise self._failed
        response = self._response
        parser = response.parser
        if parser is None:
            raise httpx.ReadError("the response is closed", request=self._request)
        try:
            if self._read_timeout is None:
                data = await self._connection.stream.receive(_READ_SIZE)
            else:
                with anyio.fail_after(self._read_timeout):
                    data = await self._connection.stream.receive(_READ_SIZE)
        except anyio.EndOfStream:
            self._end_of_stream()
            return
        except _MAPPED_ERRORS as exc:
            raise self._errors.mapped(exc) from exc
        try:
            parser.feed_data(data)
        except _PARSE_ERRORS as exc:
            if response.complete:
                response.extra = True  # after the end: the body is whole, the connection spoilt
                return
            error = httpx.RemoteProtocolError(
                f"the provider's response is not valid HTTP/1.1: {exc}", request=self._request
            )
            if not response.head_done:
                raise error from exc
            error.__cause__ = exc
            # What was parsed before the error is read first, as a provider's
            # in-stream error is (parser.py).
            self._failed = error
        # Checked after the parse, whole heads and heads cut short alike.
        if response.head_size > _MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError(
                f"the provider's response head is over {_MAX_HEAD_BYTES} bytes",
                request=self._request,
            )
        if response.parts or response.complete:
            self._framing = 0
            return
        # Bytes that are not body, read one after another: a head that never ends, or
        # endless chunk framing or trailers (which the parser would keep in memory).
        self._framing += len(data)
        if self._framing > _MAX_HEAD_BYTES:
            what = "response head" if not response.head_done else "body framing"
            raise httpx.RemoteProtocolError(
                f"the provider's {what} is over {_MAX_HEAD_BYTES} bytes", request=self._request
            )

    def _end_of_stream(self) -> None:
        response = self._response
        if response.complete:
            return
        if response.head_done and response.ends_at_close():
            response.complete = True
            response.keep_alive = False
            return
        what = "the response's end" if response.head_done else "answering"
        raise httpx.RemoteProtocolError(
            f"the provider closed the connection before {what}", request=self._request
        )

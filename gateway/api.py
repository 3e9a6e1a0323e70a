"""The HTTP API as a Starlette application: routes, request validation, errors, lifespan.

``create_app(settings)`` builds one; ``gateway.app:app`` is one built from the environment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from .auth import Authenticator
from .cluster import CancelUnavailable, Cluster
from .errors import BadRequest, HTTPError, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from .framing import RefuseAmbiguousFraming
from .logs import ensure_handler, loggable
from .openapi import openapi
from .registry import Registry
from .responses import error_response
from .server import load_config, serve
from .session import MAX_MODEL_CHARS, SESSION_ID_RE, Session
from .settings import Settings
from .simulator import Simulator, SimulatorConfig
from .stream import ChatStream
from .upstream import create_client

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_STATIC = Path(__file__).parent / "static"
_DEMO_WAIT = 1.0
# The exit status of a process whose background task failed (EX_SOFTWARE). hypercorn
# stops all its workers when one exits non-zero, so a supervisor restarts the lot.
EXIT_BACKGROUND_FAILURE = 70
_ROLES = ("system", "user", "assistant")


class _Lifespan:
    """The app's resources: the provider client and, in demo mode, the simulator.

    A class rather than an ``@asynccontextmanager`` so that no task group is held
    across a ``yield``.
    """

    def __init__(self, app: Starlette) -> None:
        self._state = app.state
        self._settings: Settings = app.state.settings
        self._tg: TaskGroup | None = None
        self._stop_simulator = anyio.Event()
        self._cluster_scope = anyio.CancelScope()
        self._stopping = False

    async def __aenter__(self) -> None:
        # Here, not at import: the server has set up its logging by now.
        ensure_handler()
        state = self._state
        state.client = create_client(self._settings)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if state.cluster is not None:
            await self._tg.start(self._supervise, "cluster", self._run_cluster)
        if self._settings.upstream_url is not None:
            state.upstream_url = self._settings.upstream_url
            return
        simulator = Simulator(
            SimulatorConfig(
                tokens=self._settings.simulator_tokens, rate=self._settings.simulator_rate
            )
        )
        addresses = await self._tg.start(
            self._supervise,
            "simulator",
            functools.partial(_serve_simulator, simulator, self._stop_simulator.wait),
        )
        host, port = addresses[0]
        state.simulator = simulator
        state.upstream_url = f"http://{host}:{port}/v1"
        logger.info(
            "No GATEWAY_UPSTREAM_URL: serving the built-in provider simulator on %s",
            state.upstream_url,
        )

    async def _supervise(
        self,
        name: str,
        run: Callable[..., Awaitable[None]],
        *,
        task_status: anyio.abc.TaskStatus[Any],
    ) -> None:
        """Run a background task for the app's life. A failure before it has started
        fails the start-up. After that, a failure or an early end would leave an
        instance that looks alive and is not (no cross-instance cancels, no provider):
        it is logged, every stream is stopped as at shutdown, and the process exits
        non-zero, for its supervisor to restart."""
        status = _StartedOnce(task_status)
        try:
            await run(task_status=status)
        except Exception:
            if not status.done:
                raise
            if self._stopping:
                # The app is shutting down anyway; the failure is still worth seeing.
                logger.exception("background task %r failed while stopping", name)
                return
            logger.exception("background task %r failed: this instance stops", name)
        else:
            if self._stopping:
                return
            logger.error("background task %r ended on its own: this instance stops", name)
        await self._exit_on_failure()

    async def _exit_on_failure(self) -> None:
        with anyio.move_on_after(self._settings.cancel_wait):
            await self._state.registry.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        # Not an exception: the server would log it and serve on without its lifespan.
        os._exit(EXIT_BACKGROUND_FAILURE)

    async def _run_cluster(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        state = self._state
        cluster: Cluster = state.cluster

        async def cancel_here(principal: str, session_id: str) -> bool:
            logger.info("[SSE] Cancel request forwarded for %s", session_id)
            session = state.registry.get(session_id, principal)
            return bool(await _stop_here(session, state.settings.cancel_wait))

        with self._cluster_scope:
            await cluster.run(cancel_here, task_status=task_status)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        try:
            with anyio.move_on_after(5.0):
                await self._state.registry.shutdown()
            if self._tg is not None:
                if self._state.cluster is not None:
                    self._state.cluster.stop()
                    # Leaving Redis normally is bounded; past that it is cancelled.
                    self._cluster_scope.deadline = anyio.current_time() + 3.0
                self._stop_simulator.set()
                await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.move_on_after(5.0, shield=True):
                await self._state.client.aclose()


class _StartedOnce:
    """A task status that remembers whether the task has reported its start."""

    def __init__(self, inner: anyio.abc.TaskStatus[Any]) -> None:
        self._inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self._inner.started(value)


async def _serve_simulator(
    simulator: Simulator, stop: Any, *, task_status: anyio.abc.TaskStatus[Any]
) -> None:
    config = load_config(bind=["127.0.0.1:0"], graceful_timeout=1.0, accesslog=None, errorlog=None)
    await serve(simulator, config, shutdown_trigger=stop, task_status=task_status)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    middleware = [Middleware(RefuseAmbiguousFraming)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type", "x-session-id"],
                expose_headers=["x-session-id"],
                max_age=600,
            )
        )
    app = Starlette(
        middleware=middleware,
        routes=[
            Route("/api/chat/stream", _chat_stream, methods=["POST"]),
            Route("/api/chat/cancel/{session_id}", _chat_cancel, methods=["POST"]),
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/openapi.json", _openapi, methods=["GET"]),
            Route("/api/demo/provider/{session_id}", _demo_provider, methods=["GET"]),
            Route("/", _index, methods=["GET"]),
            Mount("/static", StaticFiles(directory=_STATIC), name="static"),
        ],
        exception_handlers={
            HTTPError: _handle_gateway_error,
            ClientDisconnect: _handle_client_disconnect,
            HTTPException: _handle_http_exception,
            Exception: _handle_internal_error,
        },
        lifespan=_Lifespan,
    )
    app.state.settings = settings
    authenticated = bool(settings.api_keys or settings.principal_header)
    app.state.registry = Registry(
        max_sessions=settings.max_sessions,
        # Without authentication the one anonymous principal is every client: only
        # the process-wide limit applies.
        max_per_principal=settings.max_sessions_per_principal if authenticated else None,
    )
    app.state.auth = Authenticator(settings)
    app.state.openapi = openapi(settings)
    app.state.cluster = (
        Cluster(settings.redis_url, claim_ttl=settings.claim_ttl, cancel_wait=settings.cancel_wait)
        if settings.redis_url
        else None
    )
    # A level, not a handler: where the lines go is the operator's logging config.
    logging.getLogger("gateway").setLevel(settings.log_level_number)
    return app


def _principal(request: Request) -> str:
    auth: Authenticator = request.app.state.auth
    return auth.principal(request.headers, request.client.host if request.client else None)


async def _chat_stream(request: Request) -> Response:
    state = request.app.state
    principal = _principal(request)
    session_id = _session_id(request.headers.get("x-session-id"))
    body = await _json_body(request, state.settings.max_body_bytes, state.settings.body_timeout)
    payload = _chat_payload(body, state.settings)
    return _StreamResponse(
        ChatStream(
            principal=principal,
            registry=state.registry,
            cluster=state.cluster,
            client=state.client,
            settings=state.settings,
            upstream_url=state.upstream_url,
            session_id=session_id,
            payload=payload,
            # Demo mode: the simulator records whose session it served, for the page's
            # panel (which shows a principal its own sessions only).
            upstream_headers=_demo_headers(principal, session_id) if _simulator(request) else None,
        )
    )


class _StreamResponse(Response):
    """Hands the ASGI call to a ``ChatStream`` (Starlette routes want a Response)."""

    def __init__(self, stream: ASGIApp) -> None:
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._stream(scope, receive, send)


async def _chat_cancel(request: Request) -> Response:
    principal = _principal(request)
    session_id = request.path_params["session_id"]
    logger.info("[SSE] Cancel request received for %s", loggable(session_id))
    if not SESSION_ID_RE.fullmatch(session_id):
        # No stream can have this id: the same answer as an unknown one.
        return JSONResponse({"ok": False, "reason": "not_found"}, status_code=404)
    state = request.app.state
    # Another principal's session answers exactly like an unknown one.
    session = state.registry.get(session_id, principal)
    if session is None and state.cluster is not None:
        try:
            stopped = await state.cluster.forward_cancel(principal, session_id)
        except CancelUnavailable:
            return JSONResponse(
                {
                    "error": {
                        "code": "cancel_unavailable",
                        "message": "the stream may live on another instance, and Redis "
                        "cannot be reached to ask it",
                    }
                },
                status_code=503,
            )
        if stopped:
            return JSONResponse({"ok": True, "cancelled": True, "session_id": session_id})
    ended = await _stop_here(session, state.settings.cancel_wait)
    if ended is None:
        return JSONResponse({"ok": False, "reason": "not_found"}, status_code=404)
    if not ended:
        return JSONResponse(
            {
                "error": {
                    "code": "cancel_timeout",
                    "message": "the stream did not end within the wait bound",
                }
            },
            status_code=504,
        )
    return JSONResponse({"ok": True, "cancelled": True, "session_id": session_id})


def _simulator(request: Request) -> Simulator | None:
    simulator: Simulator | None = getattr(request.app.state, "simulator", None)
    return simulator


async def _demo_provider(request: Request) -> Response:
    """What the built-in simulator did for a session: the token saving made visible."""
    principal = _principal(request)
    simulator = _simulator(request)
    if simulator is None:
        raise HTTPException(404, "demo mode is off: the gateway talks to a real provider")
    session_id = request.path_params["session_id"]
    # Another principal's session is not found, at once (no wait tells it exists).
    record = simulator.record_for(session_id, _demo_headers(principal, session_id)["x-principal"])
    if record is None:
        raise HTTPException(404, "the simulator has no stream for this session")
    # Asked right after a stop, the simulator may not have seen the close yet.
    with anyio.move_on_after(_DEMO_WAIT):
        await simulator.wait_until(lambda: record.outcome != "streaming")
    return JSONResponse(
        {
            "session_id": session_id,
            "planned": record.planned,
            "generated": record.sent,
            "outcome": record.outcome,
        }
    )


def _demo_headers(principal: str, session_id: str) -> dict[str, str]:
    # Hex: a principal (an API key's name) may hold characters a header cannot.
    return {"x-session-id": session_id, "x-principal": principal.encode().hex()}


async def _openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def _index(request: Request) -> Response:
    return FileResponse(_STATIC / "index.html")


async def _stop_here(session: Session | None, wait: float) -> bool | None:
    """Cancel a stream of this process and wait for its end (provider closed, terminal
    event written): ``None`` if there was nothing to stop (no such stream, or it already
    has an outcome), else whether it ended within ``wait``."""
    if session is None or not session.cancel("cancel"):
        return None
    with anyio.move_on_after(wait):
        await session.ended.wait()
    return session.ended.is_set()


async def _healthz(request: Request) -> Response:
    state = request.app.state
    registry: Registry = state.registry
    status = "shutting_down" if registry.closing else "ok"
    body: dict[str, Any] = {"status": status, "sessions": len(registry)}
    if state.cluster is not None:
        body["instance"] = state.cluster.instance_id
        body["cluster"] = "ok" if state.cluster.available else "unavailable"
    return JSONResponse(body, status_code=503 if registry.closing else 200)


def _session_id(value: str | None) -> str:
    if value is None:
        raise BadRequest("the X-Session-Id header is required", code="missing_session_id")
    if not SESSION_ID_RE.fullmatch(value):
        raise BadRequest(
            "X-Session-Id must be 8-128 characters of A-Z a-z 0-9 _ . : -",
            code="invalid_session_id",
        )
    return value


async def _json_body(request: Request, limit: int, within: float) -> Any:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType("the request body must be application/json")
    too_large = PayloadTooLarge(f"the request body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # answered before reading a byte of it
    body = bytearray()
    with anyio.move_on_after(within) as scope:
        async with contextlib.aclosing(request.stream()) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > limit:
                    raise too_large
    if scope.cancelled_caught:
        logger.info("request body not received within %gs: answered 408", within)
        # The rest of the body may still come: the connection cannot be reused.
        raise RequestTimeout(
            f"the request body did not arrive within {within:g} seconds",
            headers={"connection": "close"},
        )
    try:
        return json.loads(body)
    except ValueError:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply", code="invalid_json") from None


def _chat_payload(body: Any, settings: Settings) -> dict[str, Any]:
    """Validate the client's body and build the provider request from known fields only."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", code="invalid_body")
    if len(messages) > settings.max_messages:
        raise BadRequest(
            f"messages must have at most {settings.max_messages} entries", code="invalid_body"
        )
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", code="invalid_body")
        if message.get("role") not in _ROLES:
            raise BadRequest(
                f"messages[{i}].role must be one of {', '.join(_ROLES)}", code="invalid_body"
            )
        if not isinstance(message.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string", code="invalid_body")
        _check_text(message["content"], f"messages[{i}].content")
        if len(message["content"]) > settings.max_message_chars:
            raise BadRequest(
                f"messages[{i}].content is longer than {settings.max_message_chars} characters",
                code="invalid_body",
            )
        clean.append({"role": message["role"], "content": message["content"]})
    model = body.get("model", settings.model)
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string", code="invalid_body")
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"model is longer than {MAX_MODEL_CHARS} characters", code="invalid_body")
    _check_text(model, "model")
    payload: dict[str, Any] = {
        "model": model,
        "messages": clean,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if "temperature" in body:
        temperature = body["temperature"]
        if (
            not isinstance(temperature, int | float)
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or not 0 <= temperature <= 2
        ):
            raise BadRequest("temperature must be a number from 0 to 2", code="invalid_body")
        payload["temperature"] = temperature
    if "max_tokens" in body:
        max_tokens = body["max_tokens"]
        # JSON has one number type: 5.0 is the integer 5 (as JSON Schema says too).
        if isinstance(max_tokens, float) and max_tokens.is_integer():
            max_tokens = int(max_tokens)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("max_tokens must be a positive integer", code="invalid_body")
        payload["max_tokens"] = max_tokens
    return payload


def _check_text(value: str, field: str) -> None:
    """Refuse text that cannot be sent as UTF-8: JSON's ``\\udfff`` escapes decode to lone
    surrogates, which no encoder after this point could write."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{field} is not valid Unicode text (it has a lone surrogate)", code="invalid_body"
        ) from None


class _NoAnswer(Response):
    """For a client that has gone: there is nobody to answer."""

    def __init__(self) -> None:
        pass

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


async def _handle_client_disconnect(request: Request, exc: Exception) -> Response:
    logger.info("client went away while sending its request body")
    return _NoAnswer()


async def _handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return error_response(exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail)}},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _handle_internal_error(request: Request, exc: Exception) -> Response:
    logger.error(
        "internal error on %s %s", request.method, loggable(request.url.path), exc_info=exc
    )
    return JSONResponse(
        {"error": {"code": "internal_error", "message": "the gateway failed"}}, status_code=500
    )

"""The HTTP API as a Starlette application: its routes and error handlers.

``create_app(settings)`` builds one; ``gateway.app:app`` is one built from the environment.
Request validation is in validation.py, the lifespan in lifespan.py, the cancellation
path in core/session.py and core/registry.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..cluster.instance import Cluster
from ..core.metrics import Metrics
from ..core.registry import SESSION_ID_RE, Registry
from ..errors import (
    APIError,
    BadRequest,
    CancelTimeout,
    CancelUnavailable,
    ModelNotFound,
    PayloadTooLarge,
    UpstreamError,
)
from ..logs import loggable, use_format
from ..provider.client import COUNT_TOKENS_PATH, post_for_json
from ..provider.routing import Plan
from ..resume.log import ResumeStore
from ..resume.messages import FollowMessages
from ..settings import Settings
from .auth import Authenticator, check_bearer
from .formats import AnswerFormat, ChatCompletion, ChatCompletionChunks, GatewayEvents
from .framing import RefuseAmbiguousFraming
from .lifespan import Lifespan
from .messages import (
    MessagesAnswer,
    MessagesEvents,
    anthropic_error,
    chat_form,
    messages_body,
)
from .messages import error_response as messages_error
from .openapi import openapi
from .responses import error_json, error_response
from .resume_routes import chat_resume
from .state import GatewayState, principal_of, state_of
from .stream import ChatStream
from .validation import (
    ProviderRequest,
    chat_payload,
    json_body,
    new_session_id,
    session_id_from,
    stream_options,
)
from .writer import SERVER_SEND

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_STATIC = Path(__file__).parent / "static"
# The cancel endpoint's 404, the same for an unknown id and another principal's.
_NOT_FOUND = JSONResponse({"ok": False, "reason": "not_found"}, status_code=404)
_DEMO_WAIT = 1.0


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    middleware = [Middleware(RefuseAmbiguousFraming)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "x-session-id",
                    # The Anthropic SDKs' (in a browser).
                    "x-api-key",
                    "anthropic-version",
                    "anthropic-beta",
                    "anthropic-dangerous-direct-browser-access",
                ],
                expose_headers=["x-session-id", "x-resume-window"],
                max_age=600,
            )
        )
    app = _Gateway(
        middleware=middleware,
        routes=[
            Route("/api/chat/stream", _Streaming(_chat_stream), methods=["POST"]),
            Route("/api/chat/stream/{session_id}", _Streaming(chat_resume), methods=["GET"]),
            Route("/api/chat/cancel/{session_id}", _chat_cancel, methods=["POST"]),
            Route("/v1/chat/completions", _Streaming(_chat_completions), methods=["POST"]),
            Route("/v1/messages", _Streaming(_messages), methods=["POST"]),
            Route("/v1/messages/count_tokens", _count_tokens, methods=["POST"]),
            Route("/v1/models", _models, methods=["GET"]),
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/metrics", _metrics, methods=["GET"]),
            Route("/openapi.json", _openapi, methods=["GET"]),
            Route("/api/demo/provider/{session_id}", _demo_provider, methods=["GET"]),
            Route("/", _index, methods=["GET"]),
            Mount("/static", StaticFiles(directory=_STATIC), name="static"),
        ],
        exception_handlers={
            APIError: _handle_gateway_error,
            ClientDisconnect: _handle_client_disconnect,
            HTTPException: _handle_http_exception,
            Exception: _handle_internal_error,
        },
        lifespan=Lifespan,
    )
    authenticated = bool(settings.api_keys or settings.principal_header)
    state = app.state.gateway = GatewayState(
        settings=settings,
        registry=Registry(
            max_sessions=settings.max_sessions,
            # Without authentication the one anonymous principal is every client: only
            # the process-wide limit applies.
            max_per_principal=settings.max_sessions_per_principal if authenticated else None,
        ),
        auth=Authenticator(settings),
        metrics=Metrics(
            enabled=settings.metrics,
            providers=tuple(p.name for p in settings.providers_and_routes()[0]),
        ),
        resume=(
            ResumeStore(
                settings.resume_window,
                max_ended=settings.max_sessions,
                max_ended_bytes=settings.resume_total_bytes,
            )
            if settings.resume_window > 0
            else None
        ),
        openapi=openapi(settings),
        cluster=(
            Cluster(
                settings.redis_url,
                claim_ttl=settings.claim_ttl,
                cancel_wait=settings.cancel_wait,
                redis_timeout=settings.redis_timeout,
            )
            if settings.redis_url
            else None
        ),
    )
    if state.cluster is not None and state.resume is not None:
        # Resumes across instances (docs/resume.md).
        state.follow = FollowMessages(state.cluster)
    # A level, not a handler: where the lines go is the operator's logging config.
    logging.getLogger("gateway").setLevel(settings.log_level_number)
    use_format(settings.log_format)
    return app


class _Gateway(Starlette):
    """Starlette, with the server's own ``send`` in each request's scope (writer.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


class _Streaming:
    """The endpoint of a route that streams, as a plain ASGI app. The route of a
    function (Starlette's ``request_response``) keeps its request, a second layer of
    exception handling (the application's ExceptionMiddleware has the same handlers)
    and their closures alive while the response runs: objects per stream for the
    garbage collector to walk (docs/benchmarks.md, step 20). Here the request is let
    go once the handler returns."""

    def __init__(self, handler: Callable[[Request], Awaitable[ASGIApp]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._handler(Request(scope, receive, send))
        await response(scope, receive, send)


async def _chat_stream(request: Request) -> ASGIApp:
    state = state_of(request)
    principal = principal_of(request)
    session_id = session_id_from(request.headers.get("x-session-id"))
    body = await json_body(request, state.settings.max_body_bytes, state.settings.body_timeout)
    payload = chat_payload(body, state.settings)
    return _stream(request, principal, session_id, payload, GatewayEvents())


async def _chat_completions(request: Request) -> ASGIApp:
    """OpenAI's Chat Completions endpoint, on the same sessions and cancellation path."""
    state = state_of(request)
    principal = principal_of(request)
    given = request.headers.get("x-session-id")
    session_id = new_session_id() if given is None else session_id_from(given)
    body = await json_body(request, state.settings.max_body_bytes, state.settings.body_timeout)
    payload = chat_payload(body, state.settings)
    stream, include_usage = stream_options(body)
    answer: AnswerFormat
    if stream:
        answer = ChatCompletionChunks(include_usage)
    else:
        answer = ChatCompletion(state.settings.max_answer_bytes)
    return _stream(request, principal, session_id, payload, answer)


async def _messages(request: Request) -> ASGIApp:
    """Anthropic's Messages endpoint (docs/api.md), on the same sessions and
    cancellation path; to an Anthropic provider the request goes as the client sent
    it, to an OpenAI-compatible one translated."""
    state = state_of(request)
    principal = principal_of(request)
    given = request.headers.get("x-session-id")
    session_id = new_session_id() if given is None else session_id_from(given)
    body = await json_body(request, state.settings.max_body_bytes, state.settings.body_timeout)
    native, stream = messages_body(body, state.settings)
    plan = _plan(request, native["model"])
    if plan.anthropic_only:
        # Not sent to any provider: what the session and its log need of the request.
        payload: ProviderRequest = {
            "model": native["model"],
            "messages": [],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    else:
        payload = chat_form(native, state.settings)
    limit = state.settings.max_answer_bytes
    answer: AnswerFormat = MessagesEvents() if stream else MessagesAnswer(limit)
    return _stream(request, principal, session_id, payload, answer, native, plan)


_COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking")


async def _count_tokens(request: Request) -> Response:
    """Anthropic's token count, asked of the first target of the model's route when
    it is an Anthropic provider (other APIs have none); its answer passed on."""
    state = state_of(request)
    principal_of(request)
    body = await json_body(request, state.settings.max_body_bytes, state.settings.body_timeout)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    model = body.get("model", state.settings.model)
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string", code="invalid_body")
    provider, target = _plan(request, model).targets[0]
    if not provider.anthropic:
        raise ModelNotFound(
            f"count_tokens is offered for models an Anthropic provider serves; {model!r} "
            "is not one",
            code="count_tokens_unavailable",
        )
    asked = {name: body[name] for name in _COUNT_FIELDS if name in body}
    try:
        status, answer = await post_for_json(
            provider.client, provider.base_url, COUNT_TOKENS_PATH, {**asked, "model": target}
        )
    except UpstreamError as exc:
        return JSONResponse(anthropic_error(502, exc.code, exc.message), status_code=502)
    tokens = answer.get("input_tokens") if isinstance(answer, dict) else None
    if status != 200 or not isinstance(tokens, int) or isinstance(tokens, bool):
        # The provider's error body may hold what the client should not see.
        message = f"provider answered HTTP {status}"
        if status == 400:
            raise BadRequest(f"{message}: the request was refused", code="upstream_error")
        return JSONResponse(anthropic_error(502, "upstream_error", message), status_code=502)
    return JSONResponse({"input_tokens": tokens})


def _plan(request: Request, model: str) -> Plan:
    plan = state_of(request).providers.plan(model)
    if plan is None:
        raise ModelNotFound(f"no route serves the model {model!r}")
    return plan


def _stream(
    request: Request,
    principal: str,
    session_id: str,
    payload: ProviderRequest,
    answer: AnswerFormat,
    native: dict[str, Any] | None = None,
    plan: Plan | None = None,
) -> ChatStream:
    state = state_of(request)
    if plan is None:
        plan = _plan(request, payload["model"])
    plan.prepare(payload, native)
    return ChatStream(
        state,
        plan,
        principal=principal,
        session_id=session_id,
        payload=payload,
        # Demo mode: the simulator records whose session it served, for the page's
        # panel (which shows a principal its own sessions only).
        demo_headers=_demo_headers(principal, session_id) if state.simulators else None,
        answer=answer,
    )


async def _models(request: Request) -> Response:
    """The routes' model names (without GATEWAY_CONFIG: the configured model), then,
    with a catch-all route, its provider's own list when it answers one."""
    state = state_of(request)
    principal_of(request)
    providers = state.providers
    ids = providers.route_names() or [state.settings.model]
    catch_all = providers.catch_all
    if catch_all is not None:
        listed = await catch_all.models.ids(
            catch_all.client, catch_all.base_url, state.settings.max_models_bytes
        )
        ids += [i for i in listed if i not in ids]
    data = [{"id": i, "object": "model", "created": 0, "owned_by": "gateway"} for i in ids]
    return JSONResponse({"object": "list", "data": data})


async def _chat_cancel(request: Request) -> Response:
    principal = principal_of(request)
    session_id = request.path_params["session_id"]
    logger.info("[SSE] Cancel request received for %s", loggable(session_id))
    state = state_of(request)
    if not SESSION_ID_RE.fullmatch(session_id):
        # No stream can have this id: the same answer as an unknown one.
        state.metrics.cancel_request("not_found")
        return _NOT_FOUND
    # Another principal's session answers exactly like an unknown one.
    # Not here: ask the owner through Redis (CancelUnavailable, 503, if it cannot).
    if state.registry.get(session_id, principal) is None and state.cluster is not None:
        try:
            forwarded = await state.cluster.forward_cancel(principal, session_id)
        except CancelUnavailable:
            state.metrics.cancel_request("unavailable")
            raise
        if forwarded:
            state.metrics.cancel_request("forwarded")
            return _cancelled(session_id)
    ended = await state.registry.stop(session_id, principal, state.settings.cancel_wait)
    if ended is None:
        state.metrics.cancel_request("not_found")
        return _NOT_FOUND
    if not ended:
        state.metrics.cancel_request("timeout")
        raise CancelTimeout("the stream did not end within the wait bound")
    state.metrics.cancel_request("stopped")
    return _cancelled(session_id)


def _cancelled(session_id: str) -> Response:
    return JSONResponse({"ok": True, "cancelled": True, "session_id": session_id})


async def _demo_provider(request: Request) -> Response:
    """What the built-in simulator did for a session: the token saving made visible.
    (With several simulated providers, the one the session reached last.)"""
    principal = principal_of(request)
    simulators = state_of(request).simulators
    if not simulators:
        raise HTTPException(404, "demo mode is off: the gateway talks to a real provider")
    session_id = request.path_params["session_id"]
    # Another principal's session is not found, at once (no wait tells it exists).
    hexed = _demo_headers(principal, session_id)["x-principal"]
    found = [
        (simulator, record)
        for simulator in simulators.values()
        if (record := simulator.record_for(session_id, hexed)) is not None
    ]
    if not found:
        raise HTTPException(404, "the simulator has no stream for this session")
    simulator, record = max(found, key=lambda f: f[1].started_at)
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


async def _metrics(request: Request) -> Response:
    """Prometheus's text format; behind its own bearer key when GATEWAY_METRICS_KEY is set
    (a scraper is not a principal of the chat API)."""
    state = state_of(request)
    if not state.settings.metrics:
        raise HTTPException(404, "metrics are off (GATEWAY_METRICS=off)")
    key = state.settings.metrics_key
    if key is not None:
        check_bearer(
            request.headers,
            key,
            realm="metrics",
            message="GET /metrics needs Authorization: Bearer <GATEWAY_METRICS_KEY>",
        )
    if state.cluster is not None:
        state.metrics.cluster_available.set(1 if state.cluster.available else 0)
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _openapi(request: Request) -> Response:
    return JSONResponse(state_of(request).openapi)


async def _index(request: Request) -> Response:
    return FileResponse(_STATIC / "index.html")


async def _healthz(request: Request) -> Response:
    state = state_of(request)
    registry: Registry = state.registry
    status = "shutting_down" if registry.closing else "ok"
    body: dict[str, object] = {"status": status, "sessions": len(registry)}
    if state.cluster is not None:
        body["instance"] = state.cluster.instance_id
        body["cluster"] = "ok" if state.cluster.available else "unavailable"
    return JSONResponse(body, status_code=503 if registry.closing else 200)


class _NoAnswer(Response):
    """For a client that has gone: there is nobody to answer."""

    def __init__(self) -> None:
        pass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pass


async def _handle_client_disconnect(request: Request, exc: Exception) -> Response:
    logger.info("client went away while sending its request body")
    return _NoAnswer()


async def _handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    # Each surface in its own envelope: Anthropic's on /v1/messages.
    anthropic = request.url.path.startswith("/v1/messages")
    response = messages_error(exc) if anthropic else error_response(exc)
    if isinstance(exc, PayloadTooLarge):
        return _Drained(response, state_of(request).settings)
    return response


# How much of an oversized body is read, and thrown away, after its 413.
_DRAIN_BYTES = 64 * 1024 * 1024


class _Drained(Response):
    """An answer sent before the request body was read (a 413), then the rest of the
    body read and thrown away, up to ``_DRAIN_BYTES`` and ``GATEWAY_BODY_TIMEOUT``:
    closing with the body unread makes the kernel reset the connection, and a client
    still sending gets the reset, not the answer (nginx's lingering close does the
    same). The connection is closed after it."""

    def __init__(self, answer: Response, settings: Settings) -> None:
        self._answer = answer
        self._within = settings.body_timeout
        answer.headers["connection"] = "close"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def held(message: Message) -> None:
            # The whole answer (its Content-Length says when it is), but not its end:
            # hypercorn closes a `connection: close` response's connection at its end.
            if message["type"] == "http.response.body":
                message = {**message, "more_body": True}
            await send(message)

        await self._answer(scope, receive, held)
        drained = 0
        with anyio.move_on_after(self._within):
            while drained < _DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client has gone
                drained += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_json(exc.status_code, code, str(exc.detail), exc.headers)


async def _handle_internal_error(request: Request, exc: Exception) -> Response:
    logger.error(
        "internal error on %s %s", request.method, loggable(request.url.path), exc_info=exc
    )
    return error_json(500, "internal_error", "the gateway failed")

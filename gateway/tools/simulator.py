"""A built-in OpenAI-compatible provider that streams like OpenAI or DeepSeek.

It is the embedded default (``gateway serve`` with no upstream URL) and the provider
behind every test. Each stream it serves leaves a ``StreamRecord`` saying how it
ended: ``completed``, or ``closed_by_client`` at token k of n, with the time on
``time.monotonic()`` (CLOCK_MONOTONIC, comparable across processes on Linux).
``GET /v1/_streams`` returns the records as JSON.

It answers ``POST <any base>/chat/completions``, so any base URL can be tested, and
``POST <any base>/messages`` in Anthropic's Messages format: ``message_start``, a
``ping``, a thinking block with its signature (when the request turns thinking on, or
the model is a reasoner), text or a ``tool_use`` block, ``message_delta`` and
``message_stop``; ``ping`` events as its keep-alives. What it keeps is bounded: it runs
for as long as a demo does.

It speaks the wire formats of the real providers: a model whose name ends in
``reasoner`` (``simulator-reasoner``) thinks first, DeepSeek-style
(``delta.reasoning_content`` with ``content: null``, keep-alives between); a request
with ``tools`` whose last message is not a tool result is answered with a call to its
first tool, the arguments split across chunks as OpenAI does; the usage carries
DeepSeek's extra fields; ``"stream": false`` gets a ``chat.completion`` object.

A model whose name ends in ``-status-429`` (any status), ``-stall`` or ``-reset-2`` (any
count) plays that fault: the status at once, a head and no delta, a connection broken
after that many deltas (so one simulator can play a route's several targets);
``-overloaded`` sends an ``overloaded_error`` in the stream before any delta.

Three more modes, chosen by ``SimulatorConfig.mode`` or a model name ending in the
mode's name (``simulator-refusal``): ``refusal`` answers in ``delta.refusal`` with
``content: null``, as OpenAI's structured outputs do; ``parts`` thinks and answers in
Mistral's content parts (``delta.content`` as ``[{"type": "thinking", ...}]``, then
``[{"type": "text", ...}]``); ``error`` ends its answer with OpenRouter's
``finish_reason: "error"`` and a ``native_finish_reason``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus
from starlette.types import Message, Receive, Scope, Send

from ..server.serve import load_config, serve

__all__ = ["Simulator", "SimulatorConfig", "StreamRecord", "serve_simulator"]

_TEXT = (
    "When you press Stop, the gateway cancels one scope. That scope owns the task that "
    "reads from the provider, so the provider's connection closes at once and the "
    "provider stops generating. Nobody pays for tokens that nobody reads. The browser "
    "keeps the words it already has, the server writes one line that says the stream "
    "was aborted, and the next question starts clean. Structured concurrency makes "
    "this the default rather than a patch: every stream lives inside a task group, "
    "every trigger takes the same path, and cleanup always runs."
)
_WORDS = _TEXT.split(" ")
_RECORDS_KEPT = 1000
_MODES = ("refusal", "parts", "error")
# Whole request bodies (up to the gateway's body limit each): the last few only.
_REQUESTS_KEPT = 16


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulated provider behaves; the fault fields exist for tests.

    ``rate`` is tokens per second (0: as fast as the socket takes them).
    """

    tokens: int = 300
    rate: float = 40.0
    queue_seconds: float = 0.0
    keepalive_interval: float = 1.0
    stall_after: int | None = None
    status: int | None = None
    reset_after: int | None = None
    malformed_after: int | None = None
    omit_done: bool = False
    headers_delay: float = 0.0
    token_text: str | None = None
    # Reasoning deltas a reasoner model sends before its answer, and how many of them
    # pass between two keep-alive comments (DeepSeek sends both while it thinks).
    # ``reasoner``: think whatever the model (None: models named ``*reasoner`` only).
    reasoner: bool | None = None
    reasoning_tokens: int = 30
    reasoning_keepalive_every: int = 5
    # The characters of a tool call's arguments that one chunk carries.
    tool_fragment_chars: int = 6
    # "refusal", "parts" or "error" (module docstring); None: from the model's name.
    mode: str | None = None
    # An error in the stream before any delta: Anthropic's ``overloaded_error``.
    overloaded: bool = False


# A fault named by the model a request asks for, so that one simulator plays a route's
# several targets (docs/routing.md; the contract kit's routing checks): ``...-status-429``
# answers that status, ``...-stall`` sends its head and never a delta, ``...-reset-2``
# breaks the connection after two deltas.
_FAULT = re.compile(r"-(?:status-(\d{3})|(stall)|reset-(\d{1,6})|(overloaded))$")


def _for_model(config: SimulatorConfig, model: str) -> SimulatorConfig:
    fault = _FAULT.search(model)
    if fault is None:
        return config
    status, stall, reset, overloaded = fault.groups()
    if overloaded is not None:
        return dataclasses.replace(config, overloaded=True)
    if status is not None:
        return dataclasses.replace(config, status=int(status))
    if stall is not None:
        return dataclasses.replace(config, stall_after=0)
    return dataclasses.replace(config, reset_after=int(reset))


@dataclass(slots=True)
class StreamRecord:
    """What the simulator did for one request."""

    id: str
    planned: int
    started_at: float
    # The gateway's session id and its principal (hex), sent only to the built-in
    # simulator (demo mode).
    session_id: str | None = None
    principal: str | None = None
    path: str = ""
    # Deltas written, of every kind; the content, reasoning, refusal and tool arguments
    # written.
    sent: int = 0
    text: str = ""
    reasoning: str = ""
    refusal: str = ""
    tool_arguments: str = ""
    outcome: str = "streaming"
    ended_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    # The text of the last user message (its first 1000 characters): how the contract
    # kit finds the stream it opened, by a nonce in it.
    prompt: str = ""
    # The model it was asked for (a route's target names its fault: ``_for_model``).
    model: str = ""

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "session_id": self.session_id,
            "principal": self.principal,
            "path": self.path,
            "planned": self.planned,
            "sent": self.sent,
            "text": self.text,
            "reasoning": self.reasoning,
            "refusal": self.refusal,
            "tool_arguments": self.tool_arguments,
            "outcome": self.outcome,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


@dataclass(slots=True)
class _Waiter:
    predicate: Callable[[], bool]
    event: anyio.Event = field(default_factory=anyio.Event)


def _word(i: int) -> str:
    word = _WORDS[i % len(_WORDS)]
    return word if i == 0 else " " + word


class Simulator:
    """An ASGI app: ``POST /v1/chat/completions``, ``GET /v1/_streams``, ``GET /v1/models``."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.records: deque[StreamRecord] = deque(maxlen=_RECORDS_KEPT)
        self.requests: deque[dict[str, object]] = deque(maxlen=_REQUESTS_KEPT)
        # The Authorization header of each chat request (tests check the provider key).
        self.authorizations: deque[str] = deque(maxlen=_REQUESTS_KEPT)
        self._ids = itertools.count(1)
        # How often GET /v1/models was asked (the gateway caches the list).
        self.models_listed = 0
        self._waiters: list[_Waiter] = []
        # Waiters that also look at every delta: kept apart, so that the common
        # predicates over all records are not evaluated per delta.
        self._delta_waiters: list[_Waiter] = []

    @property
    def live(self) -> int:
        """Streams the simulator is still writing."""
        return sum(1 for r in self.records if r.outcome == "streaming")

    async def wait_until(self, predicate: Callable[[], bool], *, each_delta: bool = False) -> None:
        """Wait until ``predicate()`` holds; it is checked when a stream starts or ends,
        and with ``each_delta`` also after every delta written."""
        if predicate():
            return
        waiters = self._delta_waiters if each_delta else self._waiters
        waiter = _Waiter(predicate)
        waiters.append(waiter)
        try:
            await waiter.event.wait()
        finally:
            if waiter in waiters:
                waiters.remove(waiter)

    def _changed(self, waiters: list[_Waiter] | None = None) -> None:
        for group in (self._waiters, self._delta_waiters) if waiters is None else (waiters,):
            for waiter in list(group):
                if waiter.predicate():
                    waiter.event.set()
                    group.remove(waiter)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST" and path.endswith("/messages/count_tokens"):
            # Anthropic's token count: the words of the request's text, as _usage counts.
            request = json.loads(await _read_body(receive) or b"{}")
            self.requests.append(request)
            await _json(send, 200, {"input_tokens": _prompt_words(_chat_view(request))})
        elif method == "POST" and path.endswith(("/chat/completions", "/messages")):
            body = await _read_body(receive)
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            key = headers.get("authorization", headers.get("x-api-key"))
            if key is not None:
                self.authorizations.append(key)
            prefix = "msg_sim" if path.endswith("/messages") else "chatcmpl-sim"
            record = StreamRecord(
                id=f"{prefix}{next(self._ids)}",
                planned=0,
                started_at=time.monotonic(),
                session_id=headers.get("x-session-id"),
                principal=headers.get("x-principal"),
                path=path,
            )
            await self._chat(body, receive, send, record)
        elif method == "GET" and path == "/v1/_streams":
            await _json(send, 200, {"streams": [r.as_json() for r in self.records]})
        elif method == "GET" and path == "/v1/models":
            self.models_listed += 1
            await _json(send, 200, {"object": "list", "data": [{"id": "simulator"}]})
        else:
            await _json(send, 404, {"error": {"message": "not found", "type": "not_found"}})

    def record_for(self, session_id: str, principal: str | None = None) -> StreamRecord | None:
        """The newest stream the gateway opened for ``session_id`` of ``principal``."""
        for record in reversed(self.records):
            if record.session_id == session_id and record.principal == principal:
                return record
        return None

    async def _chat(self, body: bytes, receive: Receive, send: Send, record: StreamRecord) -> None:
        try:
            request = json.loads(body)
        except ValueError:
            await _json(send, 400, {"error": {"message": "invalid JSON", "type": "bad_request"}})
            return
        self.requests.append(request)
        messages_api = record.path.endswith("/messages")
        stream = request.get("stream") is not False
        if messages_api:
            # What the answer is planned from, read as a Chat Completions request.
            request = _chat_view(request)
        record.prompt = _last_user_text(request)
        record.model = str(request.get("model") or "")
        cfg = _for_model(self.config, record.model)
        if cfg.status is not None:
            failure = {"message": "simulated failure", "type": "server"}
            if messages_api:
                failure["type"] = "overloaded_error" if cfg.status == 529 else "api_error"
                await _json(send, cfg.status, {"type": "error", "error": failure})
            else:
                await _json(send, cfg.status, {"error": failure})
            return
        planned = _Plan(request, cfg, record.id)
        record.planned = len(planned)
        self.records.append(record)
        self._changed()
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if record.outcome == "streaming":
                        record.outcome = "closed_by_client"
                        record.ended_at = time.monotonic()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                if not stream:
                    await self._complete(request, planned, record, send, messages_api)
                else:
                    form = _MessagesForm if messages_api else _ChatForm
                    await self._stream(request, planned, record, send, cfg, form(request, record))
                tg.cancel_scope.cancel()
        finally:
            if record.outcome == "streaming":
                record.outcome = "failed"
                record.ended_at = time.monotonic()
            self._changed()

    async def _stream(
        self,
        request: dict[str, Any],
        planned: _Plan,
        record: StreamRecord,
        send: Send,
        cfg: SimulatorConfig,
        form: _Form,
    ) -> None:
        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        if cfg.headers_delay:
            await anyio.sleep(cfg.headers_delay)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        await self._keepalives(write, cfg.queue_seconds, form.keepalive)
        await write(form.opening())
        if cfg.overloaded:
            # An error in the stream before any delta (Anthropic's overloaded_error).
            await write(form.error())
            record.outcome = "completed"
            record.ended_at = time.monotonic()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        start = anyio.current_time()
        for i, item in enumerate(planned):
            if cfg.rate > 0:
                await anyio.sleep_until(start + i / cfg.rate)
            else:
                await anyio.lowlevel.checkpoint()
            if i == cfg.stall_after:
                await self._keepalives(write, float("inf"), form.keepalive)
            if i == cfg.reset_after:
                # Returning without ending the body makes hypercorn drop the connection.
                record.outcome = "reset"
                record.ended_at = time.monotonic()
                return
            if i == cfg.malformed_after:
                await write(b'data: {"choices": [{"delta": \n\n')
            if item.kind == "reasoning" and i and not i % max(cfg.reasoning_keepalive_every, 1):
                await write(form.keepalive)
            await write(form.item(item))
            _record(record, item)
            if self._delta_waiters:
                self._changed(self._delta_waiters)
        if not cfg.omit_done:
            await write(form.closing(planned))
        record.outcome = "completed"
        record.ended_at = time.monotonic()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _complete(
        self,
        request: dict[str, Any],
        planned: _Plan,
        record: StreamRecord,
        send: Send,
        messages_api: bool,
    ) -> None:
        """``"stream": false``: the whole answer as one ``chat.completion`` object (or
        Messages' ``message``)."""
        for item in planned:
            _record(record, item)
        if messages_api:
            record.outcome = "completed"
            record.ended_at = time.monotonic()
            await _json(send, 200, _MessagesForm(request, record).message(planned))
            return
        message: dict[str, object] = {"role": "assistant", "content": record.text or None}
        if record.refusal:
            message["refusal"] = record.refusal
        if record.reasoning:
            message["reasoning_content"] = record.reasoning
        if planned.tool is not None:
            function = {"name": planned.tool, "arguments": record.tool_arguments}
            call = {"id": planned.call_id, "type": "function", "function": function}
            message["tool_calls"] = [call]
        answer = {
            "id": record.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(request.get("model") or "simulator"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": planned.finish_reason,
                }
            ],
            "usage": _usage(request, record),
        }
        record.outcome = "completed"
        record.ended_at = time.monotonic()
        await _json(send, 200, answer)

    async def _keepalives(
        self, write: Callable[[bytes], Awaitable[None]], seconds: float, keepalive: bytes
    ) -> None:
        """Send keep-alives for ``seconds``, as DeepSeek (``: keep-alive`` comments) and
        Anthropic (``ping`` events) do while queued."""
        interval = self.config.keepalive_interval
        deadline = anyio.current_time() + seconds
        while anyio.current_time() < deadline:
            if interval <= 0:
                if seconds == float("inf"):
                    await anyio.sleep_forever()
                await anyio.sleep_until(deadline)
                return
            await anyio.sleep(min(interval, deadline - anyio.current_time()))
            await write(keepalive)


@dataclass(frozen=True, slots=True)
class _Planned:
    """One delta the simulator will write: its kind and the ``delta`` object."""

    kind: str  # "content", "reasoning", "refusal" or "tool_call"
    delta: dict[str, Any]
    text: str


class _Plan:
    """The deltas of the answer to one request, made as they are written (a test's
    endless answer is a long one)."""

    def __init__(self, request: dict[str, Any], cfg: SimulatorConfig, answer_id: str) -> None:
        self._cfg = cfg
        self.call_id = "call_" + answer_id.removeprefix("chatcmpl-")
        model = str(request.get("model") or "")
        self.mode = cfg.mode
        if self.mode is None:
            self.mode = next((m for m in _MODES if model.endswith(m)), None)
        reasoner = cfg.reasoner
        if reasoner is None:
            thinking = request.get("thinking")
            thinks = isinstance(thinking, dict) and thinking.get("type") == "enabled"
            reasoner = model.endswith("reasoner") or self.mode == "parts" or thinks
        self.reasoning = cfg.reasoning_tokens if reasoner else 0
        self.tool = _tool_to_call(request)
        arguments = json.dumps({"query": " ".join(_WORDS[:5])})
        size = max(cfg.tool_fragment_chars, 1)
        self.fragments = [arguments[at : at + size] for at in range(0, len(arguments), size)]
        self.tokens = cfg.tokens
        for name in ("max_tokens", "max_completion_tokens"):
            limit = request.get(name)
            if isinstance(limit, int) and limit < self.tokens:
                self.tokens = limit

    def __len__(self) -> int:
        answer = 1 + len(self.fragments) if self.tool is not None else self.tokens
        return self.reasoning + answer

    @property
    def finish_reason(self) -> str:
        if self.mode == "error":
            return "error"
        if self.tool is not None:
            return "tool_calls"
        return "length" if self.tokens < self._cfg.tokens else "stop"

    def __iter__(self) -> Iterator[_Planned]:
        parts = self.mode == "parts"
        for i in range(self.reasoning):
            text = _word(i)
            if parts:
                thinking = [{"type": "thinking", "thinking": [{"type": "text", "text": text}]}]
                yield _Planned("reasoning", {"content": thinking}, text)
            else:
                yield _Planned("reasoning", {"content": None, "reasoning_content": text}, text)
        if self.tool is not None:
            function = {"name": self.tool, "arguments": ""}
            first = {"index": 0, "id": self.call_id, "type": "function", "function": function}
            yield _Planned("tool_call", {"content": None, "tool_calls": [first]}, "")
            for piece in self.fragments:
                fragment = {"index": 0, "function": {"arguments": piece}}
                yield _Planned("tool_call", {"tool_calls": [fragment]}, piece)
            return
        for i in range(self.tokens):
            word = self._cfg.token_text if self._cfg.token_text is not None else _word(i)
            if self.mode == "refusal":
                yield _Planned("refusal", {"content": None, "refusal": word}, word)
            elif parts:
                yield _Planned("content", {"content": [{"type": "text", "text": word}]}, word)
            else:
                yield _Planned("content", {"content": word}, word)


class _Form(Protocol):
    """How one API's stream is written: its opening, each delta, an error, its end."""

    keepalive: bytes

    def opening(self) -> bytes: ...

    def item(self, item: _Planned) -> bytes: ...

    def error(self) -> bytes: ...

    def closing(self, planned: _Plan) -> bytes: ...


class _ChatForm:
    """OpenAI's Chat Completions chunks, ``data: [DONE]`` at the end."""

    keepalive = b": keep-alive\n\n"

    def __init__(self, request: dict[str, Any], record: StreamRecord) -> None:
        self._request = request
        self._record = record
        self._model = str(request.get("model") or "simulator")
        self._created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **more: object) -> bytes:
        payload = {
            "id": self._record.id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
            **more,
        }
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def _choice(self, delta: dict[str, Any], finish: str | None = None, **more: object) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": finish, **more}])

    def opening(self) -> bytes:
        return self._choice({"role": "assistant", "content": ""})

    def item(self, item: _Planned) -> bytes:
        return self._choice(item.delta)

    def error(self) -> bytes:
        return b'data: {"error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'

    def closing(self, planned: _Plan) -> bytes:
        if planned.mode == "error":
            # OpenRouter's failed choice: no error object, the reason in its own field.
            native = {"native_finish_reason": "MALFORMED_FUNCTION_CALL"}
            out = self._choice({}, planned.finish_reason, **native)
        else:
            out = self._choice({}, planned.finish_reason)
        options = self._request.get("stream_options") or {}
        if options.get("include_usage"):
            out += self._chunk([], usage=_usage(self._request, self._record))
        return out + b"data: [DONE]\n\n"


# Chat Completions' finish reasons as Messages' stop reasons.
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class _MessagesForm:
    """Anthropic's Messages events: ``message_start``, a ``ping``, content blocks
    (thinking with its signature, text, tool_use with its input in pieces),
    ``message_delta``, ``message_stop``."""

    keepalive = b'event: ping\ndata: {"type": "ping"}\n\n'

    def __init__(self, request: dict[str, Any], record: StreamRecord) -> None:
        self._request = request
        self._record = record
        self._block: str | None = None
        self._index = -1

    @staticmethod
    def _event(kind: str, **data: object) -> bytes:
        body = json.dumps({"type": kind, **data}, separators=(",", ":"))
        return f"event: {kind}\ndata: {body}\n\n".encode()

    def _usage(self) -> dict[str, int]:
        return {
            "input_tokens": _prompt_words(self._request),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": self._record.sent,
        }

    def opening(self) -> bytes:
        message: dict[str, object] = {
            "id": self._record.id,
            "type": "message",
            "role": "assistant",
            "model": str(self._request.get("model") or "simulator"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**self._usage(), "output_tokens": 1},
        }
        return self._event("message_start", message=message) + self.keepalive

    def _switch(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._stop_block()
        self._block = kind
        self._index += 1
        return out + self._event("content_block_start", index=self._index, content_block=block)

    def _stop_block(self) -> bytes:
        out = b""
        if self._block == "reasoning":
            signature = {"type": "signature_delta", "signature": "c2ltdWxhdGVk"}
            out += self._event("content_block_delta", index=self._index, delta=signature)
        if self._block is not None:
            out += self._event("content_block_stop", index=self._index)
        self._block = None
        return out

    def item(self, item: _Planned) -> bytes:
        out = b""
        if item.kind == "tool_call" and not item.text:
            call = item.delta["tool_calls"][0]
            block = {"type": "tool_use", "id": call["id"], "name": call["function"]["name"]}
            return self._switch("tool_call", {**block, "input": {}})
        if item.kind != self._block:
            if item.kind == "reasoning":
                out = self._switch(item.kind, {"type": "thinking", "thinking": "", "signature": ""})
            else:
                out = self._switch(item.kind, {"type": "text", "text": ""})
        if item.kind == "reasoning":
            delta = {"type": "thinking_delta", "thinking": item.text}
        elif item.kind == "tool_call":
            delta = {"type": "input_json_delta", "partial_json": item.text}
        else:
            delta = {"type": "text_delta", "text": item.text}
        return out + self._event("content_block_delta", index=self._index, delta=delta)

    def error(self) -> bytes:
        return self._event("error", error={"type": "overloaded_error", "message": "Overloaded"})

    def _stop_reason(self, planned: _Plan) -> str:
        if planned.mode == "refusal":
            return "refusal"
        return _STOP_REASONS.get(planned.finish_reason, "end_turn")

    def closing(self, planned: _Plan) -> bytes:
        delta = {"stop_reason": self._stop_reason(planned), "stop_sequence": None}
        usage = {"output_tokens": self._record.sent}
        return (
            self._stop_block()
            + self._event("message_delta", delta=delta, usage=usage)
            + self._event("message_stop")
        )

    def message(self, planned: _Plan) -> dict[str, Any]:
        """The whole answer (``"stream": false``), once ``planned`` was recorded."""
        record = self._record
        content: list[dict[str, Any]] = []
        if record.reasoning:
            thinking = {"type": "thinking", "thinking": record.reasoning}
            content.append({**thinking, "signature": "c2ltdWxhdGVk"})
        text = record.text or record.refusal
        if text:
            content.append({"type": "text", "text": text})
        if planned.tool is not None:
            arguments = json.loads(record.tool_arguments or "{}")
            call = {"type": "tool_use", "id": planned.call_id, "name": planned.tool}
            content.append({**call, "input": arguments})
        return {
            "id": record.id,
            "type": "message",
            "role": "assistant",
            "model": str(self._request.get("model") or "simulator"),
            "content": content,
            "stop_reason": self._stop_reason(planned),
            "stop_sequence": None,
            "usage": self._usage(),
        }


def _chat_view(request: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as the Chat Completions request it stands for, as far as the
    simulator reads one: model, max_tokens, the tools' names, the turns' text, a tool
    result as a ``tool`` turn, and whether it thinks."""
    view: dict[str, Any] = {
        key: request[key] for key in ("model", "max_tokens", "stream", "thinking") if key in request
    }
    tools = request.get("tools")
    if isinstance(tools, list):
        view["tools"] = [
            {"type": "function", "function": {"name": t.get("name")}}
            for t in tools
            if isinstance(t, dict)
        ]
    messages: list[dict[str, Any]] = []
    for turn in request.get("messages") or []:
        if not isinstance(turn, dict):
            continue
        content = turn.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        texts = [b.get("text") for b in blocks if isinstance(b, dict) and b.get("type") == "text"]
        role = turn.get("role")
        if any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
            role = "tool"
        messages.append({"role": role, "content": " ".join(t for t in texts if isinstance(t, str))})
    view["messages"] = messages
    return view


def _tool_to_call(request: dict[str, Any]) -> str | None:
    """The first tool's name, unless the conversation already holds a tool's result."""
    tools = request.get("tools")
    messages = request.get("messages") or [{}]
    if not isinstance(tools, list) or not tools or request.get("tool_choice") == "none":
        return None
    if isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        return None
    try:
        return str(tools[0]["function"]["name"])
    except (KeyError, TypeError, IndexError):
        return None


def _last_user_text(request: Any) -> str:
    messages = request.get("messages") if isinstance(request, dict) else None
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                parts = [p.get("text") for p in content if isinstance(p, dict)]
                content = " ".join(p for p in parts if isinstance(p, str))
            return content[:1000] if isinstance(content, str) else ""
    return ""


def _record(record: StreamRecord, item: _Planned) -> None:
    record.sent += 1
    if item.kind == "content":
        record.text += item.text
        record.last_token_at = time.monotonic()
        if record.first_token_at is None:
            record.first_token_at = record.last_token_at
    elif item.kind == "reasoning":
        record.reasoning += item.text
    elif item.kind == "refusal":
        record.refusal += item.text
    else:
        record.tool_arguments += item.text


def _prompt_words(request: dict[str, Any]) -> int:
    """The prompt's size, as the simulator counts it: the words of its messages."""
    messages = request.get("messages") or []
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


def _usage(request: dict[str, Any], record: StreamRecord) -> dict[str, object]:
    """OpenAI's three counts and DeepSeek's extra fields (cache hits, reasoning tokens)."""
    prompt = _prompt_words(request)
    reasoning = len(record.reasoning.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": record.sent,
        "total_tokens": prompt + record.sent,
        "prompt_cache_hit_tokens": 0,
        "prompt_cache_miss_tokens": prompt,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _json(send: Send, status: int, payload: object) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve_simulator(
    simulator: Simulator,
    stop: Callable[[], Awaitable[object]],
    *,
    bind: str = "127.0.0.1:0",
    task_status: TaskStatus[object] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The built-in simulator on ``bind`` (a free loopback port) until ``stop()`` returns."""
    config = load_config(bind=[bind], graceful_timeout=1.0, accesslog=None, errorlog=None)
    await serve(simulator, config, shutdown_trigger=stop, task_status=task_status)

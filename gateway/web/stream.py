"""One chat stream as an ASGI response: the tasks, and the cleanup they all lead to.

::

    request task group ─┬─ relay: provider → parser → client (writer.py)
                        │         (in Session.scope while it opens the provider)
                        └─ the request's task: watchdog (timeouts, pings, stuck
                           sends; between deadlines, blocked on receive() for the
                           client's disconnect), then the cleanup every path ends in

The relay writes to the client itself: one wake-up per token. A cancel, whatever its
trigger, closes the provider's connection at once (``Session.cancel``), so a relay
blocked writing to a client that stopped reading (under Trio, hypercorn shields its
socket writes) holds neither the provider nor, beyond the send timeout, the cleanup.
"""

from __future__ import annotations

import contextlib
import logging
import math
from functools import partial

import anyio
from anyio.abc import TaskGroup
from starlette.types import Receive, Scope, Send

from ..core.events import PING
from ..core.registry import ANONYMOUS
from ..core.report import log_end
from ..core.session import Attempt, Completed, Failed, Session, Stopped
from ..core.sink import Sink
from ..errors import (
    APIError,
    SessionConflict,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnavailable,
)
from ..logs import loggable
from ..provider.client import UpstreamResponse, open_stream
from ..provider.parser import (
    ContentPart,
    Delta,
    ParsedChunk,
    ProviderStreamParser,
    Reasoning,
    Refusal,
    ToolCallDelta,
)
from ..provider.routing import Plan, Upstream
from ..resume.follow import log_parked
from ..resume.stream import ResumableStream
from .formats import AnswerFormat, GatewayEvents
from .state import GatewayState
from .validation import ProviderRequest
from .writer import SERVER_SEND, ClientWriter

__all__ = ["ChatStream"]

logger = logging.getLogger(__name__)

# After [DONE], how long to wait for the body's last bytes so the connection can be reused.
_DRAIN_TIMEOUT = 1.0


class ChatStream:
    """The ASGI response for a chat stream: ``POST /api/chat/stream`` in the gateway's
    events, ``POST /v1/chat/completions`` in OpenAI's format (formats.py)."""

    def __init__(
        self,
        gateway: GatewayState,
        plan: Plan,
        *,
        principal: str,
        session_id: str,
        payload: ProviderRequest,
        demo_headers: dict[str, str] | None = None,
        answer: AnswerFormat | None = None,
    ) -> None:
        self._gateway = gateway
        self._plan = plan
        self._answer = answer or GatewayEvents()
        self._principal = principal
        self._session_id = session_id
        self._payload = payload
        # Demo mode: whose session it is, for the built-in simulators only.
        self._demo_headers = demo_headers
        # The watchdog's wait, which the relay's end cancels (the wait is for the
        # client's next message, not for the relay).
        self._waiting: anyio.CancelScope | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The claim happens here, not in the endpoint, so no path can leave it behind.
        try:
            session = self._gateway.registry.open(
                self._session_id, self._payload["model"], self._principal
            )
        except APIError as exc:
            await self._answer.error(exc)(scope, receive, send)
            return
        session.routed = bool(self._gateway.settings.providers)
        targets = self._plan.targets
        if len(targets) == 1:
            # One target: the watchdog's first-token timeout is its provider's. With
            # several, each attempt has its own (``_open``).
            session.first_token_timeout = targets[0][0].first_token_timeout
        try:
            if self._gateway.cluster is not None and not await self._gateway.cluster.claim(
                session.principal, session.id
            ):
                session.settle(Failed("session_conflict", "the id is live on another instance"))
                conflict = SessionConflict(f"a live stream already has session id {session.id!r}")
                await self._answer.error(conflict)(scope, receive, send)
                return
            store = self._gateway.resume
            if store is not None and self._answer.resumable:
                # Resumable: the client follows the stream's log, and may come back.
                resumable = ResumableStream(
                    session, self._gateway.settings, store, self._gateway.cluster
                )
                await resumable.run(
                    receive, send, scope.get(SERVER_SEND), partial(self._run, session)
                )
                return
            writer = ClientWriter(
                session,
                self._answer,
                send,
                scope.get(SERVER_SEND),
                self._gateway.settings.send_timeout,
            )
            async with anyio.create_task_group() as tg:
                writer.pings = tg
                await self._run(session, writer, tg, receive)
                # Stops a ping's write, and on asyncio a relay stuck past its bound.
                tg.cancel_scope.cancel()
        finally:
            # Whatever raised or was cancelled on the way (a cluster claim included),
            # the id is free again and a cancel waiting for this stream is answered.
            # After a normal end, _finish has done both already.
            self._gateway.registry.remove(session)
            session.end()

    async def _run(
        self,
        session: Session,
        sink: Sink,
        tg: TaskGroup,
        receive: Receive | None = None,
    ) -> None:
        """``receive``: the client's messages, for its disconnect (a resumable stream's
        follower listens for its own)."""
        # From the "started" line on, every path ends in _finish and its end line.
        principal = (
            "" if session.principal == ANONYMOUS else f" principal={loggable(session.principal)}"
        )
        logger.info("[SSE] %s started model=%s%s", session.id, loggable(session.model), principal)
        self._gateway.metrics.stream_started()
        relayed = anyio.Event()
        relaying = False
        try:
            # The relay first: its request goes to the provider, then the response's
            # head and first event are written while the provider works on it. Its
            # first write waits for them (``Sink.start``).
            start = self._answer.start(session)
            tg.start_soon(self._relay, session, sink, relayed)
            relaying = True
            await anyio.lowlevel.checkpoint()
            await sink.start(start)
            await self._watch(session, sink, relayed, receive)
        except Exception:
            logger.exception("[SSE] %s internal error", session.id)
            session.settle(Failed("internal_error", "the gateway failed"))
        finally:
            if not relaying:
                relayed.set()  # nothing to wait for
            with anyio.CancelScope(shield=True):
                # Cancelled from outside: the server is going away.
                if not session.cancel("shutdown"):
                    # Ended otherwise; after an internal error the relay may still run.
                    session.close_provider()
                await self._finish(session, sink, relayed)

    async def _finish(self, session: Session, sink: Sink, relayed: anyio.Event) -> None:
        """Cleanup every trigger ends in; the provider's connection is closed already."""
        if not relayed.is_set():
            # Aborted, the relay ends at once, unless it is writing to a client that
            # does not read: that write has the send timeout to end.
            with anyio.move_on_after(self._gateway.settings.send_timeout):
                await relayed.wait()
        await sink.finish(partial(self._answer.terminal, session), relayed.is_set())
        self._gateway.registry.remove(session)
        log_end(session)
        self._gateway.metrics.stream_ended(session, anyio.current_time())
        session.end()
        if self._gateway.cluster is not None:
            await self._gateway.cluster.release(session.principal, session.id)

    async def _relay(self, session: Session, sink: Sink, done: anyio.Event) -> None:
        """The relay's task: read the provider's stream into ``sink`` until it ends, and
        settle the outcome, unless a stop did first (the stop closed the provider). One
        function, not a task calling a reader: a token resumes one frame fewer."""
        upstream: UpstreamResponse | None = None
        try:
            try:
                opened = await self._open(session)
                if opened is None:
                    return
                upstream, parser, first = opened
                # A stop aborts the response from here on (a hedge's winner too, which
                # was opened beside others): the scope can go, objects fewer for the
                # garbage collector while the stream lives.
                session.upstream = upstream
                session.scope = None
                if session.outcome is not None:
                    return
                finish_reason: str | None = None
                usage: dict[str, object] | None = None
                for parsed in first:
                    # What came before the first delta, and the chunk that held it.
                    await self._deliver(session, sink, self._answer, parsed.deltas, parsed.plain)
                    if parsed.error is not None:
                        raise parsed.error
                    finish_reason = parsed.finish_reason or finish_reason
                    usage = parsed.usage or usage
                while not parser.done:
                    data = await upstream.read()
                    if session.outcome is not None:
                        return
                    if not data:
                        if finish_reason is None:
                            raise UpstreamProtocolError("provider closed the stream before [DONE]")
                        break
                    parsed = parser.feed(data)
                    if parsed.deltas:
                        # Before an error in the same read: what came first is the
                        # client's first.
                        await self._deliver(
                            session, sink, self._answer, parsed.deltas, parsed.plain
                        )
                    if parsed.error is not None:
                        raise parsed.error
                    if parsed.finish_reason is not None:
                        finish_reason = parsed.finish_reason
                    if parsed.usage is not None:
                        usage = parsed.usage
                if parser.done:
                    # Read the body's end so the connection goes back to the pool.
                    with anyio.move_on_after(_DRAIN_TIMEOUT):
                        while await upstream.read():
                            pass
                session.settle(Completed(finish_reason, usage, parser.native_stop))
            except UpstreamError as exc:
                # After a stop, this is the stop's abort seen by the read: the outcome
                # is settled already, and this one ignored.
                session.settle(Failed.from_error(exc))
            finally:
                # Never aborted once closed: the connection may serve another request.
                session.upstream = None
                if upstream is not None:
                    await self._close(upstream)
                _settle_attempt(session)
                if session.provider_closed_at is None:
                    session.provider_closed_at = anyio.current_time()
        except Exception:
            logger.exception("[SSE] %s internal error", session.id)
            session.settle(Failed("internal_error", "the gateway failed"))
        finally:
            done.set()
            if self._waiting is not None:
                self._waiting.cancel()

    async def _open(self, session: Session) -> _Opened | None:
        """The plan's targets, until one gives a delta (or ends its answer without
        one): that provider's open response, its parser and what it sent up to and
        with its first delta. In turn (``fallback``): a target fails over to the next
        one only before a delta has reached the client, its connection closed before
        the next one opens; or side by side (``hedge``: ``_hedged``). ``None`` when a
        stop came first; an ``UpstreamError`` when the last target failed, or one that
        does not fall through (docs/routing.md).

        Runs in the session's scope: a stop cancels every opening or wait for a first
        delta, and no attempt starts after it."""
        plan = self._plan
        scope = session.scope
        assert scope is not None
        several = len(plan.targets) > 1
        failure: Exception | None = None
        with scope:
            if several and plan.route.strategy == "hedge":
                return await self._hedged(session)
            anyway = plan.all_cooling(session.clock())
            last = len(plan.targets) - 1
            for i, (provider, model) in enumerate(plan.targets):
                if session.outcome is not None:
                    return None  # a stop between two attempts: no further attempt
                probe = self._take(session, provider, model, anyway)
                if probe is None:
                    continue
                # With one target, the watchdog times the first token (as it always has).
                within = provider.first_token_timeout if several else math.inf
                try:
                    return await self._attempt(session, provider, model, within, probe)
                except UpstreamError as exc:
                    if not plan.falls_through(exc.upstream_status):
                        raise
                    failure = exc
                except _NoDelta as exc:
                    failure = exc
                if i < last:  # the last one's failure is the stream's, in its end line
                    _log_next(session, provider, failure)
            return self._none_served(session, failure)
        return None  # a stop cancelled the scope

    async def _close(self, upstream: UpstreamResponse) -> None:
        await upstream.aclose()
        self._gateway.metrics.provider_opened(upstream.provider, -1)

    @staticmethod
    def _take(session: Session, provider: Upstream, model: str, anyway: bool) -> bool | None:
        """Whether ``provider`` may be tried now (its cooldown's ``take``); a provider
        skipped is recorded as an attempt with the result ``cooldown``."""
        if anyway:
            return False
        probe = provider.cooldown.take(session.clock())
        if probe is None:
            now = session.clock()
            session.attempts.append(Attempt(provider.name, model, now, "cooldown", ended_at=now))
        return probe

    @staticmethod
    def _none_served(session: Session, failure: Exception | None) -> None:
        """No target served: the last failure is the stream's (a first-token timeout
        ends it as the watchdog's would)."""
        if session.outcome is not None:
            return None
        if isinstance(failure, UpstreamError):
            raise failure
        if isinstance(failure, _NoDelta):
            session.cancel("timeout", "first_token")
            return None
        raise UpstreamUnavailable("every provider of the route is cooling down")

    async def _hedged(self, session: Session) -> _Opened | None:
        """The targets side by side: the next one starts when those running have sent
        no delta for ``hedge_after`` (or at once when one fails); the first to send a
        delta wins, and every other attempt's connection is closed then."""
        plan = self._plan
        targets = plan.targets
        # The hedged attempts by target index (a target skipped has none).
        attempts: dict[int, Attempt] = {}
        send, receive = anyio.create_memory_object_stream[tuple[int, _Opened | Exception]](
            len(targets)
        )
        won: _Opened | None = None
        failure: Exception | None = None

        async def run(i: int, probe: bool) -> None:
            provider, model = targets[i]
            try:
                opened = await self._attempt(
                    session, provider, model, provider.first_token_timeout, probe, attempts[i]
                )
            except (UpstreamError, _NoDelta) as exc:
                send.send_nowait((i, exc))
                return
            send.send_nowait((i, opened))

        with send, receive:
            try:
                async with anyio.create_task_group() as tg:
                    # The next target to try, and the attempts under way.
                    next_target = running = 0

                    def start_next() -> None:
                        """Start the next target not cooling down, if one is left."""
                        nonlocal next_target, running
                        while next_target < len(targets):
                            i, next_target = next_target, next_target + 1
                            provider, model = targets[i]
                            probe = self._take(session, provider, model, anyway)
                            if probe is not None:
                                attempts[i] = Attempt(provider.name, model, session.clock())
                                session.attempts.append(attempts[i])
                                tg.start_soon(run, i, probe)
                                running += 1
                                return

                    anyway = plan.all_cooling(session.clock())
                    start_next()
                    while running:
                        got = None
                        more = next_target < len(targets)
                        with anyio.move_on_after(plan.route.hedge_after if more else math.inf):
                            got = await receive.receive()
                        if got is None:
                            # No delta in time: the next target starts beside the others.
                            logger.info(
                                "[SSE] %s no delta in %gs; hedging with the next target",
                                session.id,
                                plan.route.hedge_after,
                            )
                            start_next()
                            continue
                        running -= 1
                        i, result = got
                        if isinstance(result, tuple):
                            won = result
                            break
                        failure = result
                        if isinstance(result, UpstreamError) and not plan.falls_through(
                            result.upstream_status
                        ):
                            break
                        _log_next(session, targets[i][0], result)
                        if session.outcome is None:
                            start_next()
                    for attempt in attempts.values():
                        if attempt.result is None:
                            attempt.result = "hedge_lost" if won is not None else "abandoned"
                    tg.cancel_scope.cancel()
            finally:
                # An attempt that reached its first delta just after the winner did, or
                # as a stop came (the stop's cancellation skips what follows the group).
                while True:
                    try:
                        i, result = receive.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    if isinstance(result, tuple) and result is not won:
                        attempts[i].result, attempts[i].served = "hedge_lost", False
                        if session.outcome is not None:
                            attempts[i].result = "stopped"
                        await self._close(result[0])
        if won is not None:
            return won
        return self._none_served(session, failure)

    async def _attempt(
        self,
        session: Session,
        provider: Upstream,
        model: str,
        within: float,
        probe: bool,
        hedged: Attempt | None = None,
    ) -> _Opened:
        """One target: open its response and read it to its first delta, within
        ``within`` seconds (``_NoDelta`` past them). Recorded in ``session.attempts``
        (a hedged attempt is, before it starts); on any failure or cancellation, its
        connection is closed before this returns."""
        attempt = hedged
        if attempt is None:
            attempt = Attempt(provider.name, model, session.clock())
            session.attempts.append(attempt)
        payload = self._plan.requests[provider.name, model]
        upstream: UpstreamResponse | None = None
        # For the provider's cooldown: True served, False failed as a provider fails.
        health: bool | None = None
        try:
            with anyio.move_on_after(within):
                headers = self._demo_headers if provider.simulated else None
                upstream = await open_stream(
                    provider.client, provider.base_url, payload, headers, provider.path
                )
                upstream.provider = provider.name
                self._gateway.metrics.provider_opened(provider.name, 1)
                if hedged is None:
                    session.upstream = upstream  # one attempt at a time: a stop aborts it
                parser = provider.parser()
                first = await self._first_delta(session, upstream, parser)
                attempt.result, attempt.served = "served", True
                health = True if session.outcome is None else None
                return upstream, parser, first
            attempt.code = "first_token_timeout"
            health = False
            raise _NoDelta
        except UpstreamError as exc:
            attempt.code, attempt.upstream_status = exc.code, exc.upstream_status
            attempt.cause = exc.cause
            if session.outcome is None and self._plan.falls_through(exc.upstream_status):
                health = False
            raise
        finally:
            provider.cooldown.settle(health, session.clock(), probe)
            if not attempt.served:
                attempt.ended_at = session.clock()
                if attempt.result is None:
                    attempt.result = "stopped" if session.outcome is not None else "failed"
                if upstream is not None:
                    if session.upstream is upstream:
                        session.upstream = None
                    await self._close(upstream)

    async def _first_delta(
        self, session: Session, upstream: UpstreamResponse, parser: ProviderStreamParser
    ) -> list[ParsedChunk]:
        """Read ``upstream`` until a delta, or the answer's end without one; what was
        parsed on the way, in order. A failure before any delta raises (the next
        target may be tried); one in the same read as a delta is the stream's."""
        parsed_so_far: list[ParsedChunk] = []
        while not parser.done:
            data = await upstream.read()
            if session.outcome is not None:
                break
            if not data:
                if not any(p.finish_reason for p in parsed_so_far):
                    raise UpstreamProtocolError("provider closed the stream before [DONE]")
                break
            parsed = parser.feed(data)
            parsed_so_far.append(parsed)
            if any(_is_delta(d) for d in parsed.deltas):
                break
            if parsed.error is not None:
                raise parsed.error
        return parsed_so_far

    @staticmethod
    async def _deliver(
        session: Session,
        sink: Sink,
        answer: AnswerFormat,
        deltas: list[Delta],
        plain: bool,
    ) -> None:
        """Queue the deltas as events, in the provider's order. Any kind is progress;
        the provider's extras alone are not."""
        if not deltas:
            return
        now = session.clock()
        if plain:
            # Content only: the hot path.
            if session.first_delta_at is None:
                session.first_delta_at = now
            session.last_delta_at = now
            if "content" not in session.first_at:
                session.first_at["content"] = now
            contents: list[str] = deltas  # type: ignore[assignment]  # plain: all text
            body = answer.contents(session, contents)
            session.tokens_delivered += len(contents)
        else:
            body = b"".join(_encode_delta(session, answer, delta, now) for delta in deltas)
        if body:  # an answer assembled whole (ChatCompletion) writes nothing yet
            await sink.write(body, session.delivered())

    async def _watch(
        self,
        session: Session,
        sink: Sink,
        relayed: anyio.Event,
        receive: Receive | None,
    ) -> None:
        """Every timeout and the pings, on deadlines, until the relay is done: no timer
        per token. A stop ends the relay at once; the send timeout bounds a relay stuck
        writing to a client, stopped or not. Between deadlines it waits for the
        client's next message, if ``receive`` is given: a task blocked on receive() is
        the one way to see a disconnect on every backend (under Trio,
        ``request.is_disconnected()`` never does: hypercorn #210), and this one saves
        each stream a task of its own (the objects of a task, its handle, its cancel
        scope and its event: docs/benchmarks.md, step 22).

        Deadlines only move later as tokens arrive, except two that appear: the
        provider's (first token, then idle), set aside while the relay is blocked
        writing and back when the write ends, and a send's deadline once it starts.
        Never sleeping longer than those two timeouts means the first wake after
        either appears still lands before it, so each fires on time.
        """
        s = self._gateway.settings
        total_at = session.started_at + s.max_duration
        while not relayed.is_set():
            now = anyio.current_time()
            if now >= total_at:
                session.cancel("timeout", "total")
                return
            send_started = session.send_started_at
            if send_started is not None:
                # The relay is writing, not waiting for the provider: the send
                # timeout bounds this, and the provider's silence is not counted.
                token_at, kind = math.inf, "idle"
            else:
                waiting_since = max(session.last_delta_at, session.last_write_at)
                if session.first_delta_at is None:
                    token_at = waiting_since + session.first_token_timeout
                    kind = "first_token"
                else:
                    token_at, kind = waiting_since + s.idle_timeout, "idle"
            if now >= token_at:
                session.cancel("timeout", kind)
                return
            if send_started is not None and now >= send_started + s.send_timeout:
                follower = session.attached
                if follower is None:
                    # The client stopped reading: nothing more can reach it.
                    session.client_left("timeout", "send")
                    return
                # A resumable stream's client stopped reading: it is let go, and the
                # stream parked for it to come back.
                session.detach(follower, now)
                follower.abandon()
                send_started = None
            wake = min(total_at, token_at, now + s.idle_timeout)
            if session.resumable:
                gone = session.attached
                if gone is not None and gone.expired(now):
                    session.detach(gone, now)
                    log_parked(session, s.resume_window)
                if session.attached is None and session.parked_at is not None:
                    park_until = session.parked_at + s.resume_window
                    if now >= park_until:
                        session.client_left("disconnect")
                        return
                    wake = min(wake, park_until)
                # A park can start any time: its deadline is never slept past.
                wake = min(wake, now + s.resume_window, now + s.claim_ttl)
            wake = min(
                wake,
                now + s.send_timeout if send_started is None else send_started + s.send_timeout,
            )
            if s.ping_interval and self._answer.streaming:
                ping_at = max(session.last_write_at, session.last_ping_at) + s.ping_interval
                if now >= ping_at:
                    # A write under way makes a ping needless.
                    with contextlib.suppress(anyio.WouldBlock):
                        sink.write_nowait(PING)
                    session.last_ping_at = now
                    ping_at = now + s.ping_interval
                wake = min(wake, ping_at)
            waiting = self._waiting = anyio.CancelScope(deadline=wake)
            try:
                with waiting:
                    if receive is None:
                        await relayed.wait()
                    elif (await receive())["type"] == "http.disconnect":
                        session.client_left("disconnect")
                        receive = None  # nothing comes after it
            finally:
                self._waiting = None


_Opened = tuple[UpstreamResponse, ProviderStreamParser, list[ParsedChunk]]


class _NoDelta(Exception):
    """An attempt's provider sent no delta within its first-token timeout."""


def _log_next(session: Session, provider: Upstream, failure: object) -> None:
    why = "first_token_timeout"
    if isinstance(failure, UpstreamError):
        why = failure.code if failure.cause is None else f"{failure.code} cause={failure.cause}"
        if failure.note is not None:
            why += f": {failure.note}"
    logger.info(
        "[SSE] %s provider %s failed before the first delta (%s); next target",
        session.id,
        provider.name,
        why,
    )


def _is_delta(delta: Delta) -> bool:
    """A delta of the answer, not one of the provider's extras."""
    return isinstance(delta, str | ToolCallDelta | Reasoning | Refusal | ContentPart)


def _settle_attempt(session: Session) -> None:
    """The served attempt's result once the stream has an outcome."""
    if session.attempts and session.attempts[-1].served:
        attempt = session.attempts[-1]
        attempt.ended_at = session.clock()
        if isinstance(session.outcome, Stopped):
            attempt.result = "stopped"
        elif isinstance(session.outcome, Failed):
            attempt.result = "failed"
            attempt.code = session.outcome.code
            attempt.upstream_status = session.outcome.upstream_status


def _encode_delta(session: Session, answer: AnswerFormat, delta: Delta, now: float) -> bytes:
    if isinstance(delta, str):
        kind = "content"
        session.tokens_delivered += 1
        data = answer.contents(session, [delta])
    elif isinstance(delta, ToolCallDelta):
        kind = "tool_call"
        session.tool_calls_delivered += 1
        data = answer.delta(session, delta)
    elif isinstance(delta, Reasoning):
        kind = "reasoning"
        session.reasoning_delivered += 1
        data = answer.delta(session, delta)
    elif isinstance(delta, Refusal):
        kind = "refusal"
        session.refusal_delivered += 1
        data = answer.delta(session, delta)
    elif isinstance(delta, ContentPart):
        kind = "content"
        session.tokens_delivered += 1
        data = answer.delta(session, delta)
    else:
        # The provider's extras: passed on, but no delta of the answer.
        return answer.delta(session, delta)
    session.first_at.setdefault(kind, now)
    if session.first_delta_at is None:
        session.first_delta_at = now
    session.last_delta_at = now
    return data

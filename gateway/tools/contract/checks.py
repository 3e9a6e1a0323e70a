"""The checks of the cancel contract, in the order they run: each drives the ``Kit``
and returns its figures, or raises ``CheckFailed`` saying what broke."""

from __future__ import annotations

import math
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import httpx2 as httpx

from ..simulator import SimulatorConfig
from .kit import SAME_INSTANT, CheckFailed, Kit, Readers, Stream, bounded_body

__all__ = ["CHECKS", "Check", "routes_config"]

# The unbuffered check: the answer's pace, and how late its first event may be.
_PACE = 20.0
_FIRST_EVENT_BOUND = 1.0
_OWN_READ_SHARE = 0.9

# -- the checks -------------------------------------------------------------------

Check = Callable[[Kit], Awaitable[str]]


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


async def _cancel_closes_provider(kit: Kit, surface: str = "api", share: int = 1) -> str:
    """On ``surface`` (the kit's), for ``1/share`` of the samples."""
    samples = max(1, kit.options.samples // share)
    latencies = []
    for _ in range(samples):
        async with Readers() as tg:
            stream = await kit.started(tg, surface=surface)
            latencies.append(await kit.cancel_closes_first(stream))
            await kit.stopped_once(stream, "cancel")
    return f"{len(latencies)} of {samples} closed before the 200; {_ms(latencies)}"


async def _disconnect_closes_provider(kit: Kit, surface: str = "api", share: int = 1) -> str:
    samples = max(1, kit.options.samples // share)
    latencies = []
    for _ in range(samples):
        async with Readers() as tg:
            stream = await kit.started(tg, surface=surface)
            left = time.monotonic()
            stream.left = True
            stream.scope.cancel()
            record = await kit.closed(stream)
            assert record.ended_at is not None
            latencies.append(max(0.0, record.ended_at - left))
    return f"{len(latencies)} of {samples} closed; {_ms(latencies)}"


async def _stop_at(kit: Kit, config: SimulatorConfig, ready: str, **body: Any) -> str:
    """Cancel once ``ready`` holds; the provider closed before the 200, one stopped event
    with exact counts."""
    kit.sim.config = config
    async with Readers() as tg:
        stream = await kit.open(tg, **body)
        if ready in ("headers", "first_token"):
            # The provider has the request: it holds its headers back, or it has sent
            # them and is quiet (keep-alive comments only) before its first token.
            await kit.record(stream, lambda r: True)
        else:
            await stream.until(lambda s: s.count(ready) >= 2, f"two {ready} events")
        latency = await kit.cancel_closes_first(stream)
        data = await kit.stopped_once(stream, "cancel")
    return f"closed {latency * 1000:.1f} ms after the cancel; stopped with {_delivered(data)}"


def _delivered(data: dict[str, Any]) -> str:
    return (
        f"tokens={data.get('tokens_delivered')} reasoning={data.get('reasoning_delivered')} "
        f"tool_calls={data.get('tool_calls_delivered')}"
    )


async def _cancel_waiting_for_headers(kit: Kit) -> str:
    return await _stop_at(kit, SimulatorConfig(tokens=10, headers_delay=60), "headers")


async def _cancel_before_first_token(kit: Kit) -> str:
    config = SimulatorConfig(tokens=10, queue_seconds=60, keepalive_interval=0.2)
    return await _stop_at(kit, config, "first_token")


async def _cancel_during_reasoning(kit: Kit) -> str:
    config = SimulatorConfig(tokens=10, rate=_PACE, reasoning_tokens=10_000, reasoner=True)
    return await _stop_at(kit, config, "reasoning")


async def _cancel_during_tool_call(kit: Kit) -> str:
    config = SimulatorConfig(rate=_PACE, tool_fragment_chars=1)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "search",
                "description": "Search the web.",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
            },
        }
    ]
    return await _stop_at(kit, config, "tool_call", tools=tools)


async def _not_found(kit: Kit) -> str:
    async with Readers() as tg:
        stream = await kit.started(tg)
        await kit.cancel_closes_first(stream)
        await kit.stopped_once(stream, "cancel")
        again = await kit.cancel(stream)
    unknown = await kit.cancel(Stream("", f"contract-unknown-{secrets.token_hex(8)}"))
    for what, response in (("a second cancel", again), ("an unknown id", unknown)):
        code = _error_code(response)
        if response.status_code != 404 or code != "not_found":
            raise CheckFailed(f"{what}: {response.status_code} {code!r}, expected 404 'not_found'")
    return "second cancel 404 not_found; unknown id 404 not_found"


async def _duplicate_live_id(kit: Kit) -> str:
    async with Readers() as tg:
        stream = await kit.started(tg)
        # Streamed: a gateway that wrongly accepts it would answer without end.
        async with kit.client.stream(
            "POST",
            f"{kit.options.gateway}/api/chat/stream",
            headers={"x-session-id": stream.session_id, **kit._headers(None)},
            json={"messages": [{"role": "user", "content": f"Duplicate {stream.nonce}"}]},
        ) as response:
            body = b"" if response.status_code == 200 else await bounded_body(response)
            duplicate = httpx.Response(response.status_code, headers=response.headers, content=body)
        await kit.cancel_closes_first(stream)
        await kit.stopped_once(stream, "cancel")
    if duplicate.status_code != 409:
        raise CheckFailed(f"a second stream on a live id: {duplicate.status_code}, expected 409")
    return f"409 {_error_code(duplicate)}"


async def _keepalives_do_not_hold(kit: Kit) -> str:
    idle = kit.options.idle_timeout
    assert idle is not None
    # Two tokens, then nothing but the provider's keep-alive comments.
    kit.sim.config = SimulatorConfig(
        tokens=100, rate=0, stall_after=2, keepalive_interval=min(idle / 4, 1.0)
    )
    async with Readers() as tg:
        stream = await kit.open(tg)
        with anyio.move_on_after(idle + kit.patience):
            await stream.done.wait()
        data = await kit.stopped_once(stream, "timeout")
    record = await kit.closed(stream)
    assert record.ended_at is not None
    assert record.last_token_at is not None
    after = record.ended_at - record.last_token_at
    if after > idle + 2.0:
        raise CheckFailed(
            f"the provider was closed {after:.2f} s after its last token (idle {idle} s)"
        )
    return f"stopped ({data.get('detail')}), provider closed {after:.2f} s after its last token"


async def _other_principal_cannot_cancel(kit: Kit) -> str:
    async with Readers() as tg:
        stream = await kit.started(tg)
        response = await kit.cancel(stream, key=kit.options.second_key)
        seen = stream.count("token")
        await stream.until(lambda s: s.count("token") >= seen + 2, "tokens after the cancel")
        record = await kit.record(stream, lambda r: True)
        going = record.outcome == "streaming"
        await kit.cancel_closes_first(stream)
        await kit.stopped_once(stream, "cancel")
    if response.status_code != 404:
        raise CheckFailed(f"another principal's cancel: {response.status_code}, expected 404")
    if not going:
        raise CheckFailed(f"the provider's stream ended ({record.outcome}) after a refused cancel")
    return "404, and the stream went on"


async def _peer_cancel(kit: Kit) -> str:
    latencies = []
    for _ in range(min(kit.options.samples, 10)):
        async with Readers() as tg:
            stream = await kit.started(tg)
            latencies.append(await kit.cancel_closes_first(stream, base=kit.options.peer))
            await kit.stopped_once(stream, "cancel")
    return f"{len(latencies)} closed before the peer's 200; {_ms(latencies)}"


async def _unbuffered(kit: Kit) -> str:
    kit.sim.config = SimulatorConfig(tokens=40, rate=_PACE)
    async with Readers() as tg:
        stream = await kit.open(tg)
        with anyio.move_on_after(kit.patience):
            await stream.done.wait()
    record = await kit.closed(stream)
    if record.first_token_at is None or stream.first_token_at is None:
        raise CheckFailed(f"no token arrived (provider wrote {record.sent})")
    first = stream.first_token_at - record.first_token_at
    tokens = stream.count("token")
    alone = sum(1 for n in stream.reads if n == 1)
    detail = (
        f"first token {first * 1000:.0f} ms after the provider's; "
        f"{alone} of {tokens} token events in a read of their own"
    )
    if first > _FIRST_EVENT_BOUND:
        raise CheckFailed(f"buffered: {detail}")
    if tokens == 0 or alone < _OWN_READ_SHARE * tokens:
        raise CheckFailed(f"batched: {detail}")
    return detail


async def _completed_once(kit: Kit, surface: str) -> int:
    """A short answer read to its end on ``surface``: one ``done``, a token event per
    provider delta. Returns the deltas."""
    kit.sim.config = SimulatorConfig(tokens=20, rate=0)
    async with Readers() as tg:
        stream = await kit.open(tg, surface=surface)
        with anyio.move_on_after(kit.patience):
            await stream.done.wait()
    record = await kit.closed(stream)
    terminals = stream.terminals()
    if [t for t, _ in terminals] != ["done"] or stream.count("token") != record.sent:
        raise CheckFailed(
            f"a completed answer: terminal events {[t for t, _ in terminals]}, "
            f"{stream.count('token')} token events for {record.sent} provider deltas"
        )
    return record.sent


async def _one_terminal_event(kit: Kit) -> str:
    await _completed_once(kit, "api")
    read = [s for s in kit.streams if s.status == 200 and not s.left]
    wrong = [s.session_id for s in read if len(s.terminals()) != 1]
    if wrong:
        raise CheckFailed(f"{len(wrong)} of {len(read)} streams without exactly one terminal event")
    return f"{len(read)} streams, each one terminal event; counts matched"


# -- Anthropic's Messages surface (docs/api.md) --------------------------------------


async def _messages_one_terminal_event(kit: Kit) -> str:
    sent = await _completed_once(kit, "messages")
    return f"one message_delta and message_stop; {sent} text deltas"


# -- routing (docs/routing.md, "The contract kit") ----------------------------------
# The deployment's routes name the kit's provider with a fault in the model's name
# (gateway/tools/simulator.py, ``_for_model``).


def routes_config(provider_url: str) -> str:
    """The GATEWAY_CONFIG tables the routing checks need, for the kit's provider at
    ``provider_url`` (``http://host:port/v1``): add them to the deployment's file."""
    kit = 'provider = "contract"'
    return f"""[providers.contract]
base_url = "{provider_url}"
cooldown_failures = 1000000000  # the checks fail it on purpose: never skipped

[models.contract-fallback]
targets = [{{ {kit}, model = "contract-status-429" }}, {{ {kit}, model = "contract" }}]

[models.contract-after-delta]
targets = [{{ {kit}, model = "contract-reset-2" }}, {{ {kit}, model = "contract" }}]

[models.contract-hedge]
targets = [{{ {kit}, model = "contract-stall" }}, {{ {kit}, model = "contract" }}]
strategy = "hedge"
hedge_after = 0.2

[models.contract-hedge-stall]
targets = [{{ {kit}, model = "contract-stall" }}, {{ {kit}, model = "contract-stall" }}]
strategy = "hedge"
hedge_after = 0.1
"""


async def _routed(kit: Kit, model: str, tokens: int) -> tuple[Stream, str, dict[str, Any]]:
    """A stream of the route ``model``, read to its end: it, and its one terminal
    event's name and data (one ``start`` and one terminal event, or the check fails)."""
    kit.sim.config = SimulatorConfig(tokens=tokens, rate=_PACE * 10)
    async with Readers() as tg:
        stream = await kit.open(tg, model=model)
        with anyio.move_on_after(kit.patience):
            await stream.done.wait()
    terminals = stream.terminals()
    if len(terminals) != 1 or stream.count("start") != 1:
        raise CheckFailed(
            f"{stream.count('start')} start and {len(terminals)} terminal events (one each)"
        )
    event, data = terminals[0]
    return stream, event, data


async def _fallback_before_first_delta(kit: Kit) -> str:
    stream, event, _ = await _routed(kit, "contract-fallback", 5)
    asked = kit.asked(stream.nonce)
    if event != "done" or asked != ["contract-status-429", "contract"]:
        raise CheckFailed(f"ended {event!r}; the provider was asked for {asked}")
    [served] = kit.records(stream.nonce)
    if stream.count("token") != served.sent:
        raise CheckFailed(f"{stream.count('token')} token events, {served.sent} sent")
    return f"429, then the next target: {served.sent} tokens, one start, one done"


async def _no_fallback_after_a_delta(kit: Kit) -> str:
    stream, event, data = await _routed(kit, "contract-after-delta", 50)
    asked = kit.asked(stream.nonce)
    if event != "error" or asked != ["contract-reset-2"]:
        raise CheckFailed(f"ended {event!r} ({data.get('code')}); asked for {asked}")
    return f"{stream.count('token')} tokens, then error {data.get('code')}; no second model"


async def _hedge_loser_closed(kit: Kit) -> str:
    stream, event, _ = await _routed(kit, "contract-hedge", 5)
    if event != "done":
        raise CheckFailed(f"ended {event!r}, expected done")
    loser = next((r for r in kit.records(stream.nonce) if r.model == "contract-stall"), None)
    if loser is None:
        raise CheckFailed("the first target was never asked")
    with anyio.move_on_after(kit.patience):
        await kit.sim.wait_until(lambda: loser.outcome != "streaming")
    if loser.outcome != "closed_by_client":
        raise CheckFailed(f"the losing attempt's stream: {loser.outcome}")
    return "the second target won; the first's connection closed"


async def _stop_closes_every_attempt(kit: Kit) -> str:
    kit.sim.config = SimulatorConfig(tokens=5, rate=_PACE)
    async with Readers() as tg:
        stream = await kit.open(tg, model="contract-hedge-stall")
        with anyio.move_on_after(kit.patience):
            await kit.sim.wait_until(lambda: len(kit.records(stream.nonce)) == 2)
        attempts = kit.records(stream.nonce)
        if len(attempts) != 2:
            raise CheckFailed(f"{len(attempts)} attempts open, expected two (hedged)")
        sent = time.monotonic()
        response = await kit.cancel(stream)
        answered = time.monotonic()
        if response.status_code != 200:
            raise CheckFailed(f"cancel answered {response.status_code}")
        await kit.stopped_once(stream, "cancel")
    late = [r for r in attempts if r.ended_at is None or r.ended_at > answered + SAME_INSTANT]
    if late:
        raise CheckFailed(f"{len(late)} of 2 attempts still open at the cancel's 200")
    close = max(r.ended_at or 0.0 for r in attempts) - sent
    return f"both hedged attempts closed {close * 1000:.1f} ms after the cancel, before its 200"


# name -> (check, what it needs; None: always runs)
CHECKS: dict[str, tuple[Check, str | None]] = {
    "cancel_closes_provider": (_cancel_closes_provider, None),
    "disconnect_closes_provider": (_disconnect_closes_provider, None),
    "cancel_waiting_for_headers": (_cancel_waiting_for_headers, None),
    "cancel_before_first_token": (_cancel_before_first_token, None),
    "cancel_during_reasoning": (_cancel_during_reasoning, None),
    "cancel_during_tool_call": (_cancel_during_tool_call, None),
    "cancel_twice_and_unknown_404": (_not_found, None),
    "duplicate_live_id_409": (_duplicate_live_id, None),
    "keepalives_do_not_hold_idle": (_keepalives_do_not_hold, "idle_timeout"),
    "other_principal_cannot_cancel": (_other_principal_cannot_cancel, "second_key"),
    "peer_cancel_closes_provider": (_peer_cancel, "peer"),
    "unbuffered": (_unbuffered, None),
    "one_terminal_event": (_one_terminal_event, None),
    # The same checks on Anthropic's /v1/messages, on a third of the samples.
    "messages_cancel_closes_provider": (
        partial(_cancel_closes_provider, surface="messages", share=3),
        None,
    ),
    "messages_disconnect_closes_provider": (
        partial(_disconnect_closes_provider, surface="messages", share=3),
        None,
    ),
    "messages_one_terminal_event": (_messages_one_terminal_event, None),
    "fallback_before_first_delta": (_fallback_before_first_delta, "routes"),
    "no_fallback_after_a_delta": (_no_fallback_after_a_delta, "routes"),
    "hedge_loser_closed": (_hedge_loser_closed, "routes"),
    "stop_closes_every_attempt": (_stop_closes_every_attempt, "routes"),
}


def _error_code(response: httpx.Response) -> str | None:
    """The error envelope's ``code``; for a cancel's 404 this gateway answers
    ``{"ok": false, "reason": "not_found"}`` (docs/api.md), read as the same."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else body.get("reason")
    return code if isinstance(code, str) else None

"""Contract tests for the stream and its one cancellation path, on real sockets."""

from __future__ import annotations

import time

import anyio
import pytest

from .harness import ASYNCIO_AND_TRIO, Harness, end_lines, sim_config, without_timings

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO]


async def test_completion_relays_every_delta_in_order(caplog: pytest.LogCaptureFixture) -> None:
    async with Harness(sim_config(tokens=40, rate=0)) as h:
        async with h.stream("session_1700000000000_abc123") as s:
            events = await s.rest()
        record = await h.record()
        assert s.events[0].event == "start"
        assert s.events[0].data == {
            "session_id": "session_1700000000000_abc123",
            "model": "sim-model",
        }
        assert "".join(s.tokens) == record.text
        assert len(s.tokens) == 40
        ids = [int(e.id) for e in s.events if e.id is not None]
        assert ids == list(range(1, len(s.events) + 1))
        done = events[-1]
        assert done.event == "done"
        assert done.data["status"] == "completed"
        assert done.data["finish_reason"] == "stop"
        assert done.data["usage"]["completion_tokens"] == 40
        assert [e.event for e in s.events].count("done") == 1
        assert s.response.headers["cache-control"] == "no-store"
        assert s.response.headers["x-accel-buffering"] == "no"
        assert s.response.headers["x-session-id"] == "session_1700000000000_abc123"
        assert s.response.headers["content-type"].startswith("text/event-stream")
        await h.ended("session_1700000000000_abc123")
        assert len(h.registry) == 0
        # A completed response goes back to the pool as a keep-alive connection.
        lines = end_lines(caplog.records, "session_1700000000000_abc123")
        assert len(lines) == 1
        assert "completed in" in lines[0]
        assert "tokens=40" in lines[0]


async def test_cancel_closes_provider_and_ends_stream(caplog: pytest.LogCaptureFixture) -> None:
    sid = "session_cancel_01"
    async with Harness(sim_config(tokens=10_000, rate=200)) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(5)
            record = await h.record()
            t0 = time.monotonic()
            # The 200 comes only after the provider's connection is closed.
            response = await h.cancel_closes_first(sid, record)
            assert response.json() == {"ok": True, "cancelled": True, "session_id": sid}
            assert record.outcome == "closed_by_client"
            assert record.ended_at is not None
            assert record.ended_at - t0 < 0.1
            assert record.sent < record.planned
            assert h.registry.get(sid) is None
            rest = await s.rest()
        stopped = rest[-1]
        assert stopped.event == "stopped"
        assert without_timings(stopped.data) == {
            "status": "stopped",
            "reason": "cancel",
            "tokens_delivered": len(s.tokens),
            "reasoning_delivered": 0,
            "tool_calls_delivered": 0,
            "refusal_delivered": 0,
        }
        assert set(stopped.data["first_delta_ms"]) == {"content"}
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=cancel")
        lines = end_lines(caplog.records, sid)
        assert f"tokens={len(s.tokens)}" in lines[0]
        assert any(f"Cancel request received for {sid}" in r.getMessage() for r in caplog.records)
        assert not any(r.levelname == "ERROR" for r in caplog.records)


async def test_second_cancel_is_404() -> None:
    sid = "session_double_1"
    async with Harness(sim_config(tokens=10_000)) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(1)
            first = await h.cancel(sid)
            second = await h.cancel(sid)
            await s.rest()
        assert first.status_code == 200
        assert second.status_code == 404
        assert second.json() == {"ok": False, "reason": "not_found"}


async def test_cancel_unknown_session_is_404() -> None:
    async with Harness() as h:
        response = await h.cancel("session_nobody_here")
        assert response.status_code == 404
        assert response.json() == {"ok": False, "reason": "not_found"}


async def test_cancel_after_completion_is_404() -> None:
    sid = "session_finished"
    async with Harness(sim_config(tokens=3, rate=0)) as h:
        async with h.stream(sid) as s:
            await s.rest()
        await h.ended(sid)
        assert (await h.cancel(sid)).status_code == 404


async def test_client_disconnect_closes_provider(caplog: pytest.LogCaptureFixture) -> None:
    sid = "session_disconnect"
    async with Harness(sim_config(tokens=10_000)) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(3)
            record = await h.record()
            t0 = time.monotonic()
        # Leaving the block closed the HTTP/1.1 response, and so the connection.
        await h.closed(record)
        assert record.outcome == "closed_by_client"
        assert record.ended_at is not None
        assert record.ended_at - t0 < 0.1
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=disconnect")


async def test_cancel_before_first_token(caplog: pytest.LogCaptureFixture) -> None:
    sid = "session_queued_1"
    async with Harness(sim_config(queue_seconds=30, keepalive_interval=0.05)) as h:
        async with h.stream(sid) as s:
            await s.until(lambda e: e.event == "start")
            record = await h.record()
            t0 = time.monotonic()
            await h.cancel_closes_first(sid, record)
            assert record.outcome == "closed_by_client"
            assert record.ended_at is not None
            assert record.ended_at - t0 < 0.1
            assert record.sent == 0
            rest = await s.rest()
        assert rest[-1].data == {
            "status": "stopped",
            "reason": "cancel",
            "tokens_delivered": 0,
            "reasoning_delivered": 0,
            "tool_calls_delivered": 0,
            "refusal_delivered": 0,
            "first_delta_ms": {},
        }
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=cancel")


async def test_cancel_while_connecting_to_provider(caplog: pytest.LogCaptureFixture) -> None:
    """The provider's accept queue is full, so the TCP connect itself hangs."""
    sid = "session_connecting"
    with _listener_that_never_accepts() as port:
        url = f"http://127.0.0.1:{port}/v1"
        async with Harness(upstream_url=url, connect_timeout=30) as h:
            async with h.stream(sid) as s:
                await s.until(lambda e: e.event == "start")
                with anyio.fail_after(2):
                    response = await h.cancel(sid)
                assert response.status_code == 200
                rest = await s.rest()
            assert rest[-1].data["reason"] == "cancel"
            await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=cancel")


async def test_cancel_while_waiting_for_provider_headers() -> None:
    sid = "session_headers"
    async with Harness(sim_config(headers_delay=30)) as h:
        async with h.stream(sid) as s:
            await s.until(lambda e: e.event == "start")
            record = await h.record()
            t0 = time.monotonic()
            await h.cancel_closes_first(sid, record)
            assert record.outcome == "closed_by_client"
            assert record.ended_at is not None
            assert record.ended_at - t0 < 0.1
            await s.rest()
        assert h.upstream_connections() == 0


class _listener_that_never_accepts:
    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(0)
        port: int = self._sock.getsockname()[1]
        # One connection fills the accept queue; later SYNs are dropped.
        self._filler = socket.create_connection(("127.0.0.1", port))
        return port

    def __exit__(self, *exc: object) -> None:
        self._filler.close()
        self._sock.close()


@pytest.mark.parametrize("text", ["\ud83d", "\ude00 and text"])
async def test_a_lone_surrogate_from_the_provider_reaches_the_client_as_sent(
    text: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Half an emoji, as a provider that splits one across chunks sends it ("\ud83d"):
    # the client gets the same escape, and joins the halves itself.
    async with Harness(sim_config(tokens=3, rate=0, token_text=text)) as h:
        async with h.stream("session_1_surrogate") as s:
            events = await s.rest()
        assert events[-1].event == "done"
        assert s.tokens == [text] * 3
        await h.ended("session_1_surrogate")
        lines = end_lines(caplog.records, "session_1_surrogate")
        assert len(lines) == 1
        assert "completed in" in lines[0]


async def test_line_separators_in_a_delta_reach_a_line_splitting_client_intact() -> None:
    # The harness reads with httpx's aiter_lines, which splits at U+2028/U+2029 as
    # Python's str.splitlines does: raw in a data: line, they cut the event in two.
    text = "a\u2028b\u2029c"
    async with Harness(sim_config(tokens=3, rate=0, token_text=text)) as h:
        async with h.stream("session_1_separators") as s:
            events = await s.rest()
        assert events[-1].event == "done"
        assert s.tokens == [text] * 3

"""Request validation, error bodies, 409, healthz, and provider faults as error events."""

from __future__ import annotations

import logging
import socket
from typing import Any

import anyio
import pytest

from .harness import ASYNCIO_AND_TRIO, Harness, LogWatch, end_lines, sim_config

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO]

MESSAGES = {"messages": [{"role": "user", "content": "hi"}]}


def _error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_session_id"),
        ({b"X-Session-Id": b"short"}, "invalid_session_id"),
        ({b"X-Session-Id": b"has space in it"}, "invalid_session_id"),
        ({b"X-Session-Id": b"x" * 129}, "invalid_session_id"),
        ({b"X-Session-Id": "séssion_123456".encode()}, "invalid_session_id"),
    ],
)
async def test_bad_session_id_is_400(headers: dict[bytes, bytes], code: str) -> None:
    async with Harness() as h:
        response = await h.client.post("/api/chat/stream", headers=headers, json=MESSAGES)
        _error(response, 400, code)
        assert len(h.registry) == 0


async def test_session_id_formats_accepted() -> None:
    async with Harness(sim_config(tokens=1, rate=0)) as h:
        for sid in ("session_1732000000000_k3j4h5", "a.b:c-d_e", "x" * 128, "12345678"):
            async with h.stream(sid) as s:
                events = await s.rest()
            assert events[-1].event == "done"


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        ("[1, 2]", "JSON object"),
        ('{"messages": []}', "messages"),
        ('{"messages": "hi"}', "messages"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
        ('{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        ('{"messages": [{"role": "user", "content": "x"}, 3]}', "messages[1]"),
        ('{"messages": [{"role": "user", "content": "x"}], "model": ""}', "model"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', "temperature"),
        ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens"),
    ],
)
async def test_bad_body_is_400_naming_the_field(body: str, message_part: str) -> None:
    async with Harness() as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_bad_body", "content-type": "application/json"},
            content=body,
        )
        _error(response, 400, "invalid_body")
        assert message_part in response.json()["error"]["message"]
        assert len(h.registry) == 0


async def test_malformed_json_is_400() -> None:
    async with Harness() as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_bad_json", "content-type": "application/json"},
            content=b'{"messages": [',
        )
        _error(response, 400, "invalid_json")


async def test_not_json_is_415() -> None:
    async with Harness() as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_form_1", "content-type": "text/plain"},
            content=b"hello",
        )
        _error(response, 415, "unsupported_media_type")


async def test_live_duplicate_session_id_is_409_and_first_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = "session_dup_0001"
    async with Harness(sim_config(tokens=40, rate=200)) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(1)
            response = await h.client.post(
                "/api/chat/stream", headers={"X-Session-Id": sid}, json=MESSAGES
            )
            _error(response, 409, "session_conflict")
            events = await s.rest()
        assert events[-1].event == "done"
        assert len(s.tokens) == 40
        await h.ended(sid)
        assert len(end_lines(caplog.records, sid)) == 1


async def test_unknown_route_and_method_get_json_errors() -> None:
    async with Harness() as h:
        _error(await h.client.get("/nope"), 404, "not_found")
        _error(await h.client.get("/api/chat/stream"), 405, "method_not_allowed")


async def test_healthz_counts_live_sessions() -> None:
    async with Harness(sim_config(tokens=10_000)) as h:
        assert (await h.client.get("/healthz")).json() == {"status": "ok", "sessions": 0}
        async with h.stream("session_health") as s:
            await s.tokens_at_least(1)
            assert (await h.client.get("/healthz")).json()["sessions"] == 1
        await h.ended("session_health")
        assert (await h.client.get("/healthz")).json()["sessions"] == 0


async def test_max_tokens_and_model_are_forwarded() -> None:
    async with Harness(sim_config(tokens=50, rate=0)) as h:
        async with h.stream(
            "session_fwd_01", model="other-model", max_tokens=7, temperature=0.5
        ) as s:
            events = await s.rest()
        assert len(s.tokens) == 7
        assert events[-1].data["finish_reason"] == "length"
        sent = h.simulator.requests[-1]
        assert sent["model"] == "other-model"
        assert sent["max_tokens"] == 7
        assert sent["temperature"] == 0.5
        assert sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}


# Provider faults: each ends the stream with one `error` event and one log line.


async def _error_event(h: Harness, sid: str) -> dict[str, Any]:
    async with h.stream(sid) as s:
        events = await s.rest()
    assert [e.event for e in events].count("error") == 1
    assert events[-1].event == "error"
    data: dict[str, Any] = events[-1].data
    assert data["status"] == "error"
    await h.ended(sid)
    assert len(h.registry) == 0
    return data


async def test_provider_refuses_connection(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on `port` now.
    async with Harness(upstream_url=f"http://127.0.0.1:{port}/v1") as h:
        data = await _error_event(h, "session_refused")
        assert data["code"] == "upstream_unavailable"
        lines = end_lines(caplog.records, "session_refused")
        assert len(lines) == 1
        assert "failed code=upstream_unavailable" in lines[0]
        assert not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_provider_error_status(status: int) -> None:
    async with Harness(sim_config(status=status)) as h:
        data = await _error_event(h, "session_status")
        assert data["code"] == "upstream_error"
        assert data["upstream_status"] == status
        assert "simulated failure" not in data["message"]


async def test_provider_resets_mid_stream(caplog: pytest.LogCaptureFixture) -> None:
    async with Harness(sim_config(tokens=50, reset_after=5, rate=0)) as h:
        data = await _error_event(h, "session_reset")
        assert data["code"] == "upstream_disconnected"
        await h.assert_ended_cleanly(caplog, "session_reset", "failed code=upstream_disconnected")


async def test_provider_sends_malformed_chunk() -> None:
    async with Harness(sim_config(tokens=50, malformed_after=3, rate=0)) as h:
        data = await _error_event(h, "session_malformed")
        assert data["code"] == "upstream_protocol"
        assert h.upstream_connections() == 0


async def test_provider_closes_without_done() -> None:
    async with Harness(sim_config(tokens=5, omit_done=True, rate=0)) as h:
        data = await _error_event(h, "session_no_done")
        assert data["code"] == "upstream_protocol"


async def test_connect_timeout_is_upstream_unavailable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            async with Harness(
                upstream_url=f"http://127.0.0.1:{port}/v1", connect_timeout=0.2
            ) as h:
                with anyio.fail_after(3):
                    data = await _error_event(h, "session_ctimeout")
                assert data["code"] == "upstream_unavailable"


async def test_provider_sends_a_giant_chunk() -> None:
    # One 2 MiB delta: a line over the parser's 1 MiB bound, refused, not buffered.
    async with Harness(sim_config(tokens=3, rate=0, token_text="x" * (2 * 1024 * 1024))) as h:
        data = await _error_event(h, "session_giant")
        assert data["code"] == "upstream_protocol"
        assert h.upstream_connections() == 0


# Hostile input: each refused before any session exists, never a 500, nothing disturbed.


@pytest.mark.parametrize("field", ["model", "messages[0].content"])
async def test_text_with_a_lone_surrogate_is_400_and_leaves_no_session(field: str) -> None:
    # JSON's "\udfff" escape decodes to a lone surrogate, which no UTF-8 encoder
    # downstream could write. Before, each such request left a zombie session.
    bad = '"\\udfff"'
    body = (
        f'{{"messages": [{{"role": "user", "content": "hi"}}], "model": {bad}}}'
        if field == "model"
        else f'{{"messages": [{{"role": "user", "content": {bad}}}]}}'
    )
    sid = "session_surrogate01"
    async with Harness(sim_config(tokens=3, rate=0), max_sessions=2) as h:
        for _ in range(5):
            response = await h.client.post(
                "/api/chat/stream",
                headers={"X-Session-Id": sid, "content-type": "application/json"},
                content=body,
            )
            _error(response, 400, "invalid_body")
            assert field in response.json()["error"]["message"]
        assert len(h.registry) == 0
        assert len(h.simulator.records) == 0
        # The id and the process-wide limit are untouched: a real stream works.
        async with h.stream(sid) as s:
            events = await s.rest()
        assert events[-1].event == "done"
        assert (await h.cancel(sid)).status_code == 404


async def test_a_model_name_over_the_bound_is_400() -> None:
    async with Harness() as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_long_model"},
            json={**MESSAGES, "model": "m" * 257},
        )
        _error(response, 400, "invalid_body")
        assert "model" in response.json()["error"]["message"]
        assert len(h.simulator.records) == 0


async def test_deeply_nested_json_is_400_not_a_recursion_error() -> None:
    async with Harness() as h:
        body = b'{"messages": [{"role": "user", "content": "x"}], "ignored": ' + b"[" * 100_000
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_nested01", "content-type": "application/json"},
            content=body,
        )
        _error(response, 400, "invalid_json")
        assert "nested" in response.json()["error"]["message"]


async def test_a_client_leaving_mid_body_is_one_info_line() -> None:
    async with Harness() as h:
        with LogWatch("client went away while sending its request body") as watch:
            for _ in range(20):
                stream = await anyio.connect_tcp("127.0.0.1", h.port)
                async with stream:
                    await stream.send(
                        b"POST /api/chat/stream HTTP/1.1\r\nhost: x\r\n"
                        b"content-type: application/json\r\nx-session-id: session_leaving01\r\n"
                        b'content-length: 1000\r\n\r\n{"messages"'
                    )
            lines = await watch.wait(20)
        assert len(h.registry) == 0
        assert len(h.simulator.records) == 0
    # One INFO line per connection, no traceback (and, checked after every test, no ERROR).
    assert len(lines) == 20
    assert all(r.levelno == logging.INFO and not r.exc_info for r in lines)


async def test_demo_panel_shows_a_principal_its_own_sessions_only() -> None:
    keys = (("alice", "alice-key-0123456789abcdef"), ("bob", "bob-key-0123456789abcdef00"))
    alice = {"Authorization": f"Bearer {keys[0][1]}"}
    bob = {"Authorization": f"Bearer {keys[1][1]}"}
    sid = "session_demo_0001"
    async with Harness(demo=True, api_keys=keys, simulator_tokens=10_000) as h:
        async with h.stream(sid, headers=alice) as s:
            await s.tokens_at_least(1)
            # Bob asks about alice's live stream: 404 at once (before, the answer
            # was alice's record, after a wait that told the id was live).
            with anyio.fail_after(0.5):
                other = await h.client.get(f"/api/demo/provider/{sid}", headers=bob)
            _error(other, 404, "not_found")
            assert (await h.cancel(sid, headers=alice)).status_code == 200
            await s.rest()
        own = await h.client.get(f"/api/demo/provider/{sid}", headers=alice)
        assert own.status_code == 200
        assert own.json()["outcome"] == "closed_by_client"
        assert 0 < own.json()["generated"] < own.json()["planned"]

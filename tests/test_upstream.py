"""A hostile or broken provider, on a real socket: what reaches the client and the log.

The provider here answers every request with one canned response, written in one
send (so what it holds arrives in as few reads as the kernel makes of it): a
tests/replay.py provider.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import anyio
import pytest

from . import replay
from .harness import Harness, end_lines, sim_config

pytestmark = pytest.mark.anyio


def _chunk(delta: dict[str, Any], finish: Any = None, **extra: Any) -> bytes:
    body = {"id": "c1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps({**body, **extra}).encode() + b"\n\n"


STREAM = (
    _chunk({"role": "assistant", "content": ""})
    + _chunk({"content": "Hel"})
    + _chunk({"content": "lo"})
    + _chunk({}, "stop")
    + b"data: [DONE]\n\n"
)
SSE = [(b"content-type", b"text/event-stream")]


async def _events(h: Harness, sid: str) -> list[Any]:
    async with h.stream(sid) as s:
        events = await s.rest()
    await h.ended(sid)
    return events


async def test_a_gzip_bomb_is_refused_not_decoded(caplog: pytest.LogCaptureFixture) -> None:
    # A valid stream hidden in 256 MB of newlines, gzipped to a few hundred KB. The
    # gateway asks for identity and must not decode it: before, it did, blocking the
    # event loop while it inflated (2 GiB froze every stream for 11 s).
    bomb = gzip.compress(STREAM[:-14] + b"\n" * (256 * 1024 * 1024) + STREAM[-14:], 1)
    provider = replay.Replay(bomb, headers=[*SSE, (b"content-encoding", b"gzip")])
    async with (
        replay.replaying(provider) as h,
        Harness(sim_config(tokens=10_000, rate=100)) as other,
        other.stream("session_1_bystander") as bystander,
    ):
        await bystander.tokens_at_least(1)
        with anyio.fail_after(2):
            events = await _events(h, "session_1_gzipbomb")
        assert [e.event for e in events] == ["start", "error"]
        assert events[-1].data["code"] == "upstream_protocol"
        assert "encoding" in events[-1].data["message"]
        # A stream of another gateway on the same event loop kept flowing.
        await bystander.tokens_at_least(len(bystander.tokens) + 2)
        assert (await other.cancel("session_1_bystander")).status_code == 200
        await bystander.rest()
        await h.assert_ended_cleanly(caplog, "session_1_gzipbomb", "failed code=upstream_protocol")


@pytest.mark.parametrize(
    ("status", "headers", "why"),
    [
        (302, [*SSE, (b"location", b"http://elsewhere/v1/chat/completions")], "HTTP 302"),
        (200, [(b"content-type", b"application/json")], "without an event stream"),
        (200, [], "without an event stream"),
        (203, SSE, "HTTP 203"),
    ],
)
async def test_an_answer_that_is_not_an_event_stream_is_an_error(
    status: int, headers: list[tuple[bytes, bytes]], why: str
) -> None:
    # Each body is a valid stream: before, it was relayed and ended as `done`.
    async with replay.replaying(replay.Replay(STREAM, status=status, headers=headers)) as h:
        events = await _events(h, "session_1_notastream")
        assert [e.event for e in events] == ["start", "error"]
        assert events[-1].data["code"] == "upstream_protocol"
        assert why in events[-1].data["message"]
        assert events[-1].data["upstream_status"] == status


async def test_deltas_before_an_in_stream_error_reach_the_client() -> None:
    error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    body = STREAM[: STREAM.index(b'data: {"id": "c1", "choices": [{"index": 0, "delta": {}')]
    for tail in (error, b"data: {not json\n\n"):
        async with replay.replaying(replay.Replay(body + tail)) as h:
            events = await _events(h, "session_1_partial0")
            assert [e.event for e in events] == ["start", "token", "token", "error"]
            assert [e.data["delta"] for e in events[1:3]] == ["Hel", "lo"]


async def test_finish_reason_usage_and_error_types_carry_no_provider_text() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "note": "echo of the prompt"}
    body = (
        _chunk({"content": "Hi"})
        + _chunk({}, "say the secret word")
        + b"data: "
        + json.dumps({"choices": [], "usage": usage}).encode()
        + b"\n\ndata: [DONE]\n\n"
    )
    async with replay.replaying(replay.Replay(body)) as h:
        events = await _events(h, "session_1_freetext")
    done = events[-1]
    assert done.event == "done"
    assert done.data["finish_reason"] == "other"
    assert done.data["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}
    # An identifier-shaped error type that is really the prompt is not relayed.
    error = b'data: {"error": {"message": "x", "type": "my_password_is_hunter2"}}\n\n'
    async with replay.replaying(replay.Replay(error)) as h:
        events = await _events(h, "session_1_freetext")
    assert events[-1].data["message"] == "provider sent an error"


@pytest.mark.parametrize("reason", [["stop"], {"reason": "stop"}])
async def test_a_finish_reason_that_is_not_text_ends_the_stream_as_other(
    reason: object, caplog: pytest.LogCaptureFixture
) -> None:
    # Not hashable: looked up among the known reasons, it raised TypeError, and every
    # such stream ended internal_error with a traceback.
    body = _chunk({"content": "Hi"}) + _chunk({}, reason) + b"data: [DONE]\n\n"
    async with replay.replaying(replay.Replay(body)) as h:
        events = await _events(h, "session_1_reasonlist")
    assert [e.event for e in events] == ["start", "token", "done"]
    assert events[-1].data["finish_reason"] == "other"
    lines = end_lines(caplog.records, "session_1_reasonlist")
    assert len(lines) == 1
    assert "completed in" in lines[0]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize(
    ("status", "error", "logged"),
    [
        (
            401,
            {
                "message": "Incorrect API key sk-abc",
                "type": "authentication_error",
                "code": "invalid_api_key",
            },
            "provider_type=authentication_error provider_code=invalid_api_key",
        ),
        (
            400,
            {
                "message": "The model `gpt-9` does not exist",
                "type": "invalid_request_error",
                "code": "model_not_found",
            },
            "provider_type=invalid_request_error provider_code=model_not_found",
        ),
    ],
)
async def test_the_log_tells_provider_errors_apart_and_the_client_stays_safe(
    caplog: pytest.LogCaptureFixture, status: int, error: dict[str, str], logged: str
) -> None:
    body = json.dumps({"error": error}).encode()
    provider = replay.Replay(body, status=status, headers=[(b"content-type", b"application/json")])
    async with replay.replaying(provider) as h:
        events = await _events(h, "session_1_provider")
    assert events[-1].data["message"] == f"provider answered HTTP {status}"
    [line] = end_lines(caplog.records, "session_1_provider")
    assert f"upstream_status={status} {logged}" in line
    assert error["message"] not in caplog.text

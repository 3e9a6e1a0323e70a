"""Client-supplied values cannot forge, split or flood log lines."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx2 as httpx
import pytest

from gateway.logs import EscapeControlCharacters, loggable

from .harness import worker_class
from .processes import WAIT, Gateway


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("plain-model", "plain-model"),
        ("a\nb", "a\\x0ab"),
        ("a\r\nERROR x", "a\\x0d\\x0aERROR x"),
        ("\x1b[2J", "\\x1b[2J"),
        ("\x85\u2028\u2029", "\\x85\\u2028\\u2029"),
        ("w\u00f6rld \U0001f600", "w\u00f6rld \U0001f600"),
    ],
)
def test_control_characters_are_escaped(value: str, logged: str) -> None:
    assert loggable(value) == logged


def test_long_values_are_cut_and_say_how_long_they_were() -> None:
    text = loggable("m" * 1_000_000)
    assert text == "m" * 256 + "...(1000000 chars)"


def test_the_filter_makes_every_message_one_bounded_line() -> None:
    record = logging.LogRecord("x", logging.INFO, "", 0, 'GET %s "%s"', ("/a\nb", "c" * 9000), None)
    assert EscapeControlCharacters().filter(record)
    message = record.getMessage()
    assert "\n" not in message
    assert message.startswith('GET /a\\x0ab "ccc')
    assert len(message) < 4200


@pytest.mark.anyio
async def test_a_client_cannot_forge_split_or_flood_log_lines(anyio_backend: Any) -> None:
    """Through `gateway serve` with the shipped hypercorn.toml: the gateway's lines and
    hypercorn's access log (which writes the percent-decoded path) both."""
    gateway = await anyio.to_thread.run_sync(Gateway, worker_class(anyio_backend))
    forged = "FORGED-LINE"
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=WAIT) as client:
            response = await client.post(
                "/api/chat/stream",
                headers={"X-Session-Id": "session_1_logforge"},
                json={
                    "messages": [{"role": "user", "content": "hi"}],
                    "model": f"m\n2026-01-01 00:00:00,000 ERROR gateway.api: {forged}\x1b[2J",
                    "max_tokens": 1,
                },
            )
            assert response.status_code == 200
            for path in (f"abc%0A{forged}%0D%0A", f"abc%1b[2J{forged}", "x" * 9000 + forged):
                cancel = await client.post(f"/api/chat/cancel/{path}")
                assert cancel.status_code == 404
        # The access log's line for the last cancel is written after its answer.
        await anyio.to_thread.run_sync(gateway.wait_for, r'"POST /api/chat/cancel/x{100}')
    finally:
        await anyio.to_thread.run_sync(gateway.stop)
    lines = gateway.lines
    assert not [line for line in lines if line.startswith(("2026-01-01", forged))], lines
    assert not [line for line in lines if "\x1b" in line or "\r" in line]
    # Each value is on the line it belongs to, escaped.
    assert any("started model=m\\x0a2026-01-01" in line for line in lines)
    assert any(f"Cancel request received for abc\\x0a{forged}" in line for line in lines)
    assert any(f'"POST /api/chat/cancel/abc\\x0a{forged}' in line for line in lines)
    assert max(len(line) for line in lines) < 5000

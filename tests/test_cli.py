"""The two ways to run the gateway, as real processes: `gateway serve` and plain hypercorn."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from .harness import WAIT, EventReader, worker_class

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


class _Output:
    """A process's stderr, collected line by line; waits are on lines, not sleeps."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = anyio.Event()

    async def collect(self, process: Process) -> None:
        assert process.stderr is not None
        buffer = ""
        async for text in TextReceiveStream(process.stderr):
            buffer += text
            *complete, buffer = buffer.split("\n")
            self.lines += complete
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(self, pattern: str) -> str:
        with anyio.fail_after(WAIT):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                await self._changed.wait()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def _running(
    command: list[str], port: int, **settings: str
) -> AsyncIterator[tuple[Process, _Output]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"PYTHONUNBUFFERED": "1", **settings}
    process = await anyio.open_process(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    output = _Output()
    async with process, anyio.create_task_group() as tg:
        tg.start_soon(output.collect, process)
        try:
            await output.wait_for(rf"Running on http://127\.0\.0\.1:{port}\b")
            yield process, output
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.move_on_after(WAIT, shield=True):
                await process.wait()


async def _stream(client: httpx.AsyncClient, session_id: str) -> Any:
    return client.stream(
        "POST",
        "/api/chat/stream",
        headers={"X-Session-Id": session_id},
        json={"messages": [{"role": "user", "content": "hi"}]},
    )


@pytest.mark.slow
async def test_gateway_serve_stops_streams_then_exits_on_sigterm(
    anyio_backend: Any, free_tcp_port: int
) -> None:
    command = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "-k",
        worker_class(anyio_backend),
        "-b",
        f"127.0.0.1:{free_tcp_port}",
    ]
    async with _running(command, free_tcp_port) as (process, output):
        assert "built-in provider simulator" in await output.wait_for("simulator on")
        base_url = f"http://127.0.0.1:{free_tcp_port}"
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=WAIT) as client,
            await _stream(client, "session_serve_1") as response,
        ):
            reader = EventReader(response)
            await reader.tokens_at_least(2)
            process.send_signal(signal.SIGTERM)
            rest = await reader.rest()
        assert rest[-1].event == "stopped"
        assert rest[-1].data["reason"] == "shutdown"
        with anyio.fail_after(WAIT):
            assert await process.wait() == 0
        await output.wait_for("stopped reason=shutdown")
    assert output.text.count("[SSE] session_serve_1 stopped reason=shutdown") == 1
    assert f"with the {worker_class(anyio_backend)} worker" in output.text
    assert "Traceback" not in output.text


@pytest.mark.slow
async def test_plain_hypercorn_cli_streams_cancels_and_stops(
    anyio_backend: Any, free_tcp_port: int, tmp_path: Path
) -> None:
    """`hypercorn --config hypercorn.toml gateway.app:app`: the app and its simulator work;
    on SIGTERM hypercorn cancels streams itself at graceful_timeout, which the gateway
    logs as a shutdown stop after closing the provider."""
    config = tmp_path / "hypercorn.toml"
    config.write_text(
        (ROOT / "hypercorn.toml")
        .read_text()
        .replace("graceful_timeout = 5.0", "graceful_timeout = 1.0")
    )
    command = [
        sys.executable,
        "-m",
        "hypercorn",
        "--config",
        str(config),
        "-k",
        worker_class(anyio_backend),
        "-b",
        f"127.0.0.1:{free_tcp_port}",
        "gateway.app:app",
    ]
    async with _running(command, free_tcp_port) as (process, output):
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{free_tcp_port}", timeout=WAIT
        ) as client:
            async with await _stream(client, "session_cli_1") as response:
                reader = EventReader(response)
                await reader.tokens_at_least(1)
                cancel = await client.post("/api/chat/cancel/session_cli_1")
                assert cancel.status_code == 200
                rest = await reader.rest()
            assert rest[-1].data["reason"] == "cancel"
            async with await _stream(client, "session_cli_2") as response:
                reader = EventReader(response)
                await reader.tokens_at_least(1)
                process.send_signal(signal.SIGTERM)
                # hypercorn cancels the request task at graceful_timeout; the
                # gateway's cleanup still writes the terminal event.
                rest = await reader.rest()
            assert rest[-1].event == "stopped"
            assert rest[-1].data["reason"] == "shutdown"
        with anyio.fail_after(WAIT):
            await process.wait()
        await output.wait_for("session_cli_2 stopped reason=shutdown")
    assert output.text.count("session_cli_1 aborted by client/cancel reason=cancel") == 1
    assert output.text.count("[SSE] session_cli_2 stopped reason=shutdown") == 1
    # hypercorn's asyncio worker logs its own hard-cancel of connection tasks at
    # graceful_timeout as an asyncio ERROR; none of it may come from the gateway.
    assert "/gateway/" not in output.text, output.text
    assert not re.search(r" ERROR gateway", output.text), output.text


@pytest.mark.slow
async def test_plain_hypercorn_without_a_config_still_writes_the_sse_lines(
    anyio_backend: Any, free_tcp_port: int
) -> None:
    """No --config, so nobody configures logging: before, Python's last-resort handler
    showed WARNING and up only, and every [SSE] line was lost."""
    command = [
        sys.executable,
        "-m",
        "hypercorn",
        "-k",
        worker_class(anyio_backend),
        "-b",
        f"127.0.0.1:{free_tcp_port}",
        "gateway.app:app",
    ]
    async with _running(command, free_tcp_port) as (process, output):
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_tcp_port}", timeout=WAIT) as client,
            await _stream(client, "session_cli_noconfig") as response,
        ):
            reader = EventReader(response)
            await reader.tokens_at_least(1)
            assert (await client.post("/api/chat/cancel/session_cli_noconfig")).status_code == 200
            await reader.rest()
        await output.wait_for(r"session_cli_noconfig aborted by client/cancel")
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(WAIT):
            await process.wait()
    assert output.text.count("[SSE] session_cli_noconfig started") == 1
    assert output.text.count("[SSE] session_cli_noconfig aborted by client/cancel") == 1


async def test_bad_setting_fails_loudly_at_start() -> None:
    env = {**os.environ, "GATEWAY_IDLE_TIMEOUT": "soon"}
    result = await anyio.run_process(
        [sys.executable, "-m", "gateway", "serve"], env=env, cwd=ROOT, check=False
    )
    assert result.returncode == 2
    assert b"GATEWAY_IDLE_TIMEOUT" in result.stderr


async def test_gateway_serve_refuses_several_workers(tmp_path: Path) -> None:
    config = tmp_path / "hypercorn.toml"
    config.write_text('bind = ["127.0.0.1:0"]\nworkers = 2\n')
    result = await anyio.run_process(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert b"workers = 2" in result.stderr
    assert b"GATEWAY_REDIS_URL" in result.stderr


@pytest.mark.parametrize("how", ["gateway serve", "hypercorn --config", "hypercorn"])
@pytest.mark.slow
async def test_json_logs_carry_the_end_record_however_the_gateway_runs(
    how: str, anyio_backend: Any, free_tcp_port: int
) -> None:
    command = {
        "gateway serve": [sys.executable, "-m", "gateway", "serve"],
        "hypercorn --config": [sys.executable, "-m", "hypercorn", "--config", "hypercorn.toml"],
        "hypercorn": [sys.executable, "-m", "hypercorn"],
    }[how]
    command += ["-k", worker_class(anyio_backend), "-b", f"127.0.0.1:{free_tcp_port}"]
    if how != "gateway serve":
        command.append("gateway.app:app")
    sid = "session_cli_json01"
    async with _running(command, free_tcp_port, GATEWAY_LOG_FORMAT="json") as (process, output):
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_tcp_port}", timeout=WAIT) as client,
            await _stream(client, sid) as response,
        ):
            reader = EventReader(response)
            await reader.tokens_at_least(2)
            assert (await client.post(f"/api/chat/cancel/{sid}")).status_code == 200
            await reader.rest()
        await output.wait_for(rf"{sid} aborted by client/cancel")
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(WAIT):
            await process.wait()
    records = [json.loads(line) for line in output.lines if line.startswith("{")]
    mine = [r for r in records if r["logger"].startswith("gateway")]
    # The gateway's lines are JSON objects, none is plain text.
    assert not [line for line in output.lines if "[SSE]" in line and not line.startswith("{")]
    assert f"[SSE] {sid} started model=simulator" in [r["message"] for r in mine]
    [end] = [r for r in mine if "aborted by client/cancel" in r["message"]]
    tokens = len(reader.tokens)
    assert end["level"] == "INFO"
    assert {k: end[k] for k in ("session_id", "principal", "outcome", "reason")} == {
        "session_id": sid,
        "principal": "anonymous",
        "outcome": "cancelled",
        "reason": "cancel",
    }
    assert end["model"] == "simulator"
    assert (end["tokens_delivered"], end["reasoning_delivered"], end["tool_calls_delivered"]) == (
        tokens,
        0,
        0,
    )
    assert end["refusal_delivered"] == 0
    assert end["usage_source"] == "estimated"
    assert end["usage"]["completion_tokens"] is None
    assert end["usage"]["deltas_delivered"] == tokens
    assert end["usage"]["estimated"] is True
    assert isinstance(end["duration_ms"], int)
    assert 0 <= end["time_to_first_delta_ms"] <= end["duration_ms"]
    assert 0 <= end["provider_close_ms"] < 1000

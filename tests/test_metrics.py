"""GET /metrics after a known mix of streams, read with prometheus_client's own parser:
every counter equals the mix, on asyncio, uvloop and Trio."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import ConfigError, Settings
from gateway.server.serve import load_config
from gateway.tools.simulator import Simulator, SimulatorConfig
from gateway.web.state import state_of
from support.processes import free_port

from .harness import WAIT, Harness, end_lines, serve_until, sim_config, worker_class
from .processes import hypercorn_workers, until_up

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
_TOKENS = re.compile(r" tokens=(\d+)")


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def _stream_to_end(h: Harness, sid: str) -> None:
    async with h.stream(sid) as s:
        await s.rest()


async def test_every_counter_equals_a_known_mix(caplog: pytest.LogCaptureFixture) -> None:
    # One gateway, its timeouts short enough for a stream to meet each of them.
    async with Harness(
        sim_config(tokens=3, rate=0),
        first_token_timeout=0.5,
        idle_timeout=0.5,
        max_duration=1.5,
        send_timeout=0.5,
    ) as h:
        sim = h.simulator
        await _stream_to_end(h, "session_m_completed")

        sim.config = sim_config(tokens=100_000, rate=200)
        async with h.stream("session_m_cancelled") as s:
            await s.tokens_at_least(3)
            assert (await h.cancel("session_m_cancelled")).status_code == 200
            await s.rest()
        assert (await h.cancel("session_m_nobody00")).status_code == 404
        async with h.stream("session_m_disconnect") as s:
            await s.tokens_at_least(3)
        await h.ended("session_m_disconnect")

        sim.config = sim_config(tokens=10, queue_seconds=5, keepalive_interval=0.05)
        await _stream_to_end(h, "session_m_first_tok")
        sim.config = sim_config(tokens=100, stall_after=2, keepalive_interval=0.05)
        await _stream_to_end(h, "session_m_idle_tout")
        sim.config = sim_config(tokens=100_000, rate=20)
        await _stream_to_end(h, "session_m_total_tout")
        sim.config = sim_config(status=500)
        await _stream_to_end(h, "session_m_upstream5")
        sim.config = sim_config(tokens=5000, rate=0, token_text="x" * 8192)
        before = len(sim.records)
        with h.stalled_reader("session_m_send_tout"):
            with anyio.fail_after(WAIT):
                await sim.wait_until(lambda: len(sim.records) > before)
            await h.closed(sim.records[before])
            await h.ended("session_m_send_tout")

        sids = [
            "session_m_completed",
            "session_m_cancelled",
            "session_m_disconnect",
            "session_m_first_tok",
            "session_m_idle_tout",
            "session_m_total_tout",
            "session_m_upstream5",
            "session_m_send_tout",
        ]
        for sid in sids:
            await h.ended(sid)
        response = await h.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        m = _samples(response.text)

        # The shutdown stop: the server is gone after it, so its figures are read from
        # the same exposition in the process.
        sim.config = sim_config(tokens=100_000, rate=200)
        async with h.stream("session_m_shutdown0") as s:
            await s.tokens_at_least(2)
            await h.shutdown()
            await s.rest()
        with anyio.fail_after(WAIT):
            await h.served.wait()
        after = _samples(state_of(h.app).metrics.exposition().decode())

    ended = {
        "completed": 1,
        "cancelled": 1,
        "disconnected": 1,
        "timeout_first_token": 1,
        "timeout_idle": 1,
        "timeout_total": 1,
        "timeout_send": 1,
        "shutdown": 0,
        "upstream_error": 1,
        "internal_error": 0,
    }
    for outcome, count in ended.items():
        assert _value(m, "gateway_streams_ended_total", outcome=outcome) == count, outcome
        assert _value(m, "gateway_stream_duration_seconds_count", outcome=outcome) == count
    assert _value(m, "gateway_streams_started_total") == len(sids)
    assert _value(m, "gateway_streams_live") == 0
    assert _value(after, "gateway_streams_ended_total", outcome="shutdown") == 1
    assert _value(after, "gateway_streams_started_total") == len(sids) + 1
    assert _value(after, "gateway_streams_live") == 0

    # The deltas delivered are the ones each stream's end line counted.
    lines = [line for sid in sids for line in end_lines(caplog.records, sid)]
    assert len(lines) == len(sids)
    logged = sum(int(hit.group(1)) for line in lines if (hit := _TOKENS.search(line)))
    assert logged > 0
    assert _value(m, "gateway_deltas_delivered_total", kind="content") == logged
    assert _value(m, "gateway_deltas_delivered_total", kind="reasoning") == 0

    triggers = Counter({"cancel": 1, "disconnect": 1, "timeout": 4, "shutdown": 0})
    for trigger, count in triggers.items():
        assert _value(m, "gateway_provider_close_seconds_count", trigger=trigger) == count
    assert _value(after, "gateway_provider_close_seconds_count", trigger="shutdown") == 1
    # The completed stream and each stop had deltas; the upstream 500 had none.
    assert _value(m, "gateway_time_to_first_delta_seconds_count") == 6

    assert _value(m, "gateway_cancel_requests_total", result="stopped") == 1
    assert _value(m, "gateway_cancel_requests_total", result="not_found") == 1
    assert _value(m, "gateway_cancel_requests_total", result="forwarded") == 0
    assert _value(m, "gateway_upstream_errors_total", code="upstream_error") == 1
    # The simulator's usage for the completed stream: 3 completion tokens.
    assert _value(m, "gateway_provider_tokens_total", type="completion") == 3
    assert _value(m, "gateway_provider_tokens_total", type="prompt") > 0
    # Bounded labels: no session id, principal or model anywhere.
    assert "session_m_" not in response.text
    assert "sim-model" not in response.text


async def test_the_metrics_key_guards_metrics_only() -> None:
    key = "metrics-key-0123456789"
    async with Harness(sim_config(tokens=2, rate=0), metrics_key=key) as h:
        missing = await h.client.get("/metrics")
        wrong = await h.client.get("/metrics", headers={"Authorization": "Bearer nope-nope"})
        right = await h.client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
        await _stream_to_end(h, "session_key_stream")
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert right.status_code == 200
    assert "gateway_streams_started_total" in right.text


def test_a_short_metrics_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_METRICS_KEY"):
        Settings.from_env({"GATEWAY_METRICS_KEY": "short"})


@pytest.mark.parametrize("key", [" ", "\t\n", " " * 20, "a-key-with a space-in-it"])
def test_a_metrics_key_of_whitespace_is_refused_not_read_as_open(key: str) -> None:
    # Before: " " was stripped to nothing and read as unset, so /metrics was open.
    with pytest.raises(ConfigError, match="GATEWAY_METRICS_KEY"):
        Settings.from_env({"GATEWAY_METRICS_KEY": key})
    with pytest.raises(ConfigError, match="GATEWAY_METRICS_KEY"):
        Settings(metrics_key=key)


@pytest.mark.slow
async def test_two_workers_behind_one_port_report_the_sum(
    anyio_backend: Any, tmp_path: Path
) -> None:
    """hypercorn --workers 2 with PROMETHEUS_MULTIPROC_DIR: 20 streams spread over the
    workers, and every scrape, whichever worker answers it, reports all 20."""
    provider = Simulator(SimulatorConfig(tokens=3, rate=0))
    stop = anyio.Event()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    async with anyio.create_task_group() as tg:
        config = load_config(bind=["127.0.0.1:0"], graceful_timeout=1.0, accesslog=None)
        [(_, provider_port)] = await tg.start(serve_until, provider, config, stop.wait)
        env |= {
            "GATEWAY_UPSTREAM_URL": f"http://127.0.0.1:{provider_port}/v1",
            "GATEWAY_MODEL": "m",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        }
        url = f"http://127.0.0.1:{port}"
        try:
            async with hypercorn_workers(worker_class(anyio_backend), port, env):
                await until_up(url)
                for i in range(20):
                    # A fresh connection each, so the streams spread over both workers.
                    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as fresh:
                        response = await fresh.post(
                            "/api/chat/stream",
                            headers={"X-Session-Id": f"session_workers_{i:02}"},
                            json={"messages": [{"role": "user", "content": "x"}]},
                        )
                    assert response.status_code == 200
                    assert "event: done" in response.text
                # Each worker wrote its own files (named by its pid).
                files = anyio.Path(tmp_path).glob("counter_*.db")
                pids = {p.stem.rsplit("_", 1)[1] async for p in files}
                assert len(pids) == 2
                for _ in range(6):
                    async with httpx.AsyncClient(base_url=url, timeout=WAIT) as fresh:
                        m = _samples((await fresh.get("/metrics")).text)
                    assert _value(m, "gateway_streams_started_total") == 20
                    assert _value(m, "gateway_streams_ended_total", outcome="completed") == 20
                    assert _value(m, "gateway_streams_live") == 0
        finally:
            stop.set()


@pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="Debian's prometheus is not installed (make test installs it)",
)
# The exposition is the same on every backend (the known mix checks each); this is
# about Prometheus reading it, so one backend is enough (5 s each).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.slow
async def test_a_real_prometheus_scrapes_the_gateway(tmp_path: Path) -> None:
    key = "metrics-key-0123456789"
    async with Harness(sim_config(tokens=3, rate=0), metrics_key=key) as h:
        prometheus_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: gateway\n"
            f"    authorization: {{credentials: {key}}}\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{h.port}']}}]\n"
        )
        process = await anyio.open_process(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for i in range(5):
                await _stream_to_end(h, f"session_prom_{i:02}")
            query = "sum(gateway_streams_ended_total)"
            async with httpx.AsyncClient(timeout=WAIT) as client:
                # Prometheus scrapes on its own clock: its answer can only be polled.
                with anyio.fail_after(30):
                    while True:
                        try:
                            answer = await client.get(
                                f"http://127.0.0.1:{prometheus_port}/api/v1/query",
                                params={"query": query},
                            )
                            result = answer.json()["data"]["result"]
                        except (httpx.TransportError, ValueError, KeyError):
                            result = []
                        if result and float(result[0]["value"][1]) == 5:
                            break
                        await anyio.sleep(0.2)
                targets = await client.get(f"http://127.0.0.1:{prometheus_port}/api/v1/targets")
            [target] = targets.json()["data"]["activeTargets"]
            assert target["health"] == "up"
        finally:
            process.terminate()
            with anyio.move_on_after(WAIT, shield=True):
                await process.wait()
            if process.returncode is None:
                process.kill()
            await process.aclose()


async def test_metrics_off_counts_nothing_and_metrics_is_404() -> None:
    async with Harness(sim_config(tokens=2, rate=0), metrics=False) as h:
        await _stream_to_end(h, "session_metrics_off")
        response = await h.client.get("/metrics")
        exposition = state_of(h.app).metrics.exposition()
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "GATEWAY_METRICS=off" in response.json()["error"]["message"]
    assert b"gateway_" not in exposition


def test_the_metrics_switch_reads_on_and_off() -> None:
    assert Settings.from_env({}).metrics is True
    assert Settings.from_env({"GATEWAY_METRICS": "off"}).metrics is False
    assert Settings.from_env({"GATEWAY_METRICS": "ON"}).metrics is True
    with pytest.raises(ConfigError, match="GATEWAY_METRICS must be on or off"):
        Settings.from_env({"GATEWAY_METRICS": "maybe"})


async def test_a_doubled_authorization_header_on_metrics_is_refused() -> None:
    key = "metrics-key-0123456789"
    async with Harness(sim_config(tokens=2, rate=0), metrics_key=key) as h:
        response = await h.client.get(
            "/metrics",
            headers=[("Authorization", f"Bearer {key}"), ("Authorization", "Bearer other")],
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "ambiguous_header"

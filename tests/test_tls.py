"""TLS to providers (docs/operations.md): trust per provider, mutual TLS, and why a
connection failed, kept apart in the log line, the metric and the end line.

Every provider here is the simulator served by hypercorn over real TLS, with
certificates made at test time (trustme); the gateway reaches it at 127.0.0.1.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from gateway import ConfigError, Settings
from gateway.config import read_config
from gateway.provider.client import ProviderClient
from gateway.server.serve import load_config
from gateway.tools.simulator import Simulator
from gateway.web.state import state_of
from support.processes import ROOT

from .harness import (
    Certificates,
    Harness,
    LogWatch,
    end_lines,
    issue_certificate,
    openai_client,
    read_chunks,
    serve_until,
    sim_config,
)

pytestmark = [pytest.mark.anyio, pytest.mark.asyncio_and_trio]

_HOST = "127.0.0.1"
Pems = dict[str, Certificates]


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Pems:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    year = datetime.timedelta(days=365)
    return {
        "good": issue_certificate(directory, "good", ca, _HOST),
        "other_name": issue_certificate(directory, "other_name", ca, "provider.example"),
        "expired": issue_certificate(
            directory, "expired", ca, _HOST, not_before=now - 2 * year, not_after=now - year
        ),
        # A client certificate from a CA of the provider's own.
        "client": issue_certificate(directory, "client", trustme.CA(), "gateway@example"),
    }


def _served(pem: Certificates, **extra: Any) -> dict[str, Any]:
    return {"certfile": str(pem.cert), "keyfile": str(pem.key), **extra}


def _trusting(pems: Pems, tokens: int, rate: float = 0) -> Harness:
    """A gateway whose provider (the simulator) has the good certificate, its CA
    trusted through GATEWAY_UPSTREAM_CA_FILE."""
    pem = pems["good"]
    config = sim_config(tokens=tokens, rate=rate)
    return Harness(config, sim_tls=_served(pem), upstream_ca_file=str(pem.ca))


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no {name} {labels}")


async def _failed(
    h: Harness, caplog: pytest.LogCaptureFixture, sid: str
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The stream's error event, its one end line, and that line's JSON record."""
    async with h.stream(sid) as s:
        events = await s.rest()
    assert [e.event for e in events] == ["start", "error"], events
    await h.ended(sid)
    [line] = end_lines(caplog.records, sid)
    [record] = [r for r in caplog.records if r.getMessage() == line]
    gateway: dict[str, Any] = record.__dict__["gateway"]
    data: dict[str, Any] = events[-1].data
    return data, line, gateway


async def test_a_private_ca_is_trusted_through_ca_file(pems: Pems) -> None:
    async with _trusting(pems, 20) as h:
        async with h.stream("session_tls_trusted") as s:
            events = await s.rest()
        assert events[-1].event == "done"
        assert "".join(s.tokens) == (await h.record()).text
        assert len(s.tokens) == 20


async def test_a_tls_connection_is_kept_alive_for_the_next_stream(pems: Pems) -> None:
    async with _trusting(pems, 3) as h:
        idle = []
        for i in range(3):
            async with h.stream(f"session_tls_again_{i}") as s:
                assert (await s.rest())[-1].event == "done"
            await h.ended(f"session_tls_again_{i}")
            [provider] = state_of(h.app).providers
            assert isinstance(provider.client, ProviderClient)
            assert provider.client.lean is not None
            idle.append([c.socket.getsockname() for c in provider.client.lean._idle if c.socket])
        # One connection, handshaken once, served all three.
        assert len(idle[0]) == 1
        assert idle[0] == idle[1] == idle[2]


async def test_ssl_cert_file_replaces_the_system_trust_as_in_python(
    pems: Pems, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read when the provider's client is made, at start-up.
    monkeypatch.setenv("SSL_CERT_FILE", str(pems["good"].ca))
    async with Harness(sim_config(tokens=3, rate=0), sim_tls=_served(pems["good"])) as h:
        async with h.stream("session_tls_env") as s:
            events = await s.rest()
        assert events[-1].event == "done"


@pytest.mark.parametrize(
    ("served", "trust", "cause"),
    [
        # No ca_file: the system's trust does not know the test's CA.
        ("good", False, "cert_untrusted"),
        ("other_name", True, "cert_hostname_mismatch"),
        ("expired", True, "cert_expired"),
    ],
)
async def test_a_certificate_that_does_not_verify_is_told_apart(
    pems: Pems, caplog: pytest.LogCaptureFixture, served: str, trust: bool, cause: str
) -> None:
    caplog.set_level(logging.INFO)
    pem = pems[served]
    ca_file = str(pem.ca) if trust else None
    async with Harness(
        sim_config(tokens=5, rate=0), sim_tls=_served(pem), upstream_ca_file=ca_file
    ) as h:
        data, line, record = await _failed(h, caplog, f"session_tls_{cause}")
        # The client: a code saying the gateway needs attention, and no detail.
        assert data["code"] == "upstream_misconfigured"
        assert data["message"] == "no trusted connection to the provider could be made"
        # The operator: the cause, in the log line, the JSON end line and the metric.
        assert f"failed code=upstream_misconfigured cause={cause} " in line
        assert record["code"] == "upstream_misconfigured"
        assert record["cause"] == cause
        assert record["cause_detail"]  # OpenSSL's words, e.g. "certificate has expired"
        metrics = (await h.client.get("/metrics")).text
        assert _metric(metrics, "gateway_upstream_errors_total", code=cause) == 1
        assert _metric(metrics, "gateway_upstream_errors_total", code="cert_untrusted") == (
            1 if cause == "cert_untrusted" else 0
        )
        # The simulator never saw a request, and nothing is left open.
        assert not h.simulator.records
        assert h.upstream_connections() == 0


async def test_the_openai_sdk_reads_the_code(pems: Pems) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    async with (
        Harness(sim_config(tokens=5, rate=0), sim_tls=_served(pems["expired"])) as h,
        openai_client(h) as sdk,
    ):
        stream = await sdk.chat.completions.create(model="m", messages=messages, stream=True)
        with pytest.raises(openai.APIError) as streamed:
            await read_chunks(stream)
        assert streamed.value.code == "upstream_misconfigured"
        with pytest.raises(openai.InternalServerError) as whole:
            await sdk.chat.completions.create(model="m", messages=messages)
        assert whole.value.status_code == 502
        assert whole.value.code == "upstream_misconfigured"


async def test_mutual_tls_presents_the_client_certificate(
    pems: Pems, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pem, client = pems["good"], pems["client"]
    # The provider asks every client for a certificate from the client's CA.
    served = _served(pem, ca_certs=str(client.ca), verify_mode=ssl.CERT_REQUIRED)
    async with Harness(
        sim_config(tokens=5, rate=0),
        sim_tls=served,
        upstream_ca_file=str(pem.ca),
        upstream_client_cert=str(client.cert),
        upstream_client_key=str(client.key),
    ) as h:
        async with h.stream("session_mtls") as s:
            events = await s.rest()
        assert events[-1].event == "done"
        assert len(s.tokens) == 5
    # Without one, the provider refuses the handshake: a TLS failure, not "refused".
    async with Harness(
        sim_config(tokens=5, rate=0), sim_tls=served, upstream_ca_file=str(pem.ca)
    ) as h:
        data, line, record = await _failed(h, caplog, "session_mtls_no_cert")
        assert data["code"] == "upstream_misconfigured"
        assert "cause=tls_handshake" in line
        assert record["cause"] == "tls_handshake"
        metrics = (await h.client.get("/metrics")).text
        assert _metric(metrics, "gateway_upstream_errors_total", code="tls_handshake") == 1
        assert h.upstream_connections() == 0


async def test_stop_during_a_tls_stream_closes_it_before_the_200(
    pems: Pems, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sid = "session_tls_cancel"
    async with _trusting(pems, 100_000, 200) as h:
        async with h.stream(sid) as s:
            await s.tokens_at_least(5)
            record = await h.record()
            assert h.upstream_connections() == 1
            response = await h.cancel(sid)
            assert response.status_code == 200
            # The provider saw its TLS connection closed before the cancel's 200.
            assert record.outcome == "closed_by_client"
            assert record.sent < record.planned
            assert h.upstream_connections() == 0
            rest = await s.rest()
        assert rest[-1].event == "stopped"
        await h.assert_ended_cleanly(caplog, sid, "aborted by client/cancel reason=cancel")
        # The gateway goes on serving over TLS.
        async with h.stream("session_tls_after") as s:
            await s.tokens_at_least(1)


async def test_client_disconnect_closes_a_tls_provider(pems: Pems) -> None:
    async with _trusting(pems, 100_000, 200) as h:
        async with h.stream("session_tls_gone") as s:
            await s.tokens_at_least(3)
            record = await h.record()
        await h.closed(record)
        assert record.outcome == "closed_by_client"
        await h.ended("session_tls_gone")
        assert h.upstream_connections() == 0


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        yield sock.getsockname()[1]


async def test_causes_of_a_connection_that_never_reached_tls(
    caplog: pytest.LogCaptureFixture, closed_port: int
) -> None:
    caplog.set_level(logging.INFO)
    cases = [
        (f"https://{_HOST}:{closed_port}/v1", "connect_refused"),
        # .invalid never resolves (RFC 6761).
        ("https://provider.invalid/v1", "dns_failure"),
    ]
    for url, cause in cases:
        async with Harness(upstream_url=url, connect_timeout=5) as h:
            data, line, record = await _failed(h, caplog, f"session_{cause}")
            # The provider (or the network) is down: retrying later may work.
            assert data["code"] == "upstream_unavailable"
            assert f"cause={cause}" in line
            assert record["cause"] == cause
            metrics = (await h.client.get("/metrics")).text
            assert _metric(metrics, "gateway_upstream_errors_total", code=cause) == 1


async def test_a_handshake_that_never_ends_is_a_connect_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    # A listener that accepts (the kernel does) and never speaks TLS.
    with socket.socket() as listener:
        listener.bind((_HOST, 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        async with Harness(upstream_url=f"https://{_HOST}:{port}/v1", connect_timeout=0.3) as h:
            data, _, record = await _failed(h, caplog, "session_tls_silent")
            # As likely a provider stuck as one misconfigured: "unavailable", and the
            # operator's detail names the step.
            assert data["code"] == "upstream_unavailable"
            assert record["cause"] == "connect_timeout"
            assert record["cause_detail"] == "the TLS handshake did not finish in time"
    # A listener whose backlog is full: the TCP connect itself never completes.
    with socket.socket() as listener:
        listener.bind((_HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection((_HOST, port)):
            async with Harness(upstream_url=f"https://{_HOST}:{port}/v1", connect_timeout=0.3) as h:
                data, _, record = await _failed(h, caplog, "session_connect_slow")
                assert data["code"] == "upstream_unavailable"
                assert record["cause"] == "connect_timeout"
                assert "cause_detail" not in record


@asynccontextmanager
async def _providers(*served: dict[str, Any]) -> AsyncIterator[list[int]]:
    """A simulator per entry, each served with those TLS settings (none: plain HTTP);
    their ports."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        ports = []
        for tls in served:
            config = load_config(
                bind=[f"{_HOST}:0"], graceful_timeout=0.5, accesslog=None, errorlog=None, **tls
            )
            simulator = Simulator(sim_config(tokens=4, rate=0))
            [(_, port)] = await tg.start(serve_until, simulator, config, stop.wait)
            ports.append(port)
        try:
            yield ports
        finally:
            stop.set()


async def test_plain_http_behind_an_https_url_is_a_handshake_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        _providers({}) as [port],
        Harness(upstream_url=f"https://{_HOST}:{port}/v1") as h,
    ):
        data, _, record = await _failed(h, caplog, "session_tls_plain")
        assert data["code"] == "upstream_misconfigured"
        assert record["cause"] == "tls_handshake"


async def test_a_route_falls_back_past_a_provider_whose_certificate_fails(
    pems: Pems, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with _providers(_served(pems["expired"]), _served(pems["good"])) as ports:
        path = tmp_path / "gateway.toml"
        path.write_text(
            f"""
[providers.stale]
base_url = "https://{_HOST}:{ports[0]}/v1"
ca_file = "{pems["expired"].ca}"

[providers.fresh]
base_url = "https://{_HOST}:{ports[1]}/v1"
ca_file = "{pems["good"].ca}"

[models.chat]
targets = [{{ provider = "stale" }}, {{ provider = "fresh" }}]
"""
        )
        async with Harness(config=str(path)) as h:
            sid = "session_tls_fallback"
            async with h.stream(sid, model="chat") as s:
                events = await s.rest()
            assert events[-1].event == "done"
            assert len(s.tokens) == 4
            await h.ended(sid)
            [line] = end_lines(caplog.records, sid)
            [record] = [r for r in caplog.records if r.getMessage() == line]
            attempts = record.__dict__["gateway"]["attempts"]
            assert [(a["provider"], a["result"], a.get("cause")) for a in attempts] == [
                ("stale", "failed", "cert_expired"),
                ("fresh", "served", None),
            ]
            assert any(
                "stale failed before the first delta (upstream_misconfigured cause=cert_expired"
                in r.getMessage()
                for r in caplog.records
            )
            metrics = (await h.client.get("/metrics")).text
            failures = "gateway_provider_failures_total"
            assert _metric(metrics, failures, provider="stale", code="cert_expired") == 1
            assert _metric(metrics, failures, provider="fresh", code="cert_expired") == 0


async def test_verify_off_is_warned_about_at_start_and_trusts_any_certificate(
    pems: Pems, tmp_path: Path
) -> None:
    async with _providers(_served(pems["other_name"])) as [port]:
        path = tmp_path / "gateway.toml"
        path.write_text(
            f"""
[providers.lab]
base_url = "https://{_HOST}:{port}/v1"
verify = false

[models."*"]
targets = [{{ provider = "lab" }}]
"""
        )
        with LogWatch("TLS verification is off") as watch:
            async with Harness(config=str(path)) as h:
                [warning] = await watch.wait()
                assert warning.levelno == logging.WARNING
                assert "provider lab:" in warning.getMessage()
                async with h.stream("session_tls_unverified") as s:
                    events = await s.rest()
                assert events[-1].event == "done"


# A bad TLS setting stops the start, naming the file and the provider.


def _config(tmp_path: Path, keys: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[providers.private]
base_url = "https://llm.internal/v1"
{keys}

[models."*"]
targets = [{{ provider = "private" }}]
"""
    )
    return str(path)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ('ca_file = "{missing}"', "ca_file {missing}: no such file"),
        ('ca_file = "{junk}"', "ca_file {junk} cannot be used: not a PEM bundle of certificates"),
        (
            'client_cert = "{client}"\nclient_key = "{other_key}"',
            "client_key {other_key} is not its key",
        ),
        ('client_cert = "{client}"', "client_cert and client_key come together"),
        ("verify = 0", "verify must be true or false"),
    ],
)
def test_a_bad_tls_setting_stops_the_start(
    tmp_path: Path, pems: Pems, keys: str, expected: str
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    names = {
        "missing": str(tmp_path / "missing.pem"),
        "junk": str(junk),
        "client": str(pems["client"].cert),
        "other_key": str(pems["good"].key),
    }
    path = _config(tmp_path, keys.format(**names))
    with pytest.raises(ConfigError) as caught:
        read_config(path)
    message = str(caught.value)
    assert message.startswith(f'GATEWAY_CONFIG: {path}: [providers."private"] ')
    assert expected.format(**names) in message


def test_tls_settings_need_an_https_provider(tmp_path: Path, pems: Pems) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[providers.plain]
base_url = "http://llm.internal/v1"
ca_file = "{pems["good"].ca}"

[models."*"]
targets = [{{ provider = "plain" }}]
"""
    )
    with pytest.raises(ConfigError, match=r'\[providers."plain"\] ca_file is for an https'):
        read_config(str(path))


def test_the_single_provider_variables(tmp_path: Path, pems: Pems) -> None:
    env = {
        "GATEWAY_UPSTREAM_URL": "https://llm.internal/v1",
        "GATEWAY_MODEL": "m",
        "GATEWAY_UPSTREAM_CA_FILE": str(pems["good"].ca),
    }
    provider = Settings.from_env(env).providers_and_routes()[0][0]
    assert provider.ca_file == str(pems["good"].ca)
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=f"GATEWAY_UPSTREAM_CA_FILE {missing}: no such file"):
        Settings.from_env({**env, "GATEWAY_UPSTREAM_CA_FILE": missing})
    with pytest.raises(ConfigError, match="GATEWAY_UPSTREAM_CLIENT_KEY come together"):
        Settings.from_env({**env, "GATEWAY_UPSTREAM_CLIENT_CERT": str(pems["client"].cert)})
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env(
            {
                "GATEWAY_CONFIG": _config(tmp_path, ""),
                "GATEWAY_UPSTREAM_CA_FILE": str(pems["good"].ca),
            }
        )


async def test_gateway_serve_stops_at_start_on_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN NOTHING-----\n")
    path = _config(tmp_path, f'ca_file = "{junk}"')
    env = {**os.environ, "GATEWAY_CONFIG": path}
    result = await anyio.run_process(
        [sys.executable, "-m", "gateway", "serve", "-b", f"{_HOST}:0"],
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    stderr = result.stderr.decode()
    assert f'[providers."private"] ca_file {junk} cannot be used' in stderr

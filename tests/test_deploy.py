"""The deployment of docs/deploy/, run as written: nginx (TLS, HTTP/2 towards clients)
in front of two replicas of two hypercorn workers each, sharing a redis-server. The
contract kit passes through it, and Chromium holds 8 answers on one HTTP/2 connection,
stops one and reloads. The same browser check against hypercorn serving TLS and HTTP/2
itself (hypercorn.toml's certfile/keyfile example)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme
from playwright.sync_api import sync_playwright

from gateway import Settings, create_app
from gateway.server.serve import load_config
from gateway.tools.contract.checks import routes_config
from gateway.tools.contract.kit import ContractOptions
from gateway.tools.contract.report import report
from gateway.tools.contract.run import run_contract
from gateway.tools.simulator import Simulator, SimulatorConfig
from support.processes import ROOT, free_port

from .harness import Certificates, issue_certificate, serve_until, worker_class
from .processes import WAIT, Nginx, RedisServer, hypercorn_workers, until_up

pytestmark = [
    pytest.mark.slow,
    pytest.mark.anyio,
    pytest.mark.skipif(
        Nginx.missing() or shutil.which("redis-server") is None,
        reason="Debian's nginx and redis-server are not installed (make test does)",
    ),
]

CHROMIUM = "/usr/bin/chromium"
KEY_A, KEY_B = "deploy-key-alice-01234", "deploy-key-bob-0123456"
IDLE = 1.0


def _certificates(directory: Path) -> Certificates:
    return issue_certificate(directory, "site", trustme.CA(), "127.0.0.1", "localhost")


def _site(replicas: list[int], certs: Certificates) -> str:
    """docs/deploy/nginx.conf with this test's addresses and certificate: nothing else
    changed."""
    text = (ROOT / "docs" / "deploy" / "nginx.conf").read_text()
    for old, new in (
        ("server 127.0.0.1:8001;", f"server 127.0.0.1:{replicas[0]};"),
        ("server 127.0.0.1:8002;", f"server 127.0.0.1:{replicas[1]};"),
        ("listen 127.0.0.1:8443 ", "listen 127.0.0.1:{port} "),
        ("/etc/ssl/stop-gateway/cert.pem", str(certs.cert)),
        ("/etc/ssl/stop-gateway/key.pem", str(certs.key)),
    ):
        assert old in text, old
        text = text.replace(old, new)
    return text


@dataclass
class _Deployment:
    url: str
    replicas: list[str]
    provider_port: int
    certs: Certificates
    nginx: Nginx


@asynccontextmanager
async def _deployment(tmp_path: Path, workers: tuple[str, str]) -> AsyncIterator[_Deployment]:
    """Two replicas (``workers``: each one's worker class) behind nginx; their provider
    is whatever serves on ``provider_port`` (the kit's, or the test's simulator)."""
    certs = _certificates(tmp_path)
    redis = RedisServer()
    await anyio.to_thread.run_sync(redis.start)
    provider_port = free_port()
    # The contract kit's routes (docs/deploy/README.md), and every other model to the
    # same provider as the client names it.
    config = tmp_path / "gateway.toml"
    routes = routes_config(f"http://127.0.0.1:{provider_port}/v1")
    config.write_text(routes + '[models."*"]\ntargets = [{ provider = "contract" }]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_MODEL": "deploy-model",
        "GATEWAY_REDIS_URL": redis.url,
        "GATEWAY_API_KEYS": f"alice:{KEY_A},bob:{KEY_B}",
        "GATEWAY_IDLE_TIMEOUT": str(IDLE),
    }
    ports = [free_port(), free_port()]
    try:
        async with AsyncExitStack() as stack:
            for worker, port in zip(workers, ports, strict=True):
                await stack.enter_async_context(
                    hypercorn_workers(
                        worker, port, env, config=ROOT / "docs" / "deploy" / "hypercorn.toml"
                    )
                )
            replicas = [f"http://127.0.0.1:{port}" for port in ports]
            for url in replicas:
                await until_up(url)
            nginx = await stack.enter_async_context(
                Nginx(tmp_path, _site(ports, certs), scheme="https")
            )
            yield _Deployment(nginx.url, replicas, provider_port, certs, nginx)
    finally:
        await anyio.to_thread.run_sync(redis.stop)


# The replicas are under test, on asyncio and Trio (both in each deployment); the test's
# own loop only drives them.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_contract_passes_through_nginx_tls_and_two_replicas(tmp_path: Path) -> None:
    # One replica on asyncio, the other on Trio: a cancel forwarded between them too.
    async with _deployment(tmp_path, ("asyncio", "trio")) as d:
        results = await run_contract(
            ContractOptions(
                gateway=d.url,
                provider_port=d.provider_port,
                api_key=KEY_A,
                second_key=KEY_B,
                peer=d.replicas[1],
                idle_timeout=IDLE,
                cacert=str(d.certs.ca),
                routes=True,
            )
        )
        errors = d.nginx.errors()
    assert [r for r in results if r.status != "pass"] == [], report(results)
    assert "[emerg]" not in errors


# -- Chromium: 8 answers on one HTTP/2 connection ------------------------------------

_START = """async ({n, key}) => {
    const { startChat } = await import('/static/client.js');
    window.counts = Array(n).fill(0);
    window.chats = [];
    const nonces = [];
    for (let i = 0; i < n; i++) {
        const nonce = 'tab' + i + '-' + crypto.randomUUID();
        nonces.push(nonce);
        window.chats.push(startChat({
            messages: [{role: 'user', content: 'Answer ' + nonce}],
            headers: key ? {Authorization: 'Bearer ' + key} : {},
            onToken: () => { window.counts[i] += 1; },
        }));
    }
    return nonces;
}"""


def _find(simulator: Simulator, nonce: str) -> Any:
    return next((r for r in simulator.records if nonce in r.prompt), None)


async def _provider_closed(simulator: Simulator, nonces: list[str]) -> None:
    def closed() -> bool:
        records = [_find(simulator, n) for n in nonces]
        return all(r is not None and r.outcome != "streaming" for r in records)

    with anyio.fail_after(WAIT):
        await simulator.wait_until(closed)


def _eight_answers(url: str, key: str | None, simulator: Simulator) -> str:
    """In a worker thread (Playwright's sync API runs its own loop): 8 answers on one
    page, one stopped, then a reload. Returns the page's protocol."""
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.goto(url)
            protocol: str = page.evaluate(
                "performance.getEntriesByType('navigation')[0].nextHopProtocol"
            )
            nonces: list[str] = page.evaluate(_START, {"n": 8, "key": key})
            # Over HTTP/1.1 at most 6 could stream at once; all 8 do.
            page.wait_for_function("window.counts.every(n => n >= 3)", timeout=WAIT * 1000)
            page.evaluate("window.chats[0].stop()")
            anyio.from_thread.run(_provider_closed, simulator, nonces[:1])
            before = page.evaluate("window.counts")
            # The other 7 go on, on the same connection.
            page.wait_for_function(
                "before => window.counts.slice(1).every((n, i) => n >= before[i + 1] + 3)",
                arg=before,
                timeout=WAIT * 1000,
            )
            assert all(_find(simulator, n).outcome == "streaming" for n in nonces[1:])
            # A reload resets every stream of the page: each provider is closed.
            page.reload()
            anyio.from_thread.run(_provider_closed, simulator, nonces[1:])
        finally:
            browser.close()
    return protocol


async def _serve_simulator(
    simulator: Simulator, port: int, stop: anyio.Event, tg: anyio.abc.TaskGroup
) -> None:
    config = load_config(bind=[f"127.0.0.1:{port}"], graceful_timeout=1.0, accesslog=None)
    await tg.start(serve_until, simulator, config, stop.wait)


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_chromium_streams_eight_answers_over_http2_through_nginx(tmp_path: Path) -> None:
    simulator = Simulator(SimulatorConfig(tokens=100_000, rate=20))
    stop = anyio.Event()
    async with _deployment(tmp_path, ("uvloop", "trio")) as d, anyio.create_task_group() as tg:
        await _serve_simulator(simulator, d.provider_port, stop, tg)
        try:
            protocol = await anyio.to_thread.run_sync(_eight_answers, d.url, KEY_A, simulator)
        finally:
            stop.set()
        streams = [line for line in d.nginx.access_log() if "POST /api/chat/stream " in line]
    assert protocol == "h2"
    assert len(streams) == 8
    assert all("HTTP/2.0" in line for line in streams)


def _tls_config(certs: Certificates) -> Path:
    """hypercorn.toml with its certfile/keyfile example switched on."""
    text = (ROOT / "hypercorn.toml").read_text()
    for old, new in (
        ('# certfile = "/etc/ssl/stop-gateway/cert.pem"', f'certfile = "{certs.cert}"'),
        ('# keyfile = "/etc/ssl/stop-gateway/key.pem"', f'keyfile = "{certs.key}"'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path = certs.cert.parent / "hypercorn-tls.toml"
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed")
async def test_chromium_streams_eight_answers_over_http2_from_hypercorn(
    anyio_backend: Any, tmp_path: Path
) -> None:
    certs = _certificates(tmp_path)
    simulator = Simulator(SimulatorConfig(tokens=100_000, rate=20))
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        provider_port = free_port()
        await _serve_simulator(simulator, provider_port, stop, tg)
        settings = Settings(upstream_url=f"http://127.0.0.1:{provider_port}/v1", model="m")
        config = load_config(
            _tls_config(certs),
            bind=["127.0.0.1:0"],
            worker_class=worker_class(anyio_backend),
            accesslog=None,
            graceful_timeout=1.0,
        )
        [(_, port)] = await tg.start(serve_until, create_app(settings), config, stop.wait)
        try:
            protocol = await anyio.to_thread.run_sync(
                _eight_answers, f"https://127.0.0.1:{port}", None, simulator
            )
        finally:
            stop.set()
    assert protocol == "h2"

"""``gateway contract``: it passes our gateway, and it fails deliberately broken ones,
each for the right check."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import anyio
import anyio.lowlevel
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.server.serve import load_config
from gateway.tools.contract.checks import CHECKS, routes_config
from gateway.tools.contract.kit import CheckResult, ContractOptions
from gateway.tools.contract.report import junit_xml, report
from gateway.tools.contract.run import run_contract
from support.processes import ROOT, free_port

from .harness import ASYNCIO_AND_TRIO, Harness, answer_lifespan, serve_until, traced_peak
from .processes import Nginx

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO]

KEY_A, KEY_B = "contract-key-alice-0123", "contract-key-bob-456789"
API_KEYS = (("alice", KEY_A), ("bob", KEY_B))
# The kit's own waits, short: a broken gateway fails fast.
PATIENCE = 3.0


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def _gateway(provider_port: int, wrap: Any = None, **settings: Any) -> Harness:
    return Harness(
        upstream_url=f"http://127.0.0.1:{provider_port}/v1",
        wrap=wrap,
        api_keys=API_KEYS,
        idle_timeout=1.0,
        **settings,
    )


async def test_our_gateway_passes_every_check(tmp_path: Path) -> None:
    # Routed: the kit's routes (docs/routing.md) beside a catch-all to the kit's provider.
    provider_port = free_port()
    config = tmp_path / "gateway.toml"
    url = f"http://127.0.0.1:{provider_port}/v1"
    catch_all = '[models."*"]\ntargets = [{ provider = "contract" }]\n'
    config.write_text(routes_config(url) + catch_all)
    async with Harness(
        config=str(config), api_keys=API_KEYS, idle_timeout=1.0, model="sim-model"
    ) as h:
        results = await run_contract(
            ContractOptions(
                gateway=f"http://127.0.0.1:{h.port}",
                provider_port=provider_port,
                api_key=KEY_A,
                second_key=KEY_B,
                samples=5,
                idle_timeout=1.0,
                routes=True,
            )
        )
    by_name = _by_name(results)
    assert set(by_name) == set(CHECKS)
    failed = [r for r in results if r.status == "fail"]
    assert not failed, report(results)
    # Only the check that needs another replica was skipped.
    assert [r.name for r in results if r.status == "skip"] == ["peer_cancel_closes_provider"]
    assert "5 of 5 closed before the 200" in by_name["cancel_closes_provider"].detail
    assert "p99" in by_name["disconnect_closes_provider"].detail
    assert "before its 200" in by_name["stop_closes_every_attempt"].detail
    assert "1 of 1 closed before the 200" in by_name["messages_cancel_closes_provider"].detail


def _cancel_answered_first(app: ASGIApp) -> ASGIApp:
    """Broken: answers a cancel at once and only then stops the stream (the common
    "fire and forget" bug)."""

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/chat/cancel/"):
            await app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"ok":true,"cancelled":true}'})

        async def discard(message: Message) -> None:
            pass

        # The bug's own delay, as a background job would have it.
        await anyio.sleep(0.3)
        await app(scope, receive, discard)

    return broken


def _deaf_to_disconnects(app: ASGIApp) -> ASGIApp:
    """Broken: never tells the app its client left, and drops what it sends after."""

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/api/chat/stream":
            await app(scope, receive, send)
            return

        async def deaf() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                await anyio.sleep_forever()
            return message

        async def blind(message: Message) -> None:
            with contextlib.suppress(Exception):
                await send(message)

        await app(scope, deaf, blind)

    return broken


def _messages_without_their_stop(app: ASGIApp) -> ASGIApp:
    """Broken: /v1/messages answers lose their ``message_stop`` (an answer the
    Anthropic SDKs never see end)."""

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/messages":
            await app(scope, receive, send)
            return

        async def cut(message: Message) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                kept = body.replace(b'event: message_stop\ndata: {"type":"message_stop"}\n\n', b"")
                message = {**message, "body": kept}
            await send(message)

        await app(scope, receive, cut)

    return broken


@pytest.mark.parametrize(
    ("wrap", "fails", "passes"),
    [
        (_cancel_answered_first, "cancel_closes_provider", "disconnect_closes_provider"),
        (_deaf_to_disconnects, "disconnect_closes_provider", "cancel_closes_provider"),
        (
            _messages_without_their_stop,
            "messages_one_terminal_event",
            "messages_disconnect_closes_provider",
        ),
    ],
)
async def test_a_broken_gateway_fails_the_right_check(wrap: Any, fails: str, passes: str) -> None:
    provider_port = free_port()
    async with _gateway(provider_port, wrap=wrap) as h:
        results = await run_contract(
            ContractOptions(
                gateway=f"http://127.0.0.1:{h.port}",
                provider_port=provider_port,
                api_key=KEY_A,
                samples=3,
                only=(fails, passes),
                patience=PATIENCE,
            )
        )
    by_name = _by_name(results)
    assert by_name[fails].status == "fail", report(results)
    assert by_name[passes].status == "pass", report(results)
    if fails == "cancel_closes_provider":
        assert "the 200 came before the provider was closed" in by_name[fails].detail


@pytest.mark.skipif(Nginx.missing(), reason="Debian's nginx is not installed (make test does)")
@pytest.mark.slow
async def test_a_buffering_proxy_fails_unbuffered(tmp_path: Path) -> None:
    """nginx compressing the event stream with buffering on (and told to ignore the
    gateway's X-Accel-Buffering): a common way to hold events back."""
    provider_port = free_port()
    async with _gateway(provider_port) as h:
        site = f"""
server {{
    listen 127.0.0.1:{{port}};
    location / {{
        proxy_pass http://127.0.0.1:{h.port};
        proxy_http_version 1.1;
        proxy_buffering on;
        proxy_ignore_headers X-Accel-Buffering;
        gzip on;
        gzip_types text/event-stream;
        gzip_min_length 1;
    }}
}}
"""
        async with Nginx(tmp_path, site) as nginx:
            results = await run_contract(
                ContractOptions(
                    gateway=nginx.url,
                    provider_port=provider_port,
                    api_key=KEY_A,
                    samples=3,
                    only=("unbuffered", "cancel_waiting_for_headers"),
                    patience=PATIENCE,
                )
            )
    by_name = _by_name(results)
    assert by_name["unbuffered"].status == "fail", report(results)
    assert "buffered" in by_name["unbuffered"].detail
    # Cancels still work; the token events are what is held back.
    assert by_name["cancel_waiting_for_headers"].status == "pass", report(results)


async def test_the_command_prints_a_table_writes_junit_and_exits_by_the_result(
    tmp_path: Path,
) -> None:
    provider_port = free_port()
    junit = tmp_path / "contract.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    for wrap, expected in ((None, 0), (_cancel_answered_first, 1)):
        async with _gateway(provider_port, wrap=wrap) as h:
            done = await anyio.run_process(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "contract",
                    "--gateway",
                    f"http://127.0.0.1:{h.port}",
                    "--provider-port",
                    str(provider_port),
                    "--api-key",
                    KEY_A,
                    "--samples",
                    "3",
                    "--check",
                    "cancel_closes_provider",
                    "--check",
                    "cancel_twice_and_unknown_404",
                    "--junit",
                    str(junit),
                ],
                cwd=ROOT,
                env=env,
                check=False,
            )
        out = done.stdout.decode()
        assert done.returncode == expected, out + done.stderr.decode()
        assert "cancel_closes_provider" in out
        suite = ElementTree.parse(junit).getroot()
        failed = {c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None}
        assert suite.get("tests") == "2"
        if expected == 0:
            assert failed == set()
        else:
            # The planted bug answers every cancel 200, unknown ids too.
            assert failed == {"cancel_closes_provider", "cancel_twice_and_unknown_404"}
    assert "FAIL" in out


def test_junit_xml_names_each_check() -> None:
    results = [
        CheckResult("a", "pass", "fine", 0.5),
        CheckResult("b", "fail", "broken <here>", 1.0),
        CheckResult("c", "skip", "needs --peer"),
    ]
    suite = ElementTree.fromstring(junit_xml(results))
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert list(cases) == ["a", "b", "c"]
    failure = cases["b"].find("failure")
    assert failure is not None
    assert failure.get("message") == "broken <here>"
    assert cases["c"].find("skipped") is not None
    assert suite.get("failures") == "1"
    assert suite.get("skipped") == "1"


class _Endless:
    """A deployment that answers every request with a 200 body without end: token
    events, or (``blank_lines=False``) bytes with no event boundary. It writes until
    the reader goes, or 256 MiB."""

    def __init__(self, blank_lines: bool) -> None:
        event = b'event: token\ndata: {"delta":"x"}\n\n'
        self.chunk = event * 2000 if blank_lines else b"x" * 64 * 1024
        self.written = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        gone = anyio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            # Until the reader goes: on asyncio hypercorn's send() does not fail after
            # it has, on Trio it raises.
            with contextlib.suppress(Exception):  # trio.ClosedResourceError, or anyio's
                while not gone.is_set() and self.written < 256 * 1024 * 1024:
                    body = {"type": "http.response.body", "body": self.chunk, "more_body": True}
                    await send(body)
                    self.written += len(self.chunk)
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("blank_lines", [True, False])
async def test_a_deployment_that_streams_without_end_fails_the_kit_within_its_bounds(
    blank_lines: bool,
) -> None:
    # Before: the kit kept every byte (3.1 GiB in 47 s against such a server).
    deployment = _Endless(blank_lines)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        config = load_config(bind=["127.0.0.1:0"], graceful_timeout=1.0, accesslog=None)
        [(_, port)] = await tg.start(serve_until, deployment, config, stop.wait)
        try:
            with traced_peak() as traced, anyio.fail_after(60):
                results = await run_contract(
                    ContractOptions(
                        gateway=f"http://127.0.0.1:{port}",
                        provider_port=free_port(),
                        patience=1.0,
                        only=("cancel_closes_provider", "one_terminal_event"),
                    )
                )
        finally:
            stop.set()
    peak = traced.bytes
    assert [r.status for r in results] == ["fail", "fail"], report(results)
    # What the process held at most meanwhile (the kit, and the deployment's side):
    # measured 9.3 and 1.8 MiB, where the kit before this held 38.5 and 18.7 MiB after
    # these 2 s, and kept growing for as long as a check waited.
    assert peak < (24 if blank_lines else 8) * 1024 * 1024, peak
    if not blank_lines:
        # The kit stopped reading at its bound on one event and closed the stream.
        assert deployment.written < 32 * 1024 * 1024, deployment.written

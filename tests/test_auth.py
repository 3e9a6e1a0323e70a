"""Principals and ownership: bearer keys, a trusted proxy's header, and who may cancel what."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2 as httpx
import pytest

from .harness import ASYNCIO_AND_TRIO, WAIT, Harness, sim_config, worker_class
from .processes import Gateway

pytestmark = [pytest.mark.anyio, ASYNCIO_AND_TRIO]

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"
KEYS = (("alice", ALICE), ("bob", BOB))
MESSAGES = {"messages": [{"role": "user", "content": "hi"}]}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope-nope-nope-nope"}, {"Authorization": f"Basic {ALICE}"}],
)
async def test_a_missing_or_wrong_key_is_401(headers: dict[str, str]) -> None:
    async with Harness(api_keys=KEYS) as h:
        for path in ("/api/chat/stream", "/api/chat/cancel/session_1_abcdefgh"):
            response = await h.client.post(
                path, headers={"X-Session-Id": "session_1_abcdefgh", **headers}, json=MESSAGES
            )
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert len(h.simulator.records) == 0
        # The page and the health check need no key.
        assert (await h.client.get("/healthz")).status_code == 200
        assert (await h.client.get("/")).status_code == 200


async def test_another_principal_cannot_cancel_and_sees_a_404(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = "session_1700000000000_shared"
    async with Harness(sim_config(tokens=10_000, rate=200), api_keys=KEYS) as h:
        async with h.stream(sid, headers=_bearer(ALICE)) as s:
            await s.tokens_at_least(2)
            response = await h.cancel(sid, headers=_bearer(BOB))
            assert response.status_code == 404
            assert response.json() == {"ok": False, "reason": "not_found"}
            # Untouched: it goes on streaming.
            before = len(s.tokens)
            await s.tokens_at_least(before + 5)
            assert h.simulator.records[-1].outcome == "streaming"
            response = await h.cancel(sid, headers=_bearer(ALICE))
            assert response.status_code == 200
            events = await s.rest()
        assert events[-1].event == "stopped"
        assert events[-1].data["reason"] == "cancel"
        assert f"[SSE] {sid} started model=sim-model principal=alice" in caplog.text
        # Keys are never logged.
        assert ALICE not in caplog.text
        assert BOB not in caplog.text


async def test_two_principals_may_use_the_same_session_id() -> None:
    sid = "session_1700000000000_twice"
    async with (
        Harness(sim_config(tokens=10_000, rate=200), api_keys=KEYS) as h,
        h.stream(sid, headers=_bearer(ALICE)) as a,
        h.stream(sid, headers=_bearer(BOB)) as b,
    ):
        await a.tokens_at_least(1)
        await b.tokens_at_least(1)
        assert len(h.registry) == 2
        assert (await h.cancel(sid, headers=_bearer(BOB))).status_code == 200
        assert (await b.rest())[-1].data["reason"] == "cancel"
        await a.tokens_at_least(len(a.tokens) + 3)
        assert (await h.cancel(sid, headers=_bearer(ALICE))).status_code == 200
        assert (await a.rest())[-1].data["reason"] == "cancel"


async def test_a_trusted_proxy_names_the_principal(caplog: pytest.LogCaptureFixture) -> None:
    sid = "session_1700000000000_proxy"
    async with Harness(
        sim_config(tokens=10_000, rate=200),
        principal_header="x-user",
        trusted_proxies=("127.0.0.0/8",),
    ) as h:
        missing = await h.client.post(
            "/api/chat/stream", headers={"X-Session-Id": sid}, json=MESSAGES
        )
        assert missing.status_code == 401
        async with h.stream(sid, headers={"X-User": "carol"}) as s:
            await s.tokens_at_least(1)
            assert (await h.cancel(sid, headers={"X-User": "dave"})).status_code == 404
            assert (await h.cancel(sid, headers={"X-User": "carol"})).status_code == 200
            await s.rest()
        assert f"[SSE] {sid} started model=sim-model principal=carol" in caplog.text


async def test_the_header_is_ignored_from_an_untrusted_peer() -> None:
    # The test client connects from 127.0.0.1, which is not in the trusted network.
    async with Harness(principal_header="x-user", trusted_proxies=("10.0.0.0/8",)) as h:
        response = await h.client.post(
            "/api/chat/stream",
            headers={"X-Session-Id": "session_1_abcdefgh", "X-User": "mallory"},
            json=MESSAGES,
        )
        assert response.status_code == 401
        assert "proxy" in response.json()["error"]["message"]
        assert len(h.simulator.records) == 0


async def test_the_provider_key_reaches_the_provider_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk-provider-secret-0123456789"
    async with Harness(sim_config(tokens=3, rate=0), upstream_api_key=secret) as h:
        async with h.stream("session_1700000000000_key") as s:
            events = await s.rest()
        assert events[-1].event == "done"
        assert list(h.simulator.authorizations) == [f"Bearer {secret}"]
        assert all(secret not in str(e.data) for e in s.events)
        assert secret not in "".join(f"{k}{v}" for k, v in s.response.headers.items())
        assert secret not in caplog.text


async def test_every_route_refuses_wrong_keys_without_disturbing_a_stream() -> None:
    sid = "session_1700000000000_calm"
    async with (
        Harness(sim_config(tokens=10_000, rate=200), api_keys=KEYS) as h,
        h.stream(sid, headers=_bearer(ALICE)) as s,
    ):
        await s.tokens_at_least(1)
        with anyio.fail_after(5):
            for _ in range(20):
                r = await h.client.post(f"/api/chat/cancel/{sid}", headers=_bearer("x" * 20))
                assert r.status_code == 401
        await s.tokens_at_least(len(s.tokens) + 2)
        assert (await h.cancel(sid, headers=_bearer(ALICE))).status_code == 200
        await s.rest()


@pytest.mark.slow
async def test_keys_never_reach_the_logs_or_the_access_log(anyio_backend: Any) -> None:
    gateway = await anyio.to_thread.run_sync(
        lambda: Gateway(
            worker_class(anyio_backend),
            GATEWAY_API_KEYS=f"alice:{ALICE}",
            GATEWAY_UPSTREAM_API_KEY="sk-provider-secret-0123456789",
        )
    )
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=WAIT) as client:
            for key in (ALICE, "wrong-key-0123456789abcdef"):
                response = await client.post(
                    "/api/chat/cancel/session_1_abcdefgh", headers=_bearer(key)
                )
                assert response.status_code in (401, 404)
        # The shipped hypercorn.toml writes an access line per request: it is on.
        await anyio.to_thread.run_sync(gateway.wait_for, r"POST /api/chat/cancel/\S+ 1\.1\" 401")
    finally:
        await anyio.to_thread.run_sync(gateway.stop)
    text = "\n".join(gateway.lines)
    for secret in (ALICE, "wrong-key-0123456789abcdef", "sk-provider-secret-0123456789"):
        assert secret not in text


@pytest.mark.parametrize(
    ("settings", "header", "values"),
    [
        (
            {"principal_header": "x-user", "trusted_proxies": ("127.0.0.0/8",)},
            b"x-user",
            (b"carol", b"mallory"),
        ),
        ({"api_keys": KEYS}, b"authorization", (b"Bearer " + ALICE.encode(), b"Bearer nope")),
    ],
)
async def test_a_principal_header_sent_twice_is_400(
    settings: dict[str, Any], header: bytes, values: tuple[bytes, bytes]
) -> None:
    # Which copy counts differs between proxies and servers: before, the first won,
    # so a proxy that appended its own could be overridden by the client's.
    async with Harness(**settings) as h:
        headers = [(b"x-session-id", b"session_1_twice000"), *((header, v) for v in values)]
        for path in ("/api/chat/stream", "/api/chat/cancel/session_1_twice000"):
            response = await h.client.post(path, headers=headers, json=MESSAGES)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "ambiguous_header"
            assert header.decode() in response.json()["error"]["message"].lower()
        assert len(h.simulator.records) == 0

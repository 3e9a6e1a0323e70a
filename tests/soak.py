"""Soak: many streams with random fates through one `gateway serve` process, then the
books must balance.

``python -m tests.soak --streams 10000 [-k asyncio uvloop trio]`` (``make soak``);
tests/test_soak.py runs a short version in ``make test``.

Fates: complete; cancel at a random moment; client disconnect; idle timeout while the
provider sends only keep-alives; provider error; cancel racing completion; double
cancel; a duplicate session id while the first is live. Afterwards it checks: the
registry is empty, no provider stream is open and every provider connection left is
an idle pooled one, open file descriptors are back to the baseline (plus those idle
connections), each session wrote exactly one end line with the reason its fate
implies, RSS did not grow past a bound, and no traceback was logged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2 as httpx
from starlette.types import Message, Receive, Scope, Send

from gateway.server.serve import load_config
from gateway.tools.simulator import Simulator, SimulatorConfig

from .harness import established_to, serve_until
from .processes import Gateway

FATES = (
    "complete",
    "cancel",
    "disconnect",
    "idle_timeout",
    "provider_error",
    "cancel_race",
    "double_cancel",
    "duplicate_id",
)
# The provider behaviour each fate asks for, by the marker in the user message.
_PROVIDERS = {
    "short": SimulatorConfig(tokens=5, rate=500.0),
    "long": SimulatorConfig(tokens=100_000, rate=100.0),
    "stall": SimulatorConfig(tokens=100_000, rate=200.0, stall_after=2, keepalive_interval=0.05),
    "error": SimulatorConfig(status=500),
    "race": SimulatorConfig(tokens=5, rate=200.0),
}
_PROVIDER_OF = {
    "complete": "short",
    "cancel": "long",
    "disconnect": "long",
    "idle_timeout": "stall",
    "provider_error": "error",
    "cancel_race": "race",
    "double_cancel": "long",
    "duplicate_id": "long",
}
# The end line each fate may write (cancel_race: whichever came first).
_EXPECTED = {
    "complete": ("completed",),
    "cancel": ("reason=cancel",),
    "disconnect": ("reason=disconnect",),
    "idle_timeout": ("timed out reason=idle",),
    "provider_error": ("failed code=upstream_error",),
    "cancel_race": ("completed", "reason=cancel"),
    "double_cancel": ("reason=cancel",),
    "duplicate_id": ("reason=cancel",),
}
_END = re.compile(r"\[SSE\] (\S+) (completed|aborted by client/cancel|timed out|stopped|failed)")
RSS_GROWTH_LIMIT_KIB = 30 * 1024
# Provider connections still holding a descriptor: idle in the pool (ESTABLISHED), or
# idle and closed by the provider, to be closed at the pool's next use (CLOSE_WAIT).
_OPEN = ("01", "08")


class FatefulProvider:
    """One simulator per behaviour; a request goes to the one its message names."""

    def __init__(self) -> None:
        self.simulators = {name: Simulator(config) for name, config in _PROVIDERS.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.simulators["short"](scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        match = re.search(rb"soak:(\w+)", body)
        simulator = self.simulators[match.group(1).decode() if match else "short"]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await simulator(scope, replay, send)

    @property
    def live(self) -> int:
        return sum(s.live for s in self.simulators.values())


@dataclass
class Tally:
    fates: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    sessions: dict[str, str] = field(default_factory=dict)


async def _one(
    client: httpx.AsyncClient, fate: str, sid: str, rng: random.Random, t: Tally
) -> None:
    body = {"messages": [{"role": "user", "content": f"soak:{_PROVIDER_OF[fate]}"}]}
    headers = {"X-Session-Id": sid}
    t.sessions[sid] = fate
    t.fates[fate] += 1

    async def cancel() -> int:
        return (await client.post(f"/api/chat/cancel/{sid}")).status_code

    async with client.stream("POST", "/api/chat/stream", headers=headers, json=body) as response:
        if response.status_code != 200:
            t.problems.append(f"{sid} {fate}: HTTP {response.status_code}")
            return
        lines = response.aiter_lines()
        if fate in ("cancel", "double_cancel", "duplicate_id", "disconnect"):
            await anext(lines)  # the start event's first line: the stream is live
            await anyio.sleep(rng.uniform(0, 0.05))
            if fate == "disconnect":
                return  # closing the response closes the connection
            if fate == "duplicate_id":
                dup = await client.post("/api/chat/stream", headers=headers, json=body)
                t.statuses[f"duplicate {dup.status_code}"] += 1
                if dup.status_code != 409:
                    t.problems.append(f"{sid}: duplicate id answered {dup.status_code}")
            if fate == "double_cancel":
                codes: list[int] = []
                async with anyio.create_task_group() as tg:
                    for _ in range(2):
                        tg.start_soon(lambda: _append(codes, cancel()))
                t.statuses[f"double cancel {sorted(codes)}"] += 1
                if sorted(codes) != [200, 404]:
                    t.problems.append(f"{sid}: double cancel answered {codes}")
            else:
                code = await cancel()
                if code != 200:
                    t.problems.append(f"{sid}: cancel answered {code}")
        elif fate == "cancel_race":
            await anyio.sleep(rng.uniform(0.0, 0.04))
            t.statuses[f"race cancel {await cancel()}"] += 1
        text = "".join([line + "\n" async for line in lines])
        terminal = re.findall(r"^event: (done|stopped|error)$", text, re.M)
        if len(terminal) != 1:
            t.problems.append(f"{sid} {fate}: terminal events {terminal}")


async def _append(codes: list[int], call: Any) -> None:
    codes.append(await call)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def soak(worker: str, streams: int, concurrency: int, seed: int) -> dict[str, Any]:
    """Run ``streams`` fates against a fresh gateway on ``worker``; return the books."""
    rng = random.Random(seed)
    provider = FatefulProvider()
    stop = anyio.Event()
    tally = Tally()
    async with anyio.create_task_group() as tg:
        config = load_config(bind=["127.0.0.1:0"], graceful_timeout=1.0, accesslog=None)
        [(_, port)] = await tg.start(serve_until, provider, config, stop.wait)
        gateway = await anyio.to_thread.run_sync(
            lambda: Gateway(
                worker,
                GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{port}/v1",
                GATEWAY_MODEL="soak",
                # Short for the stall fate, yet well above the gap between two tokens
                # of the long provider on a loaded machine (0.3 s once timed out a
                # stream the test was about to cancel).
                GATEWAY_IDLE_TIMEOUT="1.0",
                GATEWAY_MAX_SESSIONS="100000",
            )
        )
        pid = gateway.process.pid
        try:
            limits = httpx.Limits(max_connections=concurrency * 3)
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30, limits=limits) as client:
                # Warm up, then take the baselines.
                for i in range(20):
                    await _one(client, "complete", f"soak_warm_{i:05d}", rng, Tally())
                fds0, rss0 = _fd_count(pid), _rss_kib(pid)
                conns0 = established_to(port, _OPEN)
                started = time.monotonic()
                fates = [rng.choice(FATES) for _ in range(streams)]
                queue = list(enumerate(fates))

                async def lane() -> None:
                    while queue:
                        i, fate = queue.pop()
                        await _one(client, fate, f"soak_{worker}_{i:06d}", rng, tally)

                async with anyio.create_task_group() as lanes:
                    for _ in range(concurrency):
                        lanes.start_soon(lane)
                elapsed = time.monotonic() - started
                # The last clients' disconnects reach the gateway after they return:
                # its registry empties as it sees them (another process's progress,
                # followed by polling, bounded; a leak stays and is reported).
                for _ in range(100):
                    health = (await client.get("/healthz")).json()
                    if not health["sessions"]:
                        break
                    await anyio.sleep(0.05)
            with anyio.fail_after(10):
                for simulator in provider.simulators.values():
                    await simulator.wait_until(lambda s=simulator: s.live == 0)  # type: ignore[misc]
            # The gateway closes the client connections as it sees them close: another
            # process's progress, which only polling can follow (bounded).
            for _ in range(100):
                conns = established_to(port, _OPEN)
                fds, rss = _fd_count(pid), _rss_kib(pid)
                if fds - fds0 - (conns - conns0) <= 0:
                    break
                await anyio.sleep(0.05)
        finally:
            await anyio.to_thread.run_sync(gateway.stop)
            stop.set()

    ends: dict[str, list[str]] = {}
    for line in gateway.lines:
        if m := _END.search(line):
            ends.setdefault(m.group(1), []).append(line)
    wrong = []
    for sid, fate in tally.sessions.items():
        lines = ends.get(sid, [])
        if len(lines) != 1 or not any(e in lines[0] for e in _EXPECTED[fate]):
            wrong.append(f"{sid} {fate}: {lines}")
    tracebacks = sum("Traceback" in line for line in gateway.lines)
    return {
        "worker": worker,
        "streams": streams,
        "seconds": round(elapsed, 1),
        "fates": dict(sorted(tally.fates.items())),
        "statuses": dict(sorted(tally.statuses.items())),
        "registry_left": health["sessions"],
        "provider_streams_open": provider.live,
        "provider_connections_pooled": {"before": conns0, "after": conns},
        "fds": {"before": fds0, "after": fds},
        "fds_not_pooled_connections": fds - fds0 - (conns - conns0),
        "rss_kib": {"before": rss0, "after": rss, "growth": rss - rss0},
        "end_lines_wrong": wrong[:20],
        "end_lines_wrong_count": len(wrong),
        "client_problems": tally.problems[:20],
        "client_problem_count": len(tally.problems),
        "tracebacks": tracebacks,
    }


def failures(books: dict[str, Any]) -> list[str]:
    """What in ``books`` breaks the soak's rules (empty: all balanced)."""
    out = []
    if books["registry_left"]:
        out.append(f"registry not empty: {books['registry_left']}")
    if books["provider_streams_open"]:
        out.append(f"provider streams open: {books['provider_streams_open']}")
    if books["fds_not_pooled_connections"] > 0:
        out.append(f"file descriptors leaked: {books['fds']}")
    if books["end_lines_wrong_count"]:
        out.append(f"wrong end lines: {books['end_lines_wrong']}")
    if books["client_problem_count"]:
        out.append(f"client saw: {books['client_problems']}")
    if books["rss_kib"]["growth"] > RSS_GROWTH_LIMIT_KIB:
        out.append(f"RSS grew: {books['rss_kib']}")
    if books["tracebacks"]:
        out.append(f"{books['tracebacks']} tracebacks logged")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("-k", "--workers", nargs="+", default=["asyncio", "uvloop", "trio"])
    args = parser.parse_args()
    ok = True
    for worker in args.workers:
        books = anyio.run(soak, worker, args.streams, args.concurrency, args.seed)
        print(json.dumps(books, indent=1), flush=True)
        problems = failures(books)
        for problem in problems:
            print(f"FAIL {worker}: {problem}", flush=True)
        ok = ok and not problems
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

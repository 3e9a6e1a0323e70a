"""Time to the first token, through the gateway and straight to the provider, in one run.

``python -m bench.firsttoken [-k asyncio uvloop trio] [-n 50] [--warmup 10]
[--server gateway|floor]`` starts the lean provider (bench/provider.py) and, for each
worker class, a server in front of it (``gateway serve`` with bench/hypercorn.toml, or
the floor, bench/floor.py). One request at a time on a fresh connection, it times from
the request's first byte to the first token's bytes at the client (the connection's
setup is not counted, as a browser's is already open), for ``/api/chat/stream``,
``/v1/chat/completions`` and the provider itself, interleaved so that the three see the
same machine; each answer is read to its end before the next request, so the gateway's
provider connections are reused as in steady use. It prints p50, p90, p99 and the
minimum of each, and the time the server adds (its p50 and p90 less the provider's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from support.processes import ROOT

from .client import SSEStream
from .run import _percentile, _server

_PATHS = {"api": "/api/chat/stream", "v1": "/v1/chat/completions", "direct": "/v1/chat/completions"}


async def first_token_ms(port: int, surface: str, sid: str, to_end: bool = True) -> float:
    """One request on a fresh connection: milliseconds from its first byte to the first
    token's; then the answer is read to its end (``to_end``), or the connection closed
    (the floor never ends its answers)."""
    openai = surface != "api"
    fields: dict[str, object] = {"stream": True} if openai else {}
    body = json.dumps(
        {"messages": [{"role": "user", "content": f"bench:{sid}:pace:1"}], **fields}
    ).encode()
    request = (
        f"POST {_PATHS[surface]} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"X-Session-Id: {sid}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    transport, stream = await loop.create_connection(lambda: SSEStream(openai), "127.0.0.1", port)
    try:
        sent = time.monotonic()
        transport.write(request)
        first = await asyncio.wait_for(stream.first_token, 10)
        if to_end:
            await asyncio.wait_for(stream.ended, 10)
    finally:
        transport.close()
    return (first - sent) * 1000


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 3),
        "p90": round(_percentile(values, 90), 3),
        "p99": round(_percentile(values, 99), 3),
        "min": round(min(values), 3),
    }


async def measure(
    worker: str, server: str, provider_port: int, samples: int, warmup: int
) -> dict[str, Any]:
    surfaces = ["api", "v1"] if server == "gateway" else ["api"]
    times: dict[str, list[float]] = {s: [] for s in [*surfaces, "direct"]}
    async with _server(server, worker, provider_port) as (port, _):
        for i in range(warmup + samples):
            for surface in times:
                target = provider_port if surface == "direct" else port
                sid = f"ft_{worker}_{surface}_{i}"
                ms = await first_token_ms(target, surface, sid, server == "gateway")
                if i >= warmup:
                    times[surface].append(ms)
    result: dict[str, Any] = {s: summary(v) for s, v in times.items()}
    direct = result["direct"]
    for surface in surfaces:
        result[f"added_{surface}"] = {
            q: round(result[surface][q] - direct[q], 3) for q in ("p50", "p90")
        }
    return result


async def _with_provider(run: Callable[[int], Awaitable[None]]) -> None:
    provider = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.provider", cwd=ROOT, stdout=subprocess.PIPE
    )
    assert provider.stdout is not None
    try:
        port = int((await provider.stdout.readline()).split()[1])
        await run(port)
    finally:
        provider.terminate()
        await provider.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", nargs="+", default=["asyncio", "uvloop", "trio"])
    parser.add_argument("-n", type=int, default=50, help="timed requests per surface")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--server", choices=["gateway", "floor"], default="gateway")
    args = parser.parse_args()

    async def run(provider_port: int) -> None:
        for worker in args.k:
            result = await measure(worker, args.server, provider_port, args.n, args.warmup)
            print(json.dumps({"worker": worker, "server": args.server, **result}), flush=True)

    uvloop.run(_with_provider(run))


if __name__ == "__main__":
    main()

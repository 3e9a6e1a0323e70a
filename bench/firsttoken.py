"""Time to the first token, through the gateway and straight to the provider, in one run.

``python -m bench.firsttoken [-k asyncio uvloop trio] [-n 50] [--warmup 10]
[--server gateway|floor]`` starts the lean provider (bench/provider.py) and, for each
worker class, a server in front of it (``gateway serve`` with bench/hypercorn.toml, or
the floor, bench/floor.py). One request at a time on a new connection, it times from
the request's first byte to the first token's bytes at the client (the client's connect
is not counted; the server's accepting it is, unless ``--open`` answers a ``GET`` on
the connection first), for ``/api/chat/stream``, ``/v1/chat/completions`` and the
provider itself, interleaved, their order rotated each round, so that the three see the
same machine; each answer is read to its end before the next request, so the gateway's
provider connections are reused as in steady use. It prints p50, p90, p99 and the
minimum of each, and the time the server adds (its p50 and p90 less the provider's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from support.processes import ROOT

from .client import SSEStream, stream_request
from .run import Bench, _percentile, _server

# Runs in the gateway's process with ``--steps``: stamps the first token's path, each
# step's time on CLOCK_MONOTONIC (the client's clock too), and writes them at SIGUSR2.
_HOOK = """
import json, os, signal, time
from bench import firsttoken
firsttoken.install_stamps()
def dump(*_):
    # Whole or not at all: the tool reads the file as soon as it is there.
    with open(os.environ["STEPS_OUT"] + ".part", "w") as f:
        json.dump(firsttoken.STAMPS, f)
    os.replace(os.environ["STEPS_OUT"] + ".part", os.environ["STEPS_OUT"])
signal.signal(signal.SIGUSR2, dump)
from bench.serving import run_hooked
run_hooked("gateway")
"""

# (step, time, loop round) in the order they happened. The round is the number of
# asyncio's event loop iterations so far: counted on the stdlib loop only (uvloop's
# and Trio's run in C or cannot be hooked), -1 elsewhere.
STAMPS: list[tuple[str, float, int]] = []
_ROUND = [-1]


def _count_rounds() -> None:
    """Each iteration of asyncio's own loop counted: how many scheduling rounds a step
    waits for (under load, each one waits behind every other stream's work)."""
    from asyncio import base_events

    run_once = base_events.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def counted(self: Any) -> None:
        _ROUND[0] += 1
        run_once(self)

    _ROUND[0] = 0
    base_events.BaseEventLoop._run_once = counted  # type: ignore[attr-defined]


def _stamped(owner: Any, name: str, before: str | None, after: str | None) -> None:
    """Wrap ``owner.name`` (a coroutine function or a function) to stamp ``before`` at
    its call and ``after`` at its return."""
    import inspect

    inner = getattr(owner, name)
    if inspect.iscoroutinefunction(inner):

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before:
                STAMPS.append((before, time.monotonic(), _ROUND[0]))
            result = await inner(*args, **kwargs)
            if after:
                STAMPS.append((after, time.monotonic(), _ROUND[0]))
            return result

    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            if before:
                STAMPS.append((before, time.monotonic(), _ROUND[0]))
            result = inner(*args, **kwargs)
            if after:
                STAMPS.append((after, time.monotonic(), _ROUND[0]))
            return result

    setattr(owner, name, wrapper)


def install_stamps() -> None:
    """The first token's path, step by step (docs/benchmarks.md, "The first token")."""
    from hypercorn.asyncio import tcp_server as asyncio_tcp
    from hypercorn.trio import tcp_server as trio_tcp

    from gateway.core import registry
    from gateway.provider import parser, transport
    from gateway.web import routes, stream, writer

    _count_rounds()
    _stamped(asyncio_tcp.TCPServer, "run", "accepted", None)
    _stamped(trio_tcp.TCPServer, "run", "accepted", None)
    _stamped(routes._Gateway, "__call__", "app called", None)
    _stamped(routes._Streaming, "__call__", "endpoint reached", None)
    _stamped(routes, "json_body", "body read begins", "body read")
    _stamped(routes, "chat_payload", None, "validated")
    _stamped(stream.ChatStream, "__call__", "stream called", None)
    _stamped(registry.Registry, "open", None, "session claimed")
    _stamped(writer.ClientWriter, "start", "response start", "response started")
    _stamped(stream.ChatStream, "_relay", "relay task runs", None)
    _stamped(transport.HTTP1Transport, "post", "transport called", None)
    _stamped(transport.HTTP1Transport, "_take_idle", None, "connection taken")
    _stamped(transport.HTTP1Transport, "_connect", None, "connection opened")
    _stamped(transport.HTTP1Transport, "_write", None, "request written")
    _stamped(stream, "open_stream", None, "response head")
    _stamped(parser.ProviderStreamParser, "feed", None, "chunk parsed")
    _stamped(writer.ClientWriter, "write", "write", "written")


async def first_token_ms(
    port: int,
    surface: str,
    sid: str,
    to_end: bool = True,
    delay_ms: int = 0,
    warm: bool = False,
) -> tuple[float, float]:
    """One request on a new connection: milliseconds from its first byte to the first
    token's; then the answer is read to its end (``to_end``), or the connection closed
    (the floor never ends its answers). With ``warm``, a ``GET`` is answered on the
    connection first, so the server's accepting it is not timed, as for a browser's
    kept-alive connection."""
    # "direct": the provider, which answers /v1/chat/completions.
    kind = "api" if surface == "api" else "openai"
    request = (
        stream_request(port, sid, "late", delay_ms, kind)
        if delay_ms
        else stream_request(port, sid, "pace", 1, kind)
    )
    loop = asyncio.get_running_loop()
    transport, stream = await loop.create_connection(lambda: SSEStream(kind), "127.0.0.1", port)
    try:
        if warm:
            path = "/_stats" if surface == "direct" else "/healthz"
            answered = stream.await_answer()
            transport.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            await asyncio.wait_for(answered, 10)
        sent = time.monotonic()
        transport.write(request)
        first = await asyncio.wait_for(stream.first_token, 10)
        if to_end:
            await asyncio.wait_for(stream.ended, 10)
    finally:
        transport.close()
    return sent, first


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 3),
        "p90": round(_percentile(values, 90), 3),
        "p99": round(_percentile(values, 99), 3),
        "min": round(min(values), 3),
    }


async def measure(
    worker: str,
    server: str,
    provider_port: int,
    samples: int,
    warmup: int,
    steps: bool,
    delay_ms: int = 0,
    background: int = 0,
    warm: bool = False,
    gap_ms: float = 0.0,
    routes: str | None = None,
) -> dict[str, Any]:
    surfaces = ["api", "v1"] if server == "gateway" else ["api"]
    times: dict[str, list[float]] = {s: [] for s in [*surfaces, "direct"]}
    # The gateway's requests in order: (surface, sent, first token), for the steps.
    sent_first: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "steps.json"
        env = {"STEPS_OUT": str(out)} if steps else {}
        if routes is not None:
            env["GATEWAY_CONFIG"] = routes
        main = ("-c", _HOOK) if steps else None
        async with _server(server, worker, provider_port, env, main) as (port, process):
            # Streams held open meanwhile, paced at 20 tokens/s (the loaded case),
            # by a client process of their own: read by this one, their tokens would
            # queue the timed request's first token behind them in this loop.
            bench = Bench(provider_port)
            holder = await _holder(port, provider_port, background) if background else None
            order = list(times)
            for i in range(warmup + samples):
                # Rotated each round: a request that follows a gateway answer meets the
                # gateway still ending it (its last writes, its end line), so a fixed
                # order would charge that to whichever surface comes next.
                for surface in order[i % len(order) :] + order[: i % len(order)]:
                    if gap_ms:
                        # The previous answer's end (its last writes, its end line)
                        # done before the next request: the gateway at idle.
                        await asyncio.sleep(gap_ms / 1000)
                    target = provider_port if surface == "direct" else port
                    sid = f"ft_{worker}_{surface}_{i}"
                    sent, first = await first_token_ms(
                        target, surface, sid, server == "gateway", delay_ms, warm
                    )
                    if surface != "direct":
                        sent_first.append((surface, sent, first))
                    if i >= warmup:
                        times[surface].append((first - sent) * 1000)
            if holder is not None:
                assert holder.stdin is not None
                holder.stdin.close()
                await holder.wait()
                await bench.wait_provider_idle()
            if steps:
                process.send_signal(signal.SIGUSR2)
                for _ in range(100):
                    if out.exists():
                        break
                    await asyncio.sleep(0.05)
                stamps = json.loads(out.read_text())
    result: dict[str, Any] = {s: summary(v) for s, v in times.items()}
    direct = result["direct"]
    for surface in surfaces:
        result[f"added_{surface}"] = {
            q: round(result[surface][q] - direct[q], 3) for q in ("p50", "p90", "p99")
        }
    if steps:
        result["steps"] = _steps(stamps, sent_first[warmup * len(surfaces) :], surfaces)
    return result


def _steps(
    stamps: list[tuple[str, float, int]],
    requests: list[tuple[str, float, float]],
    surfaces: list[str],
) -> dict[str, dict[str, float]]:
    """Each step's median time after the request's first byte, in ms, per surface: the
    first time each step happened in the request, the first token's write (the first
    write after a chunk was parsed), and the client's first token. On asyncio's own
    loop, also each step's median loop round after the connection's (``rounds <surface>``).
    """
    per_request: list[list[tuple[str, float, int]]] = []
    for stamp in stamps:
        if stamp[0] == "accepted":
            per_request.append([])
        if per_request:
            per_request[-1].append(stamp)
    # Each timed request's own stamps: the connection whose app was called between its
    # first byte and its first token (the harness's wait for the port, and the streams
    # held open by --background, are other connections; with --background their
    # tokens' steps, "chunk parsed" and "write", come between).
    called = [
        (next(t for name, t, _ in r if name == "app called"), r)
        for r in per_request
        if any(name == "app called" for name, _, _ in r)
    ]
    offsets: dict[str, dict[str, list[float]]] = {s: {} for s in surfaces}
    rounds: dict[str, dict[str, list[int]]] = {s: {} for s in surfaces}
    for surface, sent, first in requests:
        found = [r for t, r in called if sent <= t <= first]
        if len(found) != 1:
            continue
        seen: dict[str, tuple[float, int]] = {}
        parsed = False
        for name, t, n in found[0]:
            if name == "chunk parsed":
                parsed = True
            if name == "written" and parsed:
                name = "first token written"
            seen.setdefault(name, (t, n))
        for name, (t, n) in seen.items():
            offsets[surface].setdefault(name, []).append((t - sent) * 1000)
            rounds[surface].setdefault(name, []).append(n - seen["accepted"][1])
        offsets[surface].setdefault("client's first token", []).append((first - sent) * 1000)
    result = {
        surface: {
            name: round(statistics.median(values), 3)
            for name, values in sorted(found.items(), key=lambda kv: statistics.median(kv[1]))
        }
        for surface, found in offsets.items()
    }
    for surface, found_rounds in rounds.items():
        if any(n for values in found_rounds.values() for n in values):
            result[f"rounds {surface}"] = {
                name: statistics.median(values)
                for name, values in sorted(
                    found_rounds.items(), key=lambda kv: statistics.median(kv[1])
                )
            }
    return result


async def _holder(port: int, provider_port: int, count: int) -> asyncio.subprocess.Process:
    """A process holding ``count`` paced streams open on ``port`` until its stdin
    closes; returned once every one has its first token."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.firsttoken",
        "--hold",
        str(port),
        str(provider_port),
        str(count),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    if (await holder.stdout.readline()).strip() != b"held":
        raise RuntimeError("the holding client did not start its streams")
    return holder


async def _hold(port: int, provider_port: int, count: int) -> None:
    """``--hold``: open ``count`` paced streams, say so, and close them at stdin's end."""
    bench = Bench(provider_port)
    streams = await bench.open_many(port, count, "pace", ramp=1.0)
    print("held", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for stream in streams:
        stream.close()


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
    parser.add_argument(
        "--steps", action="store_true", help="also time each step of the gateway's path"
    )
    parser.add_argument(
        "--background",
        type=int,
        default=0,
        help="streams held open meanwhile, 20 tokens/s each (default: none)",
    )
    parser.add_argument(
        "--provider-delay",
        type=int,
        default=0,
        help="the provider's time to first token, ms (default: at once)",
    )
    parser.add_argument(
        "--open",
        action="store_true",
        help="time each request on a connection the server has accepted and answered once",
    )
    parser.add_argument(
        "--routes",
        help="a GATEWAY_CONFIG template for the gateway (bench/routed.toml, bench/fallback.toml)",
    )
    parser.add_argument(
        "--gap",
        type=float,
        default=0.0,
        help="ms between one answer's end and the next request (default: none)",
    )
    parser.add_argument("--hold", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        uvloop.run(_hold(*args.hold))
        return

    async def run(provider_port: int) -> None:
        for worker in args.k:
            result = await measure(
                worker,
                args.server,
                provider_port,
                args.n,
                args.warmup,
                args.steps,
                args.provider_delay,
                args.background,
                args.open,
                args.gap,
                args.routes,
            )
            print(json.dumps({"worker": worker, "server": args.server, **result}), flush=True)

    uvloop.run(_with_provider(run))


if __name__ == "__main__":
    main()

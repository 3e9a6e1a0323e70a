"""What a server keeps per open stream for the garbage collector, and what walking it costs.

``python -m bench.heap [--server gateway|floor] [-k uvloop] [-n 200] [--top 30]`` runs
the server under a hook that counts the objects the collector tracks (``gc.get_objects()``,
by type; coroutines and functions by their code's name) once idle and once with N paced
streams open, then times a full ``gc.collect()`` with them open. It prints the objects
per stream and the types that grew most. ``gateway serve`` freezes its start-up heap
(gateway/cli.py); the floor (bench/floor.py) is frozen the same way by the hook, so the
two counts compare what each keeps per connection. The collection is timed from a
thread while the server's loop runs, as a pause under load would be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys

import uvloop

from support.processes import ROOT, free_port

from .run import Bench, _server

# Runs in the server's process: on each request file, a census into its answer file.
_HOOK = """
import collections, gc, json, os, socket, threading, time, types
def census():
    counts = collections.Counter()
    for o in gc.get_objects():
        name = type(o).__qualname__
        code = getattr(o, "cr_code", None) or getattr(o, "__code__", None)
        if isinstance(code, types.CodeType):
            name += ":" + code.co_filename.rsplit("/", 1)[-1] + ":" + code.co_name
        counts[name] += 1
    return counts
def spy(listener):
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1)
            counts = census()
            started = time.perf_counter()
            gc.collect()
            counts["(full collection, µs)"] = int((time.perf_counter() - started) * 1e6)
            counts["(frozen)"] = gc.get_freeze_count()
            conn.sendall(json.dumps(counts).encode())
listener = socket.create_server(("127.0.0.1", int(os.environ["HEAP_PORT"])))
threading.Thread(target=spy, args=(listener,), daemon=True).start()
from bench.serving import run_hooked
run_hooked(os.environ["HEAP_SERVER"])
"""

_META = ("(full collection, µs)", "(frozen)")


async def _census(port: int) -> dict[str, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"?")
    counts: dict[str, int] = json.loads(await reader.read())
    writer.close()
    return counts


async def run(server: str, worker: str, streams: int) -> list[dict[str, int]]:
    provider = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.provider", cwd=ROOT, stdout=subprocess.PIPE
    )
    assert provider.stdout is not None
    bench = Bench(int((await provider.stdout.readline()).split()[1]))
    heap_port = free_port()
    try:
        async with _server(
            server,
            worker,
            bench.provider_port,
            {"HEAP_PORT": str(heap_port), "HEAP_SERVER": server},
            main=("-c", _HOOK),
        ) as (port, _):
            idle = await _census(heap_port)
            opened = await bench.open_many(port, streams, "pace", ramp=1.0)
            loaded = await _census(heap_port)
            await bench.closing(opened)
    finally:
        provider.terminate()
        await provider.wait()
    return [idle, loaded]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", choices=["gateway", "floor"], default="gateway")
    parser.add_argument("-k", "--worker", default="uvloop")
    parser.add_argument("-n", "--streams", type=int, default=200)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    idle, loaded = uvloop.run(run(args.server, args.worker, args.streams))
    n = args.streams
    tracked = {
        name: sum(v for k, v in c.items() if k not in _META)
        for name, c in (("idle", idle), ("loaded", loaded))
    }
    print(f"{args.server} on {args.worker}: {loaded['(frozen)']} objects frozen at start-up")
    print(
        f"tracked: {tracked['idle']} idle, {tracked['loaded']} with {n} streams open, "
        f"{(tracked['loaded'] - tracked['idle']) / n:.1f} per stream"
    )
    print(f"full collection with {n} streams open: {loaded['(full collection, µs)'] / 1000:.1f} ms")
    grown = sorted(
        ((loaded.get(k, 0) - idle.get(k, 0), k) for k in loaded.keys() - set(_META)),
        reverse=True,
    )
    for diff, name in grown[: args.top]:
        print(f"{diff / n:8.2f}  {name}")


if __name__ == "__main__":
    main()

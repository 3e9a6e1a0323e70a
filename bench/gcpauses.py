"""Garbage-collection pauses in a server while N streams run, with stop latency.

``python -m bench.gcpauses [--server gateway|floor] [-k uvloop] [-n 200]`` runs
``gateway serve`` (or the floor, bench/floor.py, its start-up heap frozen as
``gateway serve`` freezes its own) with a ``gc.callbacks`` hook that times every
collection, then prints the pauses per generation and the stop -> provider EOF
latency measured meanwhile: a cancel for the gateway, a client's disconnect for the
floor, which has no cancel endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from support.processes import ROOT

from .run import Bench, _server, _summary_ms

# Runs in the server's process: time each collection, write the pauses at exit.
_HOOK = """
import atexit, gc, json, os, signal, time
pauses, started = [], [0.0]
def hook(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        seconds = time.perf_counter() - started[0]
        pauses.append((info["generation"], seconds, time.monotonic(), info["collected"]))
gc.callbacks.append(hook)
def dump(*_):
    open(os.environ["GC_PAUSES_OUT"], "w").write(json.dumps(pauses))
atexit.register(dump)
# The floor has no shutdown of its own: a SIGTERM would skip atexit. (`gateway serve`
# replaces this handler with its graceful shutdown, and exits through atexit.)
signal.signal(signal.SIGTERM, lambda *_: (dump(), os._exit(0)))
from bench.serving import run_hooked
run_hooked(os.environ["GC_PAUSES_SERVER"])
"""


def _stop(server: str) -> str:
    return "cancel" if server == "gateway" else "disconnect"


async def run(server: str, worker: str, streams: int, samples: int, out: Path) -> dict[str, object]:
    provider = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.provider", cwd=ROOT, stdout=subprocess.PIPE
    )
    assert provider.stdout is not None
    bench = Bench(int((await provider.stdout.readline()).split()[1]))
    try:
        async with _server(
            server,
            worker,
            bench.provider_port,
            {"GC_PAUSES_OUT": str(out), "GC_PAUSES_SERVER": server},
            main=("-c", _HOOK),
        ) as (port, _):
            since = time.monotonic()
            opened = await bench.open_many(port, streams, "pace", ramp=1.0)
            await asyncio.sleep(1.0)
            latency = _summary_ms(await bench.latency(port, _stop(server), samples))
            await bench.closing(opened)
    finally:
        provider.terminate()
        await provider.wait()
    return {"stop_ms": latency, "since": since}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", choices=["gateway", "floor"], default="gateway")
    parser.add_argument("-k", "--worker", default="uvloop")
    parser.add_argument("-n", "--streams", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200, help="stops timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pauses.json"
        result = uvloop.run(run(args.server, args.worker, args.streams, args.samples, out))
        by_gen: dict[int, list[tuple[float, int]]] = {}
        # Only collections while streams ran; start-up ones stall no cancel.
        for gen, seconds, at, collected in json.loads(out.read_text()):
            if at >= result["since"]:
                by_gen.setdefault(gen, []).append((seconds * 1000, collected))
    stop = _stop(args.server)
    print(f"{args.server}: {stop} -> provider EOF, {args.streams} streams: {result['stop_ms']}")
    for gen, runs in sorted(by_gen.items()):
        ms = [pause for pause, _ in runs]
        line = f"gen{gen}: {len(ms)} collections, max {max(ms):.1f} ms, total {sum(ms):.0f} ms"
        if gen == 2:
            each = ", ".join(f"{pause:.1f} ms ({collected} freed)" for pause, collected in runs)
            line += f": {each}"
        print(line)


if __name__ == "__main__":
    main()

"""Garbage-collection pauses in the gateway while N streams run, with cancel latency.

``python -m bench.gcpauses [-k uvloop] [-n 200]`` runs ``gateway serve`` with a
``gc.callbacks`` hook that times every collection, then prints the pauses per
generation and the cancel -> provider EOF latency measured meanwhile.
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

from .run import ROOT, Bench, _server, _summary_ms

# Runs in the gateway process: time each collection, write the pauses at exit.
_HOOK = """
import atexit, gc, json, os, sys, time
pauses, started = [], [0.0]
def hook(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        pauses.append((info["generation"], time.perf_counter() - started[0], time.monotonic()))
gc.callbacks.append(hook)
atexit.register(lambda: open(os.environ["GC_PAUSES_OUT"], "w").write(json.dumps(pauses)))
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def run(worker: str, streams: int, out: Path) -> dict[str, object]:
    provider = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.provider", cwd=ROOT, stdout=subprocess.PIPE
    )
    assert provider.stdout is not None
    bench = Bench(int((await provider.stdout.readline()).split()[1]))
    try:
        async with _server(
            "gateway",
            worker,
            bench.provider_port,
            {"GC_PAUSES_OUT": str(out)},
            main=("-c", _HOOK),
        ) as (port, _):
            since = time.monotonic()
            opened = await bench.open_many(port, streams, "pace", ramp=1.0)
            await asyncio.sleep(1.0)
            latency = _summary_ms(await bench.latency(port, "cancel", 200))
            await bench.closing(opened)
    finally:
        provider.terminate()
        await provider.wait()
    return {"cancel_ms": latency, "since": since}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-k", "--worker", default="uvloop")
    parser.add_argument("-n", "--streams", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pauses.json"
        result = uvloop.run(run(args.worker, args.streams, out))
        by_gen: dict[int, list[float]] = {}
        # Only collections while streams ran; start-up ones stall no cancel.
        for gen, seconds, at in json.loads(out.read_text()):
            if at >= result["since"]:
                by_gen.setdefault(gen, []).append(seconds * 1000)
    print(f"cancel -> provider EOF, {args.streams} streams: {result['cancel_ms']}")
    for gen, ms in sorted(by_gen.items()):
        print(f"gen{gen}: {len(ms)} collections, max {max(ms):.1f} ms, total {sum(ms):.0f} ms")


if __name__ == "__main__":
    main()

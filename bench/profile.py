"""Where a server's time goes: py-spy samples it while N streams run at 20 tokens/s.

``python -m bench.profile gateway|baseline|floor [-k uvloop] [-n 200] [-d 12]`` prints the
functions with the largest inclusive and own share of the samples.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from .run import ROOT, Bench, _server


def _frame(frame: str) -> str:
    m = re.match(r"(.*) \((.*?):\d+\)", frame)
    if not m:
        return frame
    path = re.sub(r".*site-packages/", "", m.group(2)).replace(str(ROOT) + "/", "")
    return f"{m.group(1)} ({path})"


def summarize(raw: Path, top: int) -> str:
    total, own, inclusive = 0, collections.Counter[str](), collections.Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        names = [_frame(f) for f in stack.split(";")]
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    out = [f"{total} samples", "", "inclusive:"]
    out += [f"{100 * v / total:5.1f}% {k}" for k, v in inclusive.most_common(top)]
    out += ["", "own:"]
    out += [f"{100 * v / total:5.1f}% {k}" for k, v in own.most_common(top)]
    return "\n".join(out)


async def main_async(args: argparse.Namespace, raw: Path) -> None:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    provider = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.provider", cwd=ROOT, stdout=subprocess.PIPE
    )
    assert provider.stdout is not None
    bench = Bench(int((await provider.stdout.readline()).split()[1]))
    try:
        async with _server(args.impl, args.worker, bench.provider_port) as (port, process):
            streams = await bench.open_many(port, args.streams, "pace", ramp=1.0)
            await asyncio.sleep(2.0)
            record = await asyncio.create_subprocess_exec(
                spy,
                "record",
                "-p",
                str(process.pid),
                "-d",
                str(args.duration),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(raw),
                "--nonblocking",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            await record.wait()
            await bench.closing(streams)
    finally:
        provider.terminate()
        await provider.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("impl", choices=["gateway", "baseline", "floor"])
    parser.add_argument("-k", "--worker", default="uvloop")
    parser.add_argument("-n", "--streams", type=int, default=200)
    parser.add_argument("-d", "--duration", type=int, default=12)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        uvloop.run(main_async(args, raw))
        print(summarize(raw, args.top))


if __name__ == "__main__":
    main()

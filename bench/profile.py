"""Where a server's time goes: py-spy samples it while N streams run at 20 tokens/s.

``python -m bench.profile gateway|baseline|floor [-k uvloop] [-n 200] [-d 12]`` prints the
functions with the largest inclusive and own share of the samples. ``--tool perf``
samples the whole process instead (C and kernel too; Linux ``perf``) and prints CPU
time by library; ``--tool strace`` counts its system calls (``strace -c``, which slows
the process: compare calls per token, not times).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from support.processes import ROOT

from .run import Bench, _server


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
            if args.tool != "py-spy":
                await _attach(args.tool, process.pid, args.duration, raw)
                await bench.closing(streams)
                return
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


async def _attach(tool: str, pid: int, seconds: float, out: Path) -> None:
    if tool == "perf":
        command = ["perf", "record", "-F", "2000", "-o", str(out), "-p", str(pid)]
    else:
        command = ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)]
    attached = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    await asyncio.sleep(seconds)
    attached.send_signal(signal.SIGINT)
    await attached.wait()


def _perf_report(data: Path) -> str:
    """CPU time by library (DSO), and the total, from ``perf report``."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [line for line in report.splitlines() if line.strip()]
    total = next(line for line in lines if "Event count" in line)
    shares = [line for line in lines if not line.startswith("#")]
    return "\n".join([total.lstrip("# "), *shares[:12]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("impl", choices=["gateway", "baseline", "floor"])
    parser.add_argument("-k", "--worker", default="uvloop")
    parser.add_argument("-n", "--streams", type=int, default=200)
    parser.add_argument("-d", "--duration", type=int, default=12)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--tool", choices=["py-spy", "perf", "strace"], default="py-spy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        uvloop.run(main_async(args, raw))
        if args.tool == "perf":
            print(_perf_report(raw))
        elif args.tool == "strace":
            print(raw.read_text())
        else:
            print(summarize(raw, args.top))


if __name__ == "__main__":
    main()

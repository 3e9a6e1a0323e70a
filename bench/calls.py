"""Python function calls per relayed token: a count, not a time, so noise cannot move it.

``python -m bench.calls gateway|floor [-k uvloop] [-n 200] [-d 5] [--top 40] [--env K=V ...]
[--surface api|openai|messages]`` runs the server (with those environment variables:
``GATEWAY_RESUME_WINDOW=30``, say) under cProfile, switched on for ``-d`` seconds
(SIGUSR1, SIGUSR2) while N paced streams run at 20 tokens/s, and prints the calls per
token and the functions called.

On this machine the interpreter's time per token tracks the calls: ``perf`` put the
gateway's extra CPU over the floor almost all in libpython (docs/benchmarks.md). A
coroutine counts once per call and once per resumption, as cProfile counts them.
"""

from __future__ import annotations

import argparse
import asyncio
import pstats
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import uvloop

from support.processes import ROOT

from .run import Bench, _server

# Runs in the server's process: the profiler on and off by signal, the stats to a file.
_HOOK = """
import cProfile, os, signal
profile = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
def stop(*_):
    profile.disable()
    profile.dump_stats(os.environ["CALLS_OUT"])
signal.signal(signal.SIGUSR2, stop)
from bench.serving import run_hooked
run_hooked(os.environ["CALLS_SERVER"])
"""

_RATE = 20


async def record(
    server: str,
    worker: str,
    streams: int,
    seconds: float,
    out: Path,
    env: dict[str, str],
    surface: str = "api",
) -> None:
    provider = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.provider", cwd=ROOT, stdout=subprocess.PIPE
    )
    assert provider.stdout is not None
    bench = Bench(int((await provider.stdout.readline()).split()[1]))
    env = {**env, "CALLS_OUT": str(out), "CALLS_SERVER": server}
    try:
        async with _server(
            server, worker, bench.provider_port, env_extra=env, main=("-c", _HOOK)
        ) as (port, process):
            running = await bench.open_many(port, streams, "pace", ramp=1.0, surface=surface)
            await asyncio.sleep(2.0)
            process.send_signal(signal.SIGUSR1)
            await asyncio.sleep(seconds)
            process.send_signal(signal.SIGUSR2)
            for _ in range(100):
                if await anyio.Path(out).exists():
                    break
                await asyncio.sleep(0.1)
            await bench.closing(running)
    finally:
        provider.terminate()
        await provider.wait()


def _where(path: str, line: int, name: str) -> str:
    path = path.rsplit("site-packages/", 1)[-1].replace(str(ROOT) + "/", "")
    return name if path == "~" else f"{path}:{line} {name}"


def summarize(out: Path, tokens: float, top: int) -> str:
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    rows = sorted(
        ((calls / tokens, _where(*where)) for where, (_, calls, *_) in stats.items()),
        reverse=True,
    )
    total = sum(per for per, _ in rows)
    lines = [f"{total:.1f} Python calls per token ({tokens:.0f} tokens)", ""]
    lines += [f"{per:6.2f}  {where}" for per, where in rows[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("server", choices=["gateway", "floor"])
    parser.add_argument("-k", "--worker", default="uvloop")
    parser.add_argument("-n", "--streams", type=int, default=200)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--env", nargs="*", default=[], help="K=V for the server's environment")
    parser.add_argument(
        "--surface", default="api", choices=["api", "openai", "messages"], help="the client's"
    )
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "calls.prof"
        uvloop.run(
            record(args.server, args.worker, args.streams, args.duration, out, env, args.surface)
        )
        # Paced streams: the provider sends each its tokens on time, so the count is known.
        print(summarize(out, args.streams * _RATE * args.duration, args.top))


if __name__ == "__main__":
    main()

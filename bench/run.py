"""`make bench`: the gateway against the baseline, per hypercorn worker class.

The provider (bench/provider.py), the server under test and this load generator are
three processes. The figures (see README of docs/benchmarks.md):

- CPU microseconds of the server process per relayed token, N streams x 20 tokens/s
  (``--rate``),
  from /proc/<pid>/stat over a fixed window after warm-up;
- cancel -> provider sees EOF, and client disconnect -> provider sees EOF, idle and
  under N=200; the clock is CLOCK_MONOTONIC in both processes;
- idle-timeout lateness (gateway only);
- RSS per held stream with 1,000 open streams, and RSS after they close.

Writes docs/benchmarks.md (the table) and docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvloop

from support.processes import ROOT, cpu_seconds, free_port, proc_status, redis_command

from .client import Control, SSEStream, open_stream
from .report import render

RATE = 20.0


def _rss_kib(pid: int) -> int:
    return proc_status(pid, "VmRSS") // 1024


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _summary_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50": round(statistics.median(ms), 2),
        "p99": round(_percentile(ms, 99), 2),
        "max": round(max(ms), 2),
    }


async def _wait_port(port: int, process: asyncio.subprocess.Process) -> None:
    for _ in range(400):
        if process.returncode is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.025)
    raise RuntimeError(f"nothing listening on {port}")


@contextlib.asynccontextmanager
async def _server(
    impl: str,
    worker: str,
    provider_port: int,
    env_extra: dict[str, str] | None = None,
    main: tuple[str, ...] | None = None,
) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """The server under test in its own process; ``main`` replaces ``-m gateway`` or
    ``-m bench.<impl>`` (bench/gcpauses.py and bench/heap.py run it under a hook)."""
    port = free_port()
    upstream = f"http://127.0.0.1:{provider_port}/v1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    if impl == "gateway":
        command = [
            sys.executable,
            *(main or ("-m", "gateway")),
            "serve",
            "-k",
            worker,
            "-b",
            f"127.0.0.1:{port}",
            "--config",
            str(ROOT / "bench" / "hypercorn.toml"),
        ]
        env.update(
            GATEWAY_UPSTREAM_URL=upstream,
            GATEWAY_MODEL="bench",
            GATEWAY_LOG_LEVEL="WARNING",
        )
    else:
        command = [
            sys.executable,
            *(main or ("-m", f"bench.{impl}")),
            "-k",
            worker,
            "-b",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream,
        ]
    env.update(env_extra or {})
    rendered = None
    if impl == "gateway" and "GATEWAY_CONFIG" in env:
        rendered = env["GATEWAY_CONFIG"] = _render_routes(env["GATEWAY_CONFIG"], upstream)
        del env["GATEWAY_UPSTREAM_URL"]
    process = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    try:
        await _wait_port(port, process)
        yield port, process
    finally:
        if rendered is not None:
            os.unlink(rendered)
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def _render_routes(template: str, upstream: str) -> str:
    """A routes file (bench/routed.toml, bench/fallback.toml) with the bench's provider
    for ``$PROVIDER``, in a temporary file: its path. It replaces the
    ``GATEWAY_UPSTREAM_*`` provider."""
    text = Path(template).read_text().replace("$PROVIDER", upstream)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as rendered:
        rendered.write(text)
    return rendered.name


class Saturated(Exception):
    """The server did not start every stream in time: the load is past what it holds.
    (Seen with the baseline at 500 streams on a busy machine.)"""


class Bench:
    def __init__(self, provider_port: int) -> None:
        self.provider_port = provider_port
        self._ids = 0

    def sid(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{os.getpid()}_{self._ids:07d}"

    async def provider_stats(self) -> dict[str, int]:
        ctl = Control(self.provider_port)
        try:
            stats: dict[str, int] = await ctl.request("GET", "/_stats")
            return stats
        finally:
            ctl.close()

    async def wait_provider_idle(self, baseline_open: int = 0) -> None:
        for _ in range(400):
            if (await self.provider_stats())["open"] <= baseline_open:
                return
            await asyncio.sleep(0.05)

    async def latency(
        self, port: int, kind: str, samples: int, lanes: int = 4, cancel_port: int | None = None
    ) -> list[float]:
        """Trigger -> provider EOF, for `cancel` (the endpoint) or `disconnect` (FIN).
        ``cancel_port``: send the cancel to another instance than the stream's."""
        out: list[float] = []

        async def lane(count: int) -> None:
            gateway, provider = Control(cancel_port or port), Control(self.provider_port)
            try:
                for _ in range(count):
                    sid = self.sid(kind)
                    stream = await open_stream(port, sid, "pace", 0)
                    try:
                        await asyncio.wait_for(stream.first_token, 10)
                        t0 = time.monotonic()
                        if kind == "cancel":
                            await gateway.request("POST", f"/api/chat/cancel/{sid}")
                        else:
                            stream.close()
                        closed = await asyncio.wait_for(
                            provider.request("GET", f"/_closed/{sid}"), 10
                        )
                        out.append(closed["closed_at"] - t0)
                    finally:
                        stream.close()
            finally:
                gateway.close()
                provider.close()

        await asyncio.gather(*(lane(samples // lanes) for _ in range(lanes)))
        return out

    async def open_many(
        self, port: int, count: int, mode: str, ramp: float, surface: str = "api"
    ) -> list[SSEStream]:
        """Open `count` streams spread over `ramp` seconds, so tokens don't arrive in lockstep."""
        streams = []
        for i in range(count):
            streams.append(await open_stream(port, self.sid(mode), mode, 0, surface))
            await asyncio.sleep(ramp / count if i % 10 == 9 else 0)
        # A stream the server ended before its first token (a saturated server's own
        # provider connection timing out) is a failed start too, not a crash of the run.
        starts = asyncio.gather(*(s.first_token for s in streams), return_exceptions=True)
        try:
            results = await asyncio.wait_for(starts, 30)
        except TimeoutError:
            problem = "not all started within 30 s"
        else:
            ended = sum(isinstance(r, BaseException) for r in results)
            if not ended:
                return streams
            problem = f"{ended} ended before their first token"
        for stream in streams:
            stream.close()
        await self.wait_provider_idle()
        raise Saturated(f"{count} streams: {problem}")

    async def cpu_per_token(
        self, pid: int, streams: list[SSEStream], window: float
    ) -> dict[str, float]:
        """Counted at the client: a saturated server relays fewer than the provider sends."""
        cpu0, got0, t0 = cpu_seconds(pid), sum(s.tokens for s in streams), time.monotonic()
        await asyncio.sleep(window)
        cpu1, got1, t1 = cpu_seconds(pid), sum(s.tokens for s in streams), time.monotonic()
        tokens = got1 - got0
        return {
            "us_per_token": round((cpu1 - cpu0) * 1e6 / max(tokens, 1), 1),
            "cpu_fraction": round((cpu1 - cpu0) / (t1 - t0), 3),
            "tokens_per_s": round(tokens / (t1 - t0)),
        }

    async def closing(self, streams: list[SSEStream]) -> None:
        for stream in streams:
            stream.close()
        await self.wait_provider_idle()


async def measure(
    bench: Bench, impl: str, worker: str, loads: list[int], samples: int, window: float, hold: int
) -> dict[str, Any]:
    result: dict[str, Any] = {"impl": impl, "worker": worker, "cpu": {}}
    async with _server(impl, worker, bench.provider_port) as (port, process):
        pid = process.pid
        await bench.latency(port, "cancel", 8)  # warm up imports and the pool
        result["cancel_idle"] = _summary_ms(await bench.latency(port, "cancel", samples))
        result["disconnect_idle"] = _summary_ms(await bench.latency(port, "disconnect", samples))
        for n in loads:
            try:
                streams = await bench.open_many(port, n, "pace", ramp=1.0)
            except Saturated:
                result["cpu"][str(n)] = {"saturated": True}
                continue
            await asyncio.sleep(2.0)
            result["cpu"][str(n)] = await bench.cpu_per_token(pid, streams, window)
            if n == 200:
                result["cancel_loaded"] = _summary_ms(await bench.latency(port, "cancel", samples))
                result["disconnect_loaded"] = _summary_ms(
                    await bench.latency(port, "disconnect", samples)
                )
            await bench.closing(streams)
        if hold:
            rss0 = _rss_kib(pid)
            try:
                streams = await bench.open_many(port, hold, "hold", ramp=2.0)
            except Saturated:
                result["memory"] = {"streams": hold, "saturated": True}
                return result
            await asyncio.sleep(0.5)
            rss1 = _rss_kib(pid)
            await bench.closing(streams)
            await asyncio.sleep(1.0)
            rss2 = _rss_kib(pid)
            result["memory"] = {
                "streams": hold,
                "rss_before_kib": rss0,
                "rss_open_kib": rss1,
                "rss_after_kib": rss2,
                "kib_per_stream": round((rss1 - rss0) / hold, 1),
            }
    return result


async def measure_floor(bench: Bench, worker: str, load: int, window: float) -> dict[str, Any]:
    """CPU per token of bench/floor.py: hypercorn's own cost, the floor under any relay."""
    async with _server("floor", worker, bench.provider_port) as (port, process):
        streams = await bench.open_many(port, load, "pace", ramp=1.0)
        await asyncio.sleep(2.0)
        cpu = await bench.cpu_per_token(process.pid, streams, window)
        await bench.closing(streams)
    return {"impl": "floor", "worker": worker, "cpu": {str(load): cpu}}


async def measure_variant(
    bench: Bench,
    impl: str,
    worker: str,
    load: int,
    window: float,
    surface: str = "api",
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """CPU per token of the gateway run another way, in its own process, as the main
    row is measured: ``gateway-openai`` reads /v1/chat/completions (OpenAI's chunks),
    ``gateway-nometrics`` runs with GATEWAY_METRICS=off."""
    async with _server("gateway", worker, bench.provider_port, env) as (port, process):
        if env and "GATEWAY_REDIS_URL" in env:
            await _joined(port)
        streams = await bench.open_many(port, load, "pace", ramp=1.0, surface=surface)
        await asyncio.sleep(2.0)
        cpu = await bench.cpu_per_token(process.pid, streams, window)
        await bench.closing(streams)
    return {"impl": impl, "worker": worker, "cpu": {str(load): cpu}}


@contextlib.asynccontextmanager
async def _redis() -> AsyncIterator[str]:
    """A redis-server of its own, without persistence; yields its URL."""
    redis_port = free_port()
    redis = await asyncio.create_subprocess_exec(
        *redis_command(redis_port),
        stdout=subprocess.DEVNULL,
    )
    try:
        yield f"redis://127.0.0.1:{redis_port}/0"
    finally:
        redis.terminate()
        await redis.wait()


async def cross_instance_cancel(bench: Bench, worker: str, samples: int) -> dict[str, float]:
    """Cancel sent to one gateway for a stream on another, both on one Redis."""
    async with _redis() as url:
        env = {"GATEWAY_REDIS_URL": url}
        async with (
            _server("gateway", worker, bench.provider_port, env) as (a, _),
            _server("gateway", worker, bench.provider_port, env) as (b, _),
        ):
            for port in (a, b):
                await _joined(port)
            await bench.latency(a, "cancel", 8, cancel_port=b)  # warm-up
            return _summary_ms(await bench.latency(a, "cancel", samples, cancel_port=b))


async def measure_resume(bench: Bench, worker: str, load: int, window: float) -> list[Any]:
    """CPU per token with resume on (GATEWAY_RESUME_WINDOW=30): one instance, then
    with its events appended to a Redis of its own."""
    resume = {"GATEWAY_RESUME_WINDOW": "30"}
    runs = [await measure_variant(bench, "gateway-resume", worker, load, window, env=resume)]
    async with _redis() as url:
        env = {**resume, "GATEWAY_REDIS_URL": url}
        runs.append(
            await measure_variant(bench, "gateway-resume-redis", worker, load, window, env=env)
        )
    return runs


async def _joined(port: int) -> None:
    """Until the gateway on ``port`` reports its Redis connection up (another process:
    polled, bounded)."""
    for _ in range(200):
        ctl = Control(port)
        try:
            health: dict[str, Any] = await ctl.request("GET", "/healthz")
            if health.get("cluster") == "ok":
                return
        finally:
            ctl.close()
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the gateway on {port} did not join the cluster")


async def capacity(
    bench: Bench, impl: str, worker: str, steps: list[int], samples: int, rate: float
) -> dict[str, Any]:
    """The most streams held at ``rate`` tokens/s with cancel p99 under 15 ms and the pace kept.

    p99 of a few hundred samples is decided by one or two outliers, and the machine is
    shared: a step counts as failed only when a second try fails too.
    """
    held = 0
    trail: list[dict[str, Any]] = []
    async with _server(impl, worker, bench.provider_port) as (port, process):
        for n in steps:
            for _attempt in range(2):
                try:
                    streams = await bench.open_many(port, n, "pace", ramp=1.0)
                except Saturated:
                    ok = False
                    trail.append({"streams": n, "saturated": True, "ok": ok})
                    continue
                await asyncio.sleep(1.0)
                cpu = await bench.cpu_per_token(process.pid, streams, 2.0)
                try:
                    lat = _summary_ms(await bench.latency(port, "cancel", samples))
                except TimeoutError:
                    # A stream that never started, or a cancel that never closed the
                    # provider (the baseline's, on a busy machine): the step fails.
                    lat = {"p99": math.inf}
                await bench.closing(streams)
                ok = lat["p99"] < 15.0 and cpu["tokens_per_s"] >= 0.95 * rate * n
                trail.append(
                    {
                        "streams": n,
                        "cancel_p99": lat["p99"] if math.isfinite(lat["p99"]) else None,
                        "tokens_per_s": cpu["tokens_per_s"],
                        "ok": ok,
                    }
                )
                if ok:
                    break
            if not ok:
                break
            held = n
    return {"streams": held, "steps": trail}


async def timeout_precision(bench: Bench, worker: str, streams: int) -> dict[str, float]:
    idle = 1.0
    async with _server(
        "gateway", worker, bench.provider_port, {"GATEWAY_IDLE_TIMEOUT": str(idle)}
    ) as (port, _):
        provider = Control(bench.provider_port)
        sids = []
        for _ in range(streams):
            sid = bench.sid("stall")
            sids.append(sid)
            await open_stream(port, sid, "stall", 3)
            await asyncio.sleep(0.005)
        late = []
        for sid in sids:
            closed = await asyncio.wait_for(provider.request("GET", f"/_closed/{sid}"), 20)
            late.append(closed["closed_at"] - (closed["last_token_at"] + idle))
        provider.close()
    return _summary_ms(late)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    provider = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.provider",
        "--rate",
        str(args.rate),
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert provider.stdout is not None
    line = (await provider.stdout.readline()).decode().split()
    bench = Bench(int(line[1]))
    started = time.monotonic()
    runs = []
    try:
        for worker in args.workers:
            for impl in ("baseline", "gateway"):
                print(f"-- {impl} on {worker}", flush=True)
                runs.append(
                    await measure(
                        bench, impl, worker, args.loads, args.samples, args.window, args.hold
                    )
                )
                if args.capacity:
                    runs[-1]["capacity"] = await capacity(
                        bench, impl, worker, args.capacity, 100, args.rate
                    )
                print(json.dumps(runs[-1]), flush=True)
            if args.floor:
                print(f"-- floor on {worker}", flush=True)
                runs.append(await measure_floor(bench, worker, args.floor, args.window))
                print(json.dumps(runs[-1]), flush=True)
            if args.openai:
                print(f"-- gateway /v1/chat/completions on {worker}", flush=True)
                runs.append(
                    await measure_variant(
                        bench, "gateway-openai", worker, args.openai, args.window, surface="openai"
                    )
                )
                print(json.dumps(runs[-1]), flush=True)
            if args.anthropic:
                anthropic = {"GATEWAY_CONFIG": str(ROOT / "bench" / "anthropic.toml")}
                for impl, surface, env in (
                    ("gateway-anthropic", "api", anthropic),
                    ("gateway-messages", "messages", None),
                    ("gateway-messages-anthropic", "messages", anthropic),
                ):
                    print(f"-- {impl} on {worker}", flush=True)
                    runs.append(
                        await measure_variant(
                            bench, impl, worker, args.anthropic, args.window, surface, env
                        )
                    )
                    print(json.dumps(runs[-1]), flush=True)
            if args.metrics_off:
                print(f"-- gateway with GATEWAY_METRICS=off on {worker}", flush=True)
                runs.append(
                    await measure_variant(
                        bench,
                        "gateway-nometrics",
                        worker,
                        args.metrics_off,
                        args.window,
                        env={"GATEWAY_METRICS": "off"},
                    )
                )
                print(json.dumps(runs[-1]), flush=True)
            if args.resume:
                print(f"-- gateway with GATEWAY_RESUME_WINDOW=30 on {worker}", flush=True)
                for run in await measure_resume(bench, worker, args.resume, args.window):
                    runs.append(run)
                    print(json.dumps(run), flush=True)
            if args.cluster:
                print(f"-- cross-instance cancel on {worker}", flush=True)
                gateway_run = next(r for r in reversed(runs) if r["impl"] == "gateway")
                gateway_run["cancel_cross_instance"] = await cross_instance_cancel(
                    bench, worker, args.samples
                )
            timeouts = await timeout_precision(bench, worker, args.samples)
            gateway_run = next(r for r in reversed(runs) if r["impl"] == "gateway")
            gateway_run["idle_timeout_late"] = timeouts
            print(f"   idle timeout lateness: {timeouts}", flush=True)
            if args.first_token:
                # Imported here: bench.firsttoken uses this module's helpers.
                from .firsttoken import measure as first_token

                print(f"-- time to first token on {worker}", flush=True)
                gateway_run["first_token"] = await first_token(
                    worker, "gateway", bench.provider_port, args.first_token, 10, False
                )
                print(f"   {gateway_run['first_token']}", flush=True)
                # Through GATEWAY_CONFIG's routes (docs/routing.md): one target, and a
                # first target that answers 503 before the second serves.
                for routes in ("routed", "fallback"):
                    gateway_run[f"first_token_{routes}"] = await first_token(
                        worker,
                        "gateway",
                        bench.provider_port,
                        args.first_token,
                        10,
                        False,
                        routes=str(ROOT / "bench" / f"{routes}.toml"),
                    )
                    print(f"   {routes}: {gateway_run[f'first_token_{routes}']}", flush=True)
                # The same measure of hypercorn's floor (bench/floor.py): the part of
                # the gateway's figure that hypercorn holds, and both with streams held
                # open meanwhile (the loaded case, docs/benchmarks.md).
                gateway_run["first_token_floor"] = await first_token(
                    worker, "floor", bench.provider_port, args.first_token, 10, False
                )
                print(f"   floor: {gateway_run['first_token_floor']}", flush=True)
                if args.first_token_load:
                    gateway_run["first_token_load"] = args.first_token_load
                    for server in ("gateway", "floor"):
                        key = f"first_token_loaded_{server}"
                        gateway_run[key] = await first_token(
                            worker,
                            server,
                            bench.provider_port,
                            args.first_token,
                            10,
                            False,
                            background=args.first_token_load,
                        )
                        print(f"   {server}, loaded: {gateway_run[key]}", flush=True)
    finally:
        provider.terminate()
        await provider.wait()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{_mem_gib()} GiB, Linux {platform.release()}",
        "python": platform.python_version(),
        "command": "make bench  (" + " ".join(["python -m bench.run", *sys.argv[1:]]) + ")",
        "seconds": round(time.monotonic() - started),
        "rate": args.rate,
        "runs": runs,
    }


def _mem_gib() -> int:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", nargs="+", default=["asyncio", "uvloop", "trio"])
    parser.add_argument("--loads", nargs="+", type=int, default=[50, 200, 500])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--hold", type=int, default=1000)
    parser.add_argument(
        "--capacity",
        nargs="*",
        type=int,
        default=[200, 300, 400, 600],
        help="stream counts to try, in order (none: skip)",
    )
    parser.add_argument(
        "--floor", type=int, default=200, help="streams for the floor's CPU figure; 0: skip"
    )
    parser.add_argument(
        "--openai",
        type=int,
        default=200,
        help="streams for the CPU figure of /v1/chat/completions; 0: skip",
    )
    parser.add_argument(
        "--anthropic",
        type=int,
        default=200,
        help="streams for the CPU figures of Anthropic's Messages: an Anthropic provider "
        "(bench/anthropic.toml), and /v1/messages to an OpenAI-compatible one and to it; "
        "0: skip",
    )
    parser.add_argument(
        "--metrics-off",
        type=int,
        default=200,
        help="streams for the CPU figure with GATEWAY_METRICS=off (the cost of metrics); 0: skip",
    )
    parser.add_argument(
        "--resume",
        type=int,
        default=200,
        help="streams for the CPU figures with resume on, alone and with Redis (needs "
        "redis-server); 0: skip",
    )
    parser.add_argument(
        "--first-token",
        type=int,
        default=50,
        help="requests, one at a time, for the time to first token (bench/firsttoken.py); 0: skip",
    )
    parser.add_argument(
        "--first-token-load",
        type=int,
        default=200,
        help="streams held open (20 tokens/s) while the first token is timed again, "
        "through the gateway and the floor; 0: skip",
    )
    parser.add_argument(
        "--no-cluster",
        dest="cluster",
        action="store_false",
        help="skip the cross-instance cancel (needs redis-server)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=RATE,
        help="tokens per second per stream (issue 17 asks for 100 besides the usual 20)",
    )
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    report = uvloop.run(main_async(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2) + "\n")
    page = out / "benchmarks.md"
    page.write_text(render(report, args.loads, page.read_text() if page.exists() else ""))
    print(f"wrote {out / 'benchmarks.md'} in {report['seconds']} s")


if __name__ == "__main__":
    main()

"""A gateway as its own process (`gateway serve`), for tests that drive it from outside
the test's event loop: the browser tests, schemathesis, the soak."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
from anyio.abc import Process

from support.processes import ROOT, free_port, proc_status, redis_command

WAIT = 10.0


@asynccontextmanager
async def hypercorn_workers(
    worker: str, port: int, env: dict[str, str], workers: int = 2, config: Path | None = None
) -> AsyncIterator[Process]:
    """Plain ``hypercorn --workers N gateway.app:app`` on ``port``, or with ``config``
    ``hypercorn --config FILE`` (its workers); SIGTERM at the end."""
    options = ["--config", str(config)] if config else ["--workers", str(workers)]
    process = await anyio.open_process(
        [
            sys.executable,
            "-m",
            "hypercorn",
            *options,
            "-k",
            worker,
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "1",
            "gateway.app:app",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(WAIT, shield=True):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()


async def until_up(url: str, verify: Any = True) -> None:
    """Until ``GET url/healthz`` answers 200 (a process starting up)."""
    with anyio.fail_after(30):
        while True:
            try:
                async with httpx.AsyncClient(timeout=WAIT, verify=verify) as client:
                    if (await client.get(f"{url}/healthz")).status_code == 200:
                        return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.05)  # a starting process: nothing to await


class Gateway:
    """`gateway serve` in its own process; its output (logs and access log) collected
    line by line."""

    def __init__(self, worker: str, module: str = "gateway", **settings: str) -> None:
        """``settings``: GATEWAY_* variables; demo mode unless GATEWAY_UPSTREAM_URL.
        ``module``: what ``python -m`` runs with ``serve`` (a fault-injecting wrapper)."""
        self.worker = worker
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env |= {"PYTHONUNBUFFERED": "1", **settings}
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "serve", "-k", worker, "-b", self.url[7:]],
            cwd=ROOT,
            env=env,
            # One stream: the logs (stderr) and hypercorn's access log (stdout).
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        self.wait_for(rf"Running on http://127\.0\.0\.1:{self.port}\b")
        self.simulator_url = ""
        if "GATEWAY_UPSTREAM_URL" in settings or "GATEWAY_CONFIG" in settings:
            return
        line = self.wait_for(r"built-in provider simulator on (http://\S+)/v1")
        match = re.search(r"simulator on (http://\S+)/v1", line)
        assert match is not None
        self.simulator_url = match.group(1)

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, count: int = 1) -> str:
        """The ``count``-th line matching ``pattern``, once there is one."""
        deadline = time.monotonic() + WAIT
        with self._changed:
            while True:
                found = [line for line in self.lines if re.search(pattern, line)]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                assert left > 0, f"no line matching {pattern!r} in:\n" + "\n".join(self.lines)
                self._changed.wait(left)

    def session_lines(self, session_id: str) -> list[str]:
        with self._changed:
            return [line for line in self.lines if session_id in line]

    def streams(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.simulator_url}/v1/_streams", timeout=WAIT)
        streams: list[dict[str, Any]] = response.json()["streams"]
        return streams

    def stream_for(self, session_id: str, ended: bool = True) -> dict[str, Any]:
        """The simulator's record of a session, waiting until it has ended."""
        deadline = time.monotonic() + WAIT
        while True:
            for record in self.streams():
                if record["session_id"] == session_id and (
                    not ended or record["outcome"] != "streaming"
                ):
                    return record
            assert time.monotonic() < deadline, f"no ended simulator stream for {session_id}"
            time.sleep(0.05)  # polling another process's state; there is no event to await

    def reset_peak_rss(self) -> int:
        """Start measuring the process's peak resident memory afresh (Linux's
        ``clear_refs`` 5 sets ``VmHWM`` to the current RSS); that RSS, in bytes."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return proc_status(self.process.pid, "VmRSS")

    def peak_rss(self) -> int:
        """The process's peak resident memory since ``reset_peak_rss``, in bytes."""
        return proc_status(self.process.pid, "VmHWM")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(WAIT)
        assert self.process.stdout is not None
        self.process.stdout.close()


@asynccontextmanager
async def gateway_process(worker: str, **settings: str) -> AsyncIterator[Gateway]:
    """A ``Gateway`` started and stopped off the event loop (both block)."""
    gateway = await anyio.to_thread.run_sync(lambda: Gateway(worker, **settings))
    try:
        yield gateway
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(gateway.stop)


async def rss_growth(
    worker: str, upstream_url: str, call: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
) -> tuple[httpx.Response, int]:
    """A `gateway serve` process whose provider is ``upstream_url``: what ``call`` got
    from it (its client's base URL the gateway), and how far the process's peak
    resident memory rose over the call, in bytes."""
    async with (
        gateway_process(worker, GATEWAY_UPSTREAM_URL=upstream_url, GATEWAY_MODEL="sim-model") as g,
        httpx.AsyncClient(base_url=g.url, timeout=WAIT) as client,
    ):
        assert (await client.get("/healthz")).status_code == 200
        before = g.reset_peak_rss()
        with anyio.fail_after(WAIT):
            response = await call(client)
        growth = g.peak_rss() - before
    print(f"RSS {before / 2**20:.0f} MiB, peak +{growth / 2**20:.1f} MiB over the call")
    return response, growth


class RedisServer:
    """`redis-server` on a free port, without persistence; stop() and start() again on
    the same port. ``extra``: more of its options (``--replicaof HOST PORT``)."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.extra = extra

    def start(self) -> None:
        self._run(redis_command(self.port, *self.extra))

    def _run(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)  # another process starting up; nothing to await

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(WAIT)
            self.process = None


class RedisSentinel(RedisServer):
    """A Sentinel (`redis-server --sentinel`, Debian's binary) watching the primary at
    ``primary_port`` as the service ``gw``; it fails over half a second after the
    primary stops answering. Its config, which it rewrites, lives in ``directory``."""

    SERVICE = "gw"

    def __init__(self, primary_port: int, directory: Path) -> None:
        super().__init__()
        self.primary_port = primary_port
        self.config = directory / f"sentinel-{self.port}.conf"

    def start(self) -> None:
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 500\n"
            f"sentinel failover-timeout {self.SERVICE} 2000\n"
        )
        self._run(["redis-server", str(self.config), "--sentinel"])


class Nginx:
    """Debian's nginx in the foreground with a site of the test's (``{port}`` in it is
    replaced by a free port), its files in ``directory``; as an async context manager."""

    def __init__(self, directory: Path, site: str, scheme: str = "http") -> None:
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self._dir = directory / f"nginx-{self.port}"
        self._site = site.replace("{port}", str(self.port))
        self._process: Process | None = None

    @staticmethod
    def missing() -> bool:
        return shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin") is None

    async def __aenter__(self) -> Nginx:
        d = self._dir
        d.mkdir(parents=True)
        (d / "site.conf").write_text(self._site)
        (d / "nginx.conf").write_text(
            f"""
error_log {d}/error.log warn;
pid {d}/nginx.pid;
worker_processes 1;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/site.conf;
}}
"""
        )
        nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
        assert nginx is not None
        self._process = await anyio.open_process(
            [nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with anyio.fail_after(WAIT):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", self.port)).aclose()
                    return self
                except OSError:
                    assert self._process.returncode is None, self.errors()
                    # Another process starting up; nothing to await.
                    await anyio.sleep(0.02)

    def errors(self) -> str:
        path = self._dir / "error.log"
        return path.read_text() if path.exists() else ""

    def access_log(self) -> list[str]:
        return (self._dir / "access.log").read_text().splitlines()

    async def __aexit__(self, *exc: object) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGQUIT)
        with anyio.move_on_after(WAIT, shield=True):
            await self._process.wait()
        if self._process.returncode is None:
            self._process.kill()
        await self._process.aclose()


class TcpProxy:
    """A loopback TCP relay to ``port`` in threads; ``cut()`` kills every connection
    through it at once, as a network change does (the browser tests' "going offline":
    Chromium's offline emulation fails new requests but leaves open ones alone)."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            dropped, self._open = self._open, []
        for sock in dropped:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._server.close()
        self.cut()

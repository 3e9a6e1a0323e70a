"""Process helpers for tests/ and bench/: free ports, redis-server's command line, and
what /proc says about a process (its memory and CPU time)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["ROOT", "cpu_seconds", "free_port", "proc_status", "redis_command"]

ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of asking."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_command(port: int, *extra: str) -> list[str]:
    """``redis-server`` on ``port`` of 127.0.0.1, without persistence; ``extra``: more
    of its options (``--replicaof HOST PORT``)."""
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        *extra,
    ]


def proc_status(pid: int, field: str) -> int:
    """A memory figure of a process from /proc (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used (user and system), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK

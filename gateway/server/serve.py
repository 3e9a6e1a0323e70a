"""Running hypercorn from Python, on whichever event loop is running.

Tests, ``gateway serve`` and the embedded simulator all serve through ``serve()``:
it binds the sockets itself (so port 0 works and the real address is known before
the first request) and hands them to hypercorn as ``fd://`` binds.
"""

from __future__ import annotations

import copy
import inspect
import socket
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FunctionType

import anyio
import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config
from starlette.types import ASGIApp

from ..errors import ConfigError
from . import writes
from .keepalive import install

__all__ = ["WORKER_CLASSES", "anyio_backend", "load_config", "serve"]

WORKER_CLASSES = ("asyncio", "uvloop", "trio")


def anyio_backend(worker_class: str) -> tuple[str, dict[str, object]]:
    """``anyio.run``'s backend and options for a hypercorn worker class."""
    if worker_class == "trio":
        return "trio", {}
    return "asyncio", {"use_uvloop": True} if worker_class == "uvloop" else {}


def load_config(path: str | Path | None = None, **overrides: object) -> Config:
    """Read a hypercorn toml file, refusing keys hypercorn does not know.

    ``Config.from_toml`` accepts misspelt keys without a word; a misspelt
    ``graceful_timeout`` would silently change how shutdown behaves.
    """
    data: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read hypercorn config {path}: {exc}") from exc
    data.update(overrides)
    unknown = sorted(key for key in data if not is_hypercorn_setting(key))
    if unknown:
        raise ConfigError(f"unknown hypercorn setting(s) in {path}: {', '.join(unknown)}")
    if data.get("worker_class", "asyncio") not in WORKER_CLASSES:
        raise ConfigError(f"worker_class must be one of {', '.join(WORKER_CLASSES)}")
    if data.get("read_timeout") is not None:
        raise ConfigError(
            "read_timeout must stay unset: hypercorn applies it to streaming responses"
        )
    return Config.from_mapping(data)


def is_hypercorn_setting(key: str) -> bool:
    """A key hypercorn's ``Config`` really reads: a plain attribute or a settable property."""
    if key.startswith("_"):
        return False
    attr = inspect.getattr_static(Config, key, None)
    if isinstance(attr, property):
        return attr.fset is not None
    if key in Config.__annotations__:
        return True
    return attr is not None and not isinstance(attr, (FunctionType, classmethod, staticmethod))


async def serve(
    app: ASGIApp,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: TaskStatus[list[tuple[str, int]]] = anyio.TASK_STATUS_IGNORED,
    hypercorn_writes: bool = False,
) -> None:
    """Serve ``app`` until ``shutdown_trigger`` returns; report the bound addresses.

    Under Trio, responses are written at once when they can be (writes.py), unless
    ``hypercorn_writes``: bench/serving.py measures hypercorn's own floor with it."""
    config = copy.copy(config)
    sockets, addresses = _bind(config.bind, config.backlog)
    config.bind = [f"fd://{sock.detach()}" for sock in sockets]
    task_status.started(addresses)
    install()
    if sniffio.current_async_library() == "trio":
        import hypercorn.trio

        if not hypercorn_writes:
            writes.install()

        await hypercorn.trio.serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
    else:
        import hypercorn.asyncio

        await hypercorn.asyncio.serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]


def _bind(binds: list[str], backlog: int) -> tuple[list[socket.socket], list[tuple[str, int]]]:
    sockets: list[socket.socket] = []
    addresses: list[tuple[str, int]] = []
    for bind in binds:
        host, _, port = bind.replace("[", "").replace("]", "").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"bind must be HOST:PORT, got {bind!r}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
        sock.setblocking(False)
        sockets.append(sock)
        addresses.append(sock.getsockname()[:2])
    return sockets, addresses

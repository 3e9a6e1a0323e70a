"""Serves a comparison app (bench/baseline.py, bench/floor.py) the way `make bench` starts it:
``python -m bench.<name> -k <worker> -b <host:port> --upstream <provider /v1 URL>``."""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Callable
from typing import Any

import anyio

from gateway.server.serve import anyio_backend, load_config, serve


def main(create_app: Callable[[str], Any]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-k", "--worker-class", default="asyncio")
    parser.add_argument("-b", "--bind", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    config = load_config(bind=[args.bind], accesslog=None, graceful_timeout=1.0)
    backend, options = anyio_backend(args.worker_class)
    app = create_app(args.upstream)
    anyio.run(_serve_forever, app, config, backend=backend, backend_options=options)


async def _serve_forever(app: Any, config: Any) -> None:
    # hypercorn's own writes: the floor and the baseline are hypercorn as it comes.
    await serve(app, config, shutdown_trigger=anyio.sleep_forever, hypercorn_writes=True)


def run_hooked(server: str) -> None:
    """The server bench.run's ``_server`` asked for, run by a hook that ``python -c``
    started (bench/heap.py, bench/calls.py) with the same arguments: ``gateway serve``,
    or the floor with its start-up heap frozen, as ``gateway serve`` freezes its own."""
    args = sys.argv[1:]
    if server == "gateway":
        from gateway.cli import main as serve_gateway

        sys.exit(serve_gateway(args))
    worker = args[args.index("-k") + 1]
    importlib.import_module("hypercorn.trio" if worker == "trio" else "hypercorn.asyncio")
    from . import floor

    gc.collect()
    gc.freeze()
    sys.argv = ["floor", *args]
    main(floor.create_app)

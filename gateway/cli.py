"""``gateway serve``: hypercorn from hypercorn.toml, with a shutdown that stops streams first."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from hypercorn.config import Config
from starlette.applications import Starlette

from .api import create_app
from .errors import ConfigError
from .logs import Formatter
from .server import WORKER_CLASSES, anyio_backend, load_config, serve
from .settings import Settings
from .state import state_of

__all__ = ["main", "run", "stop_streams_first"]

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gateway")
    serve_cmd.add_argument(
        "--config",
        "-c",
        default=None,
        help="hypercorn toml file (default: ./hypercorn.toml if present)",
    )
    serve_cmd.add_argument("--worker-class", "-k", choices=WORKER_CLASSES, default=None)
    serve_cmd.add_argument("--bind", "-b", action="append", default=None, help="HOST:PORT")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
        path = args.config
        if path is None and Path("hypercorn.toml").exists():
            path = "hypercorn.toml"
        overrides: dict[str, object] = {}
        if args.worker_class:
            overrides["worker_class"] = args.worker_class
        if args.bind:
            overrides["bind"] = args.bind
        config = load_config(path, **overrides)
        if config.workers > 1:
            raise ConfigError(
                f"workers = {config.workers}: `gateway serve` runs one process; for several, "
                "run `hypercorn --config hypercorn.toml gateway.app:app` with "
                "GATEWAY_REDIS_URL set (docs/scaling.md)"
            )
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(Formatter())
    logging.basicConfig(level=settings.log_level_number, handlers=[handler])
    # httpx2 logs every provider request at INFO; the gateway's own lines say more.
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, settings.log_level_number))
    run(create_app(settings), config)
    return 0


def run(app: Starlette, config: Config) -> None:
    """Serve until SIGINT or SIGTERM; then stop every stream, then let hypercorn finish."""
    backend, options = anyio_backend(config.worker_class)
    anyio.run(_serve_until_signal, app, config, backend=backend, backend_options=options)


def stop_streams_first(
    app: Starlette, trigger: Callable[[], Awaitable[object]], timeout: float
) -> Callable[[], Awaitable[None]]:
    """A hypercorn shutdown trigger: when ``trigger`` returns, stop every stream first.

    hypercorn would wait ``graceful_timeout`` for our endless streams and then
    hard-cancel them; stopping them first gives each its terminal event.
    """

    async def shutdown_trigger() -> None:
        await trigger()
        with anyio.move_on_after(timeout):
            await state_of(app).registry.shutdown()

    return shutdown_trigger


async def _wait_for_signal() -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info("received %s: shutting down", signal.Signals(signum).name)
            return


async def _serve_until_signal(app: Starlette, config: Config) -> None:
    logger.info(
        "gateway serving on %s with the %s worker", ", ".join(config.bind), config.worker_class
    )
    trigger = stop_streams_first(app, _wait_for_signal, config.graceful_timeout)
    await serve(app, config, shutdown_trigger=trigger)

"""``gateway serve``: hypercorn from hypercorn.toml, with a shutdown that stops streams first."""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from hypercorn.config import Config
from starlette.applications import Starlette

from .errors import ConfigError
from .logs import Formatter
from .server.serve import WORKER_CLASSES, anyio_backend, load_config, serve
from .settings import Settings
from .tools.contract.checks import CHECKS
from .tools.contract.kit import CheckResult, ContractOptions
from .tools.contract.report import junit_xml, report
from .tools.contract.run import run_contract
from .web.routes import create_app
from .web.state import state_of

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
    contract_cmd = commands.add_parser(
        "contract",
        help="check a running deployment's cancel semantics (docs/deploy/README.md)",
        description=(
            "Serve the instrumented provider on --provider-host:--provider-port (the "
            "deployment's GATEWAY_UPSTREAM_URL is http://HOST:PORT/v1) and run the cancel "
            "contract against --gateway. Exits 0 only if every check passed."
        ),
    )
    contract_cmd.add_argument("--gateway", required=True, help="the deployment's base URL")
    contract_cmd.add_argument("--provider-port", type=int, required=True)
    contract_cmd.add_argument("--provider-host", default="127.0.0.1")
    contract_cmd.add_argument("--api-key", help="a key of the deployment's GATEWAY_API_KEYS")
    contract_cmd.add_argument("--second-key", help="another principal's key")
    contract_cmd.add_argument(
        "--routes",
        action="store_const",
        const=True,
        default=None,
        help="the deployment has the kit's routes (docs/routing.md): run the routing checks",
    )
    contract_cmd.add_argument("--peer", help="another replica's or worker's base URL")
    contract_cmd.add_argument("--samples", type=int, default=30)
    contract_cmd.add_argument(
        "--idle-timeout", type=float, help="the deployment's GATEWAY_IDLE_TIMEOUT, seconds"
    )
    contract_cmd.add_argument("--cacert", help="a CA bundle to trust for https:// URLs")
    contract_cmd.add_argument(
        "--check", action="append", default=[], choices=list(CHECKS), help="run only these"
    )
    contract_cmd.add_argument("--junit", help="write the results as JUnit XML to this file")
    args = parser.parse_args(argv)
    if args.command == "contract":
        return _contract(args)

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


def _contract(args: argparse.Namespace) -> int:
    if args.samples < 1:
        print("gateway contract: --samples must be >= 1", file=sys.stderr)
        return 2
    options = ContractOptions(
        gateway=args.gateway.rstrip("/"),
        provider_port=args.provider_port,
        provider_host=args.provider_host,
        api_key=args.api_key,
        second_key=args.second_key,
        routes=args.routes,
        peer=args.peer.rstrip("/") if args.peer else None,
        samples=args.samples,
        idle_timeout=args.idle_timeout,
        cacert=args.cacert,
        only=tuple(args.check),
    )
    print(f"gateway contract: the provider on {args.provider_host}:{args.provider_port}")

    def progress(result: CheckResult) -> None:
        print(f"  {result.name}: {result.status}", flush=True)

    results = anyio.run(run_contract, options, progress)
    print(report(results))
    if args.junit:
        Path(args.junit).write_bytes(junit_xml(results))
    return 0 if all(r.status != "fail" for r in results) else 1


def run(app: Starlette, config: Config) -> None:
    """Serve until SIGINT or SIGTERM; then stop every stream, then let hypercorn finish."""
    backend, options = anyio_backend(config.worker_class)
    _freeze_startup_heap(backend)
    anyio.run(_serve_until_signal, app, config, backend=backend, backend_options=options)


def _freeze_startup_heap(backend: str) -> None:
    """Keep what start-up built (modules, classes, functions) out of every garbage
    collection: it lives as long as the process, and a full
    collection that walked it paused the event loop for tens of milliseconds under
    load (docs/benchmarks.md, "The cancel p99 tail"). Objects frozen are still freed
    when their last reference goes; only cycles among them would stay."""
    # The server's own modules first, so that they are frozen too.
    importlib.import_module("hypercorn.trio" if backend == "trio" else "hypercorn.asyncio")
    gc.collect()
    gc.freeze()


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

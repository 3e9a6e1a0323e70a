"""``run_contract``: serve the provider, run the checks in order, stop the provider."""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable

import anyio
import httpx2 as httpx

from ..simulator import Simulator, serve_simulator
from .checks import CHECKS, Check
from .kit import CheckFailed, CheckResult, ContractOptions, Kit

__all__ = ["run_contract"]


async def run_contract(
    options: ContractOptions, on_result: Callable[[CheckResult], None] | None = None
) -> list[CheckResult]:
    """Serve the provider, run every check in order, stop the provider."""
    unknown = set(options.only) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks: {', '.join(sorted(unknown))}")
    simulator = Simulator()
    verify: ssl.SSLContext | bool = True
    if options.cacert:
        verify = ssl.create_default_context(cafile=options.cacert)
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=10)
    # No read timeout: a stream may be quiet for a ping interval; each check is bounded.
    timeout = httpx.Timeout(options.patience, read=None)
    results: list[CheckResult] = []
    stop = anyio.Event()
    async with (
        httpx.AsyncClient(timeout=timeout, verify=verify, limits=limits) as client,
        anyio.create_task_group() as tg,
    ):
        bind = f"{options.provider_host}:{options.provider_port}"
        await tg.start(functools.partial(serve_simulator, simulator, stop.wait, bind=bind))
        kit = Kit(options, simulator, client)
        try:
            for name, (check, needs) in CHECKS.items():
                if options.only and name not in options.only:
                    continue
                if needs is not None and getattr(options, needs) is None:
                    option = "--" + needs.replace("_", "-")
                    result = CheckResult(name, "skip", f"needs {option}")
                else:
                    result = await _run_one(kit, name, check)
                results.append(result)
                if on_result is not None:
                    on_result(result)
        finally:
            stop.set()
    return results


async def _run_one(kit: Kit, name: str, check: Check) -> CheckResult:
    started = time.monotonic()
    bound = kit.patience * 4 + (kit.options.idle_timeout or 0)
    try:
        with anyio.fail_after(bound):
            detail = await check(kit)
    except Exception as exc:
        failure = _leaf(exc)
        if isinstance(failure, CheckFailed):
            detail = str(failure)
        elif isinstance(failure, TimeoutError):
            detail = f"did not finish in {bound:.0f} s"
        elif isinstance(failure, httpx.HTTPError):
            detail = f"{type(failure).__name__}: {failure}"
        else:
            raise
        return CheckResult(name, "fail", detail, time.monotonic() - started)
    return CheckResult(name, "pass", detail, time.monotonic() - started)


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside task groups' exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc

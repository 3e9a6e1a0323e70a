"""The app's lifespan: the provider client, the Redis link and (demo mode) the simulator.

Each resource is opened in order and closed in reverse, whatever fails: a start step
that raises closes everything opened before it. The task group that runs the
background tasks is held across the ``yield`` of a context manager driven by one task
(Starlette's lifespan), which is what ``AsyncContextManagerMixin`` is for.

A background task that fails after start-up would leave an instance that looks alive
and cannot do its work; it is logged, every stream is stopped as at shutdown, and the
process exits non-zero for its supervisor to restart (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from anyio import AsyncContextManagerMixin
from anyio.abc import TaskStatus
from starlette.applications import Starlette

from ..cluster.instance import Cluster
from ..config import ProviderConfig
from ..core.session import Failed
from ..logs import ensure_handler
from ..provider.routing import Providers
from ..resume.follow import follow_messages
from ..tools.simulator import Simulator, SimulatorConfig, serve_simulator
from .state import state_of

__all__ = ["EXIT_BACKGROUND_FAILURE", "Lifespan"]

logger = logging.getLogger(__name__)

# The exit status of a process whose background task failed (EX_SOFTWARE). hypercorn
# stops all its workers when one exits non-zero, so a supervisor restarts the lot.
EXIT_BACKGROUND_FAILURE = 70
# Bounds on the shutdown steps: the streams' stop, leaving Redis (closing the providers'
# clients: provider/routing.py).
_STREAMS_STOP = 5.0
_CLUSTER_LEAVE = 3.0


class Lifespan(AsyncContextManagerMixin):
    """``Starlette(lifespan=Lifespan)``."""

    def __init__(self, app: Starlette) -> None:
        self._state = state_of(app)
        self._stopping = False

    @contextlib.asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[None]:
        # Here, not at import: the server has set up its logging by now.
        ensure_handler()
        state = self._state
        providers: Providers | None = None
        failed: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                stop_simulator = anyio.Event()
                cluster_scope = anyio.CancelScope()
                try:
                    try:
                        if state.cluster is not None:
                            await tg.start(
                                self._supervise,
                                "cluster",
                                functools.partial(self._run_cluster, state.cluster, cluster_scope),
                            )
                        simulated = {}
                        for provider in state.settings.providers_and_routes()[0]:
                            if provider.base_url is None:
                                simulated[provider.name] = await self._start_simulator(
                                    tg, stop_simulator, provider
                                )
                        providers = Providers(state.settings, simulated)
                        state.providers = providers
                    except Exception as exc:
                        # Raised once what had started has stopped as at shutdown: an
                        # exception leaving the task group would cancel it instead.
                        failed = exc
                    else:
                        yield
                finally:
                    self._stopping = True
                    with anyio.move_on_after(_STREAMS_STOP, shield=True):
                        await state.registry.shutdown()
                    if state.cluster is not None:
                        state.cluster.stop()
                        # Leaving Redis normally is bounded; past that it is cancelled.
                        cluster_scope.deadline = anyio.current_time() + _CLUSTER_LEAVE
                    stop_simulator.set()
        finally:
            if providers is not None:
                await providers.aclose()
            state.metrics.close()
        if failed is not None:
            raise failed

    async def _start_simulator(
        self, tg: anyio.abc.TaskGroup, stop: anyio.Event, provider: ProviderConfig
    ) -> str:
        """A built-in simulator playing ``provider``, served until ``stop``; its base
        URL. ``GATEWAY_SIMULATOR_*`` first, then the provider's ``simulate`` table."""
        settings = self._state.settings
        config = SimulatorConfig(
            tokens=settings.simulator_tokens,
            rate=settings.simulator_rate,
            reasoning_tokens=settings.simulator_reasoning_tokens,
        )
        # The file's reader checked each field's name and type (config.SIMULATE_KEYS).
        overrides: dict[str, Any] = dict(provider.simulate)
        simulator = Simulator(dataclasses.replace(config, **overrides))
        addresses = await tg.start(
            self._supervise, "simulator", functools.partial(serve_simulator, simulator, stop.wait)
        )
        host, port = addresses[0]
        self._state.simulators[provider.name] = simulator
        url = f"http://{host}:{port}/v1"
        if settings.providers:
            logger.info("Provider %s: a built-in simulator on %s", provider.name, url)
        else:
            logger.info(
                "No GATEWAY_UPSTREAM_URL: serving the built-in provider simulator on %s", url
            )
        return url

    async def _run_cluster(
        self, cluster: Cluster, scope: anyio.CancelScope, *, task_status: TaskStatus[None]
    ) -> None:
        registry = self._state.registry
        wait = self._state.settings.cancel_wait

        async def cancel_here(principal: str, session_id: str) -> bool:
            logger.info("[SSE] Cancel request forwarded for %s", session_id)
            return bool(await registry.stop(session_id, principal, wait))

        def taken_elsewhere(principal: str, session_id: str) -> None:
            # One live stream per id in the cluster, the one Redis names: a cancel
            # from any instance reaches it, and would not reach this one.
            session = registry.get(session_id, principal)
            if session is not None:
                session.fail(Failed("session_conflict", "the id is live on another instance"))

        cluster.on_taken = taken_elsewhere
        if self._state.follow is not None:
            self._state.follow.on_follow = follow_messages(
                self._state.registry,
                self._state.settings,
                self._state.follow,
                self._state.followers,
            )
        with scope:
            await cluster.run(cancel_here, task_status=task_status)

    async def _supervise(
        self, name: str, run: Callable[..., Awaitable[None]], *, task_status: TaskStatus[object]
    ) -> None:
        """Run a background task for the app's life. A failure before it has started
        fails the start-up; after that, see the module's docstring."""
        status = _StartedOnce(task_status)
        try:
            await run(task_status=status)
        except Exception:
            if not status.done:
                raise
            if self._stopping:
                # The app is shutting down anyway; the failure is still worth seeing.
                logger.exception("background task %r failed while stopping", name)
                return
            logger.exception("background task %r failed: this instance stops", name)
        else:
            if self._stopping:
                return
            logger.error("background task %r ended on its own: this instance stops", name)
        await self._exit_on_failure()

    async def _exit_on_failure(self) -> None:
        with anyio.move_on_after(self._state.settings.cancel_wait):
            await self._state.registry.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        # Not an exception: the server would log it and serve on without its lifespan.
        os._exit(EXIT_BACKGROUND_FAILURE)


class _StartedOnce:
    """A task status that remembers whether the task has reported its start."""

    def __init__(self, inner: TaskStatus[object]) -> None:
        self._inner = inner
        self.done = False

    def started(self, value: object = None) -> None:
        self.done = True
        self._inner.started(value)

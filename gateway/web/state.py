"""What the app holds for its life, typed: one object on ``app.state.gateway``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request

from ..cluster.instance import Cluster
from ..core.metrics import Metrics
from ..core.registry import Registry
from ..provider.routing import Providers
from ..resume.follow import ClientFollower
from ..resume.log import ResumeStore
from ..resume.messages import FollowMessages
from ..settings import Settings
from ..tools.simulator import Simulator
from .auth import Authenticator

__all__ = ["GatewayState", "principal_of", "state_of"]


@dataclass(eq=False)
class GatewayState:
    settings: Settings
    registry: Registry
    auth: Authenticator
    openapi: dict[str, Any]
    cluster: Cluster | None
    metrics: Metrics
    # With GATEWAY_RESUME_WINDOW > 0: the resumable streams (resume/log.py).
    resume: ResumeStore | None = None
    # The clients here following streams of other instances, by follower id.
    followers: dict[str, ClientFollower] = field(default_factory=dict)
    # With resume and a cluster: the messages about resumes across instances.
    follow: FollowMessages | None = None
    # Set by the lifespan: the providers, and the built-in simulators playing some of
    # them (demo mode, or GATEWAY_CONFIG's simulate tables), by provider name.
    _providers: Providers | None = field(default=None, repr=False)
    simulators: dict[str, Simulator] = field(default_factory=dict)

    @property
    def providers(self) -> Providers:
        assert self._providers is not None, "the lifespan has not started"
        return self._providers

    @providers.setter
    def providers(self, providers: Providers) -> None:
        self._providers = providers


def state_of(app: Starlette | Request) -> GatewayState:
    if isinstance(app, Request):
        app = app.app
    state: GatewayState = app.state.gateway
    return state


def principal_of(request: Request) -> str:
    """The principal a request is made for (auth.py)."""
    return state_of(request).auth.principal(
        request.headers, request.client.host if request.client else None
    )

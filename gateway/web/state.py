"""What the app holds for its life, typed: one object on ``app.state.gateway``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
from starlette.applications import Starlette
from starlette.requests import Request

from ..cluster.instance import Cluster
from ..core.metrics import Metrics
from ..core.registry import Registry
from ..provider.client import ModelList
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
    models: ModelList = field(default_factory=ModelList)
    # With GATEWAY_RESUME_WINDOW > 0: the resumable streams (resume/log.py).
    resume: ResumeStore | None = None
    # The clients here following streams of other instances, by follower id.
    followers: dict[str, ClientFollower] = field(default_factory=dict)
    # With resume and a cluster: the messages about resumes across instances.
    follow: FollowMessages | None = None
    # Set by the lifespan: the provider client, the provider's base URL (the built-in
    # simulator's in demo mode) and, in demo mode, the simulator.
    _client: httpx.AsyncClient | None = field(default=None, repr=False)
    _upstream_url: str | None = None
    simulator: Simulator | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "the lifespan has not started"
        return self._client

    @client.setter
    def client(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @property
    def upstream_url(self) -> str:
        assert self._upstream_url is not None, "the lifespan has not started"
        return self._upstream_url

    @upstream_url.setter
    def upstream_url(self, url: str) -> None:
        self._upstream_url = url


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

"""The providers at run time, and which of them serve a model (docs/routing.md).

``Providers`` holds one ``Upstream`` per configured provider (its own HTTP client and
pool, base URL and model list) and the routes of ``GATEWAY_CONFIG``; ``plan(model)``
names the targets a stream tries, in order. The attempts themselves, and when the
next target is tried, are the relay's (web/stream.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2 as httpx

from ..config import CATCH_ALL, ProviderConfig, RouteConfig
from ..settings import Settings
from .anthropic import AnthropicStreamParser, messages_request
from .client import CHAT_PATH, MESSAGES_PATH, ModelList, create_client
from .parser import ProviderStreamParser

__all__ = ["Cooldown", "Plan", "Providers", "Upstream"]

_CLOSE_TIMEOUT = 5.0


class Cooldown:
    """A provider's failures, and whether routes skip it (per instance).

    ``failures`` failures within ``window`` seconds open it: routes skip the provider
    for ``pause`` seconds. Then one stream may try it (the probe, half-open) while the
    others still skip it: a success closes it, a failure opens it again for ``pause``.
    """

    __slots__ = ("_failures", "_open_until", "_pause", "_probing", "_times", "_window")

    def __init__(self, failures: int, window: float, pause: float) -> None:
        self._failures = failures
        self._window = window
        self._pause = pause
        self._times: list[float] = []
        self._open_until: float | None = None
        self._probing = False

    def cooling(self, now: float) -> bool:
        """Whether a route skips the provider now (``take`` would say no)."""
        if self._open_until is None:
            return False
        return now < self._open_until or self._probing

    def take(self, now: float) -> bool | None:
        """May a stream try the provider now? ``None``: no (skip it); ``False``: yes;
        ``True``: yes, as the probe past a pause, which must then be settled."""
        if self.cooling(now):
            return None
        if self._open_until is not None:
            self._probing = True
            return True
        return False

    def settle(self, result: bool | None, now: float, probe: bool) -> None:
        """An attempt's end: ``True`` served, ``False`` failed as a provider fails
        (no connection, a timeout, 408, 429, 5xx, a broken stream), ``None`` neither
        (stopped, lost a hedge, or refused the request itself). ``probe``: the
        attempt was the probe (``take`` said ``True``)."""
        probing = probe and self._probing
        if probe:
            self._probing = False
        if result is True and probing:
            self._open_until = None
            self._times.clear()
        elif result is False:
            if probing:
                self._open_until = now + self._pause
                return
            self._times = [t for t in self._times if now - t < self._window]
            self._times.append(now)
            if len(self._times) >= self._failures:
                self._open_until = now + self._pause
                self._times.clear()


class Upstream:
    """One provider: its client, the base URL requests go to, its timeouts, and
    whether routes skip it for now (``cooldown``)."""

    def __init__(self, config: ProviderConfig, settings: Settings, base_url: str) -> None:
        self.name = config.name
        self.config = config
        self.base_url = base_url
        self.client: httpx.AsyncClient = create_client(settings, config)
        self.models = ModelList()
        self.first_token_timeout = config.first_token_timeout or settings.first_token_timeout
        # Played by a built-in simulator: it may be told whose session it serves.
        self.simulated = config.base_url is None
        self.cooldown = Cooldown(config.cooldown_failures, config.cooldown_window, config.cooldown)
        self.anthropic = config.kind == "anthropic"
        self.path = MESSAGES_PATH if self.anthropic else CHAT_PATH

    def request(
        self,
        payload: Mapping[str, Any],
        model: str,
        native: Mapping[str, Any] | None = None,
    ) -> Mapping[str, Any]:
        """What this provider is sent for the (checked, Chat Completions) ``payload``:
        the payload itself with ``model``, or its Messages form (``native``, the client's
        own Messages request, when it sent one). ``BadRequest`` naming a field Messages
        cannot take."""
        if self.anthropic:
            if native is not None:
                return {**native, "model": model}
            return messages_request(payload, model, self.config.max_tokens)
        if "thinking" in payload:
            # Anthropic's own field: an OpenAI-compatible provider is not sent it.
            payload = {k: v for k, v in payload.items() if k != "thinking"}
        if model != payload["model"]:
            return {**payload, "model": model}
        return payload

    def parser(self) -> ProviderStreamParser:
        """A parser for one of this provider's streams."""
        return AnthropicStreamParser() if self.anthropic else ProviderStreamParser()


@dataclass(frozen=True, slots=True)
class Plan:
    """The targets one stream tries, in order: (provider, the model name it is sent)."""

    route: RouteConfig
    targets: tuple[tuple[Upstream, str], ...]
    # What each target (provider name, model) is sent: ``prepare``'s.
    requests: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    def prepare(self, payload: Mapping[str, Any], native: Mapping[str, Any] | None = None) -> None:
        """Make what each target is sent, once, before any stream starts; a request some
        target's API cannot be sent is refused here (``BadRequest``)."""
        for provider, model in self.targets:
            self.requests[provider.name, model] = provider.request(payload, model, native)

    @property
    def anthropic_only(self) -> bool:
        return all(provider.anthropic for provider, _ in self.targets)

    def all_cooling(self, now: float) -> bool:
        """Every target is cooling down: the route then tries them all anyway, rather
        than fail a stream no provider was asked for."""
        return all(provider.cooldown.cooling(now) for provider, _ in self.targets)

    def falls_through(self, status: int | None) -> bool:
        """Whether a failed attempt with this provider status is followed by the next
        target: always without a status (connect error, timeout, a broken stream),
        on 408, 429 and 5xx, and on the 4xx the route names."""
        if status is None:
            return True
        return status in (408, 429) or status >= 500 or status in self.route.fall_through


class Providers:
    """Every configured provider's ``Upstream``, and the routes by model name."""

    def __init__(self, settings: Settings, simulated: Mapping[str, str] | None = None) -> None:
        """``simulated``: the base URL of each provider a built-in simulator plays."""
        providers, routes = settings.providers_and_routes()
        self._upstreams: dict[str, Upstream] = {}
        for config in providers:
            base_url = config.base_url or (simulated or {}).get(config.name)
            assert base_url is not None, "the built-in simulator has not started"
            self._upstreams[config.name] = Upstream(config, settings, base_url)
        self._routes: Mapping[str, RouteConfig] = {r.name: r for r in routes}

    def plan(self, model: str) -> Plan | None:
        """The targets for ``model``: its route's, or the catch-all's; ``None`` if no
        route serves it."""
        route = self._routes.get(model) or self._routes.get(CATCH_ALL)
        if route is None:
            return None
        return Plan(
            route,
            tuple((self._upstreams[t.provider], t.model or model) for t in route.targets),
        )

    def route_names(self) -> list[str]:
        """The model names routes serve, as configured (the catch-all left out)."""
        return [name for name in self._routes if name != CATCH_ALL]

    @property
    def catch_all(self) -> Upstream | None:
        """The first provider of the catch-all route, if there is one."""
        route = self._routes.get(CATCH_ALL)
        return self._upstreams[route.targets[0].provider] if route is not None else None

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._upstreams.values())

    async def aclose(self) -> None:
        """Close every provider's client, bounded."""
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            for upstream in self._upstreams.values():
                await upstream.client.aclose()

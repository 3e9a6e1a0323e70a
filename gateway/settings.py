"""Settings: one typed object, built once from the environment."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from .errors import ConfigError

_T = TypeVar("_T")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway reads from ``GATEWAY_*`` variables.

    ``upstream_url`` ``None`` means "run the built-in provider simulator".
    Durations are seconds; ``ping_interval`` 0 disables pings.
    """

    upstream_url: str | None = None
    upstream_api_key: str | None = None
    model: str = "simulator"
    connect_timeout: float = 10.0
    first_token_timeout: float = 120.0
    idle_timeout: float = 60.0
    max_duration: float = 600.0
    ping_interval: float = 15.0
    send_timeout: float = 10.0
    cancel_wait: float = 10.0
    upstream_max_connections: int = 1000
    log_level: str = "INFO"
    # Demo mode only: how long the built-in simulator's answers are, and how fast.
    simulator_tokens: int = 300
    simulator_rate: float = 40.0

    def __post_init__(self) -> None:
        if self.upstream_url is not None:
            url = self.upstream_url
            if not url.startswith(("http://", "https://")) or not url.rstrip("/").endswith("/v1"):
                raise ConfigError(
                    f"GATEWAY_UPSTREAM_URL must be an http(s) URL ending in /v1, got {url!r}"
                )
            object.__setattr__(self, "upstream_url", url.rstrip("/"))
        for name in (
            "connect_timeout",
            "first_token_timeout",
            "idle_timeout",
            "max_duration",
            "send_timeout",
            "cancel_wait",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{_env_name(name)} must be a positive number, got {value!r}")
        if not math.isfinite(self.ping_interval) or self.ping_interval < 0:
            raise ConfigError(f"GATEWAY_PING_INTERVAL must be >= 0, got {self.ping_interval!r}")
        if self.upstream_max_connections < 1:
            raise ConfigError("GATEWAY_UPSTREAM_MAX_CONNECTIONS must be >= 1")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError(
                f"GATEWAY_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}"
            )
        if not self.model:
            raise ConfigError("GATEWAY_MODEL must not be empty")
        if self.simulator_tokens < 1:
            raise ConfigError("GATEWAY_SIMULATOR_TOKENS must be >= 1")
        if not math.isfinite(self.simulator_rate) or self.simulator_rate <= 0:
            raise ConfigError(
                f"GATEWAY_SIMULATOR_RATE must be a positive number, got {self.simulator_rate!r}"
            )

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``GATEWAY_*`` variables; raise ``ConfigError`` naming the bad one."""
        env = os.environ if environ is None else environ
        upstream_url = env.get("GATEWAY_UPSTREAM_URL") or None
        model = env.get("GATEWAY_MODEL")
        if upstream_url is not None and not model:
            raise ConfigError("GATEWAY_MODEL is required when GATEWAY_UPSTREAM_URL is set")
        defaults = cls()
        return cls(
            upstream_url=upstream_url,
            upstream_api_key=env.get("GATEWAY_UPSTREAM_API_KEY") or None,
            model=model or defaults.model,
            connect_timeout=_read(env, "connect_timeout", float, defaults.connect_timeout),
            first_token_timeout=_read(
                env, "first_token_timeout", float, defaults.first_token_timeout
            ),
            idle_timeout=_read(env, "idle_timeout", float, defaults.idle_timeout),
            max_duration=_read(env, "max_duration", float, defaults.max_duration),
            ping_interval=_read(env, "ping_interval", float, defaults.ping_interval),
            send_timeout=_read(env, "send_timeout", float, defaults.send_timeout),
            cancel_wait=_read(env, "cancel_wait", float, defaults.cancel_wait),
            upstream_max_connections=_read(
                env, "upstream_max_connections", int, defaults.upstream_max_connections
            ),
            log_level=env.get("GATEWAY_LOG_LEVEL", defaults.log_level).upper(),
            simulator_tokens=_read(env, "simulator_tokens", int, defaults.simulator_tokens),
            simulator_rate=_read(env, "simulator_rate", float, defaults.simulator_rate),
        )


def _env_name(field: str) -> str:
    return "GATEWAY_" + field.upper()


def _read(env: Mapping[str, str], field: str, kind: Callable[[str], _T], default: _T) -> _T:
    raw = env.get(_env_name(field))
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{_env_name(field)} must be a {kind.__name__}, got {raw!r}") from None

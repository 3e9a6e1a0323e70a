"""Settings: one typed object, built once from the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .config import (
    CATCH_ALL,
    DEFAULT_PROVIDER,
    ProviderConfig,
    RouteConfig,
    Target,
    base_url_of,
    check_tls,
    read_config,
)
from .errors import ConfigError

_T = TypeVar("_T")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# What check_tls calls the GATEWAY_UPSTREAM_* provider's TLS settings.
_TLS_VARIABLES = {
    "ca_file": "GATEWAY_UPSTREAM_CA_FILE",
    "client_cert": "GATEWAY_UPSTREAM_CLIENT_CERT",
    "client_key": "GATEWAY_UPSTREAM_CLIENT_KEY",
}
# GATEWAY_MODEL's default: the built-in simulator's name.
_DEMO_MODEL = "simulator"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway reads from ``GATEWAY_*`` variables.

    ``upstream_url`` ``None`` means "run the built-in provider simulator".
    Durations are seconds; ``ping_interval`` 0 disables pings.
    """

    upstream_url: str | None = None
    upstream_api_key: str | None = None
    # TLS to the GATEWAY_UPSTREAM_URL provider (GATEWAY_CONFIG's providers have keys
    # of their own): a CA bundle trusted besides the system's, a client certificate
    # and key for mutual TLS (docs/operations.md).
    upstream_ca_file: str | None = None
    upstream_client_cert: str | None = None
    upstream_client_key: str | None = None
    model: str = _DEMO_MODEL
    connect_timeout: float = 10.0
    first_token_timeout: float = 120.0
    idle_timeout: float = 60.0
    max_duration: float = 600.0
    ping_interval: float = 15.0
    send_timeout: float = 10.0
    # How long a client may take to send its request body (408 after).
    body_timeout: float = 10.0
    cancel_wait: float = 10.0
    upstream_max_connections: int = 1000
    log_level: str = "INFO"
    # "text" or "json": one JSON object per line (docs/observability.md).
    log_format: str = "text"
    # Demo mode only: how long the built-in simulator's answers are, and how fast.
    simulator_tokens: int = 300
    simulator_rate: float = 40.0
    # ... and how long a reasoner model (simulator-reasoner) thinks first, in deltas.
    simulator_reasoning_tokens: int = 30
    # Who a request comes from (docs/security.md): bearer keys as (name, key) pairs,
    # or a header set by a trusted authenticating proxy; neither: one anonymous principal.
    api_keys: tuple[tuple[str, str], ...] = ()
    principal_header: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    # Limits on what clients may ask for.
    max_body_bytes: int = 1024 * 1024
    max_messages: int = 1000
    max_message_chars: int = 512 * 1024
    max_sessions_per_principal: int = 8
    max_sessions: int = 10_000
    # Scale-out (docs/scaling.md): unset, the registry is this process's alone.
    redis_url: str | None = None
    claim_ttl: float = 10.0
    # How long any one Redis command may take to answer; past it, Redis counts as
    # unavailable until it answers again (docs/scaling.md).
    redis_timeout: float = 0.5
    # GET /metrics needs "Authorization: Bearer <this>" when set (docs/observability.md).
    metrics_key: str | None = None
    # Off: no counting, and GET /metrics is a 404 (for the bench's A/B, or no Prometheus).
    metrics: bool = True
    # Resume after a dropped connection (docs/resume.md): 0 is off; else how long a
    # stream whose client left keeps going, waiting for it, and how many bytes of its
    # events are kept for a resume.
    resume_window: float = 0.0
    resume_buffer_bytes: int = 1024 * 1024
    # ... and how many bytes of the ended streams' events a process keeps in all.
    resume_total_bytes: int = 256 * 1024 * 1024
    # Bounds on what the gateway keeps of a provider's answers (docs/api.md).
    max_models_bytes: int = 1024 * 1024
    max_answer_bytes: int = 8 * 1024 * 1024
    # GATEWAY_CONFIG's providers and model routes (config.py, docs/routing.md); empty:
    # the GATEWAY_UPSTREAM_* provider serves every model (``providers_and_routes``).
    providers: tuple[ProviderConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.upstream_url is not None:
            try:
                object.__setattr__(self, "upstream_url", base_url_of(self.upstream_url))
            except ValueError as exc:
                raise ConfigError(f"GATEWAY_UPSTREAM_URL {exc}") from None
        upstream = (
            self.upstream_url,
            self.upstream_api_key,
            self.upstream_ca_file,
            self.upstream_client_cert,
            self.upstream_client_key,
        )
        if self.providers and any(v is not None for v in upstream):
            raise ConfigError(
                "set GATEWAY_CONFIG or the GATEWAY_UPSTREAM_* variables, not both: with "
                "GATEWAY_CONFIG, providers are its [providers.<name>] tables"
            )
        if not self.providers:
            try:
                check_tls(self.providers_and_routes()[0][0], _TLS_VARIABLES)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if bool(self.providers) != bool(self.routes):
            raise ConfigError("providers and routes come together, from GATEWAY_CONFIG")
        served = {r.name for r in self.routes}
        if self.routes and self.model not in served:
            named = [r.name for r in self.routes if r.name != CATCH_ALL]
            if self.model == _DEMO_MODEL and named:
                # Not chosen (the demo's default): a request without "model" goes to
                # the file's first named route.
                object.__setattr__(self, "model", named[0])
            elif CATCH_ALL not in served:
                raise ConfigError(
                    f"GATEWAY_MODEL {self.model!r} names no [models.<name>] of GATEWAY_CONFIG"
                )
        for name in (
            "connect_timeout",
            "first_token_timeout",
            "idle_timeout",
            "max_duration",
            "send_timeout",
            "body_timeout",
            "cancel_wait",
            "claim_ttl",
            "redis_timeout",
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
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"GATEWAY_LOG_FORMAT must be text or json, got {self.log_format!r}")
        if not self.model:
            raise ConfigError("GATEWAY_MODEL must not be empty")
        for name in (
            "max_body_bytes",
            "max_messages",
            "max_message_chars",
            "max_sessions_per_principal",
            "max_sessions",
            "max_models_bytes",
            "max_answer_bytes",
            "resume_total_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_env_name(name)} must be >= 1")
        names = [name for name, _ in self.api_keys]
        keys = [key for _, key in self.api_keys]
        for name, key in self.api_keys:
            if not name or ":" in name:
                raise ConfigError("each API key needs a name: entries are name:key")
            if len(key) < 16:
                raise ConfigError(f"the API key named {name!r} is shorter than 16 characters")
            if not (key.isascii() and key.isprintable()) or " " in key:
                # A header carries ASCII: such a key could never be presented.
                raise ConfigError(
                    f"the API key named {name!r} has characters other than printable "
                    "ASCII without spaces"
                )
        if len(set(names)) != len(names) or len(set(keys)) != len(keys):
            raise ConfigError("API key names and keys must each be unique")
        if self.api_keys and self.principal_header:
            raise ConfigError(
                "set either GATEWAY_API_KEYS(_FILE) or GATEWAY_PRINCIPAL_HEADER, not both"
            )
        if self.principal_header and not self.trusted_proxies:
            raise ConfigError(
                "GATEWAY_PRINCIPAL_HEADER needs GATEWAY_TRUSTED_PROXIES: the header is "
                "honoured only from them"
            )
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(
                    f"GATEWAY_TRUSTED_PROXIES: {proxy!r} is not an IP address or network"
                ) from None
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(f"GATEWAY_CORS_ORIGINS: {origin!r} is not an origin")
        if self.redis_url is not None:
            if self.redis_url.startswith("redis+sentinel://"):
                sentinel_service(self.redis_url)  # raises ConfigError, naming the problem
            elif not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(
                    "GATEWAY_REDIS_URL must be a redis://, rediss://, unix:// or "
                    "redis+sentinel:// URL"
                )
        if self.metrics_key is not None:
            if len(self.metrics_key) < 16:
                raise ConfigError("GATEWAY_METRICS_KEY must be at least 16 characters")
            if not (self.metrics_key.isascii() and self.metrics_key.isprintable()) or any(
                c.isspace() for c in self.metrics_key
            ):
                # A header carries ASCII: such a key could never be presented.
                raise ConfigError("GATEWAY_METRICS_KEY must be printable ASCII without spaces")
        if not math.isfinite(self.resume_window) or self.resume_window < 0:
            raise ConfigError(f"GATEWAY_RESUME_WINDOW must be >= 0, got {self.resume_window!r}")
        if self.resume_buffer_bytes < 1024:
            raise ConfigError("GATEWAY_RESUME_BUFFER_BYTES must be >= 1024")
        if self.simulator_tokens < 1:
            raise ConfigError("GATEWAY_SIMULATOR_TOKENS must be >= 1")
        if self.simulator_reasoning_tokens < 0:
            raise ConfigError("GATEWAY_SIMULATOR_REASONING_TOKENS must be >= 0")
        if not math.isfinite(self.simulator_rate) or self.simulator_rate <= 0:
            raise ConfigError(
                f"GATEWAY_SIMULATOR_RATE must be a positive number, got {self.simulator_rate!r}"
            )

    def providers_and_routes(self) -> tuple[tuple[ProviderConfig, ...], tuple[RouteConfig, ...]]:
        """GATEWAY_CONFIG's, or the GATEWAY_UPSTREAM_* provider (the built-in
        simulator without a URL) serving every model under the client's name for it."""
        if self.providers:
            return self.providers, self.routes
        provider = ProviderConfig(
            DEFAULT_PROVIDER,
            self.upstream_url,
            self.upstream_api_key,
            ca_file=self.upstream_ca_file,
            client_cert=self.upstream_client_cert,
            client_key=self.upstream_client_key,
        )
        route = RouteConfig(CATCH_ALL, (Target(DEFAULT_PROVIDER, None),))
        return (provider,), (route,)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``GATEWAY_*`` variables; raise ``ConfigError`` naming the bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        # Scalars by their declared type; the fields below are read as lists or
        # normalized first.
        for field in dataclasses.fields(cls):
            kind = _SCALARS.get(str(field.type))
            if kind is not None:
                given = env.get(_env_name(field.name), "")
                raw = given.strip()
                if raw:
                    values[field.name] = _parse(field.name, raw, kind)
                elif given and field.name in _SECRETS:
                    # Set, but to blanks: never read as "unset", which would open the
                    # door the key was meant to guard.
                    raise ConfigError(f"{_env_name(field.name)} is set but blank")
        config = env.get("GATEWAY_CONFIG", "").strip()
        if config:
            values["providers"], values["routes"] = read_config(config, env)
        elif values.get("upstream_url") is not None and "model" not in values:
            raise ConfigError("GATEWAY_MODEL is required when GATEWAY_UPSTREAM_URL is set")
        if "log_level" in values:
            values["log_level"] = values["log_level"].upper()
        if "log_format" in values:
            values["log_format"] = values["log_format"].lower()
        if "principal_header" in values:
            values["principal_header"] = values["principal_header"].lower()
        return cls(
            **values,
            api_keys=_api_keys(env),
            trusted_proxies=_list(env, "GATEWAY_TRUSTED_PROXIES"),
            cors_origins=tuple(o.rstrip("/") for o in _list(env, "GATEWAY_CORS_ORIGINS")),
        )


def _switch(raw: str) -> bool:
    value = raw.lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(raw)


# A key whose variable is set to blanks is an error, not the default (no key: open).
_SECRETS = frozenset({"metrics_key"})

# How each scalar field's variable is read, by the field's declared type; a blank
# variable means the default.
_SCALARS: dict[str, Callable[[str], object]] = {
    "bool": _switch,
    "float": float,
    "int": int,
    "str": str,
    "str | None": str,
}


def _parse(field: str, raw: str, kind: Callable[[str], _T]) -> _T:
    try:
        return kind(raw)
    except ValueError:
        what = "on or off" if kind is _switch else f"a {kind.__name__}"
        raise ConfigError(f"{_env_name(field)} must be {what}, got {raw!r}") from None


def sentinel_service(url: str) -> tuple[list[tuple[str, int]], str]:
    """``redis+sentinel://host:port[,host:port...]/service``: the Sentinels to ask, and
    the name of the service whose primary they know."""
    parts = urllib.parse.urlsplit(url)
    service = parts.path.strip("/")
    hosts: list[tuple[str, int]] = []
    for node in parts.netloc.split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"GATEWAY_REDIS_URL: a Sentinel must be host:port, got {node!r} in {url!r}"
            )
        hosts.append((host.strip("[]"), int(port)))
    if not service or "/" in service:
        raise ConfigError(
            f"GATEWAY_REDIS_URL must name the Sentinel service: "
            f"redis+sentinel://host:port/<service>, got {url!r}"
        )
    return hosts, service


def _env_name(field: str) -> str:
    return "GATEWAY_" + field.upper()


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _api_keys(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``GATEWAY_API_KEYS`` (``name:key,...``) and the lines of ``GATEWAY_API_KEYS_FILE``
    (``name:key``; blank lines and ``#`` comments skipped). Never echoes a key."""
    entries = list(_list(env, "GATEWAY_API_KEYS"))
    path = env.get("GATEWAY_API_KEYS_FILE")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"GATEWAY_API_KEYS_FILE: cannot read {path}: {exc}") from None
        entries += [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    pairs = []
    for i, entry in enumerate(entries, 1):
        name, sep, key = entry.partition(":")
        if not sep:
            raise ConfigError(f"API key entry {i} is not name:key")
        pairs.append((name.strip(), key.strip()))
    return tuple(pairs)

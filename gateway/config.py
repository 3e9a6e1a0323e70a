"""``GATEWAY_CONFIG``: the providers and the model routes, typed, read once at start.

A TOML file (docs/routing.md): ``[providers.<name>]`` tables, each a provider's base
URL, key (from the environment only), auth header, query and headers, and timeouts of
its own; ``[models.<name>]`` tables, each the name clients send as ``model`` and the
targets it is served by, in order. Anything wrong stops the gateway at start-up with
a message naming the file, the table and the key.

Without the file, the ``GATEWAY_UPSTREAM_*`` variables are one provider (``default``)
and one route (``*``) that sends every model to it under the name the client gave.
"""

from __future__ import annotations

import math
import os
import re
import ssl
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "CATCH_ALL",
    "DEFAULT_PROVIDER",
    "FALL_THROUGH_STATUSES",
    "KINDS",
    "ProviderConfig",
    "RouteConfig",
    "Target",
    "check_tls",
    "load_tls",
    "read_config",
]

# The route that serves a model no other route names.
CATCH_ALL = "*"
DEFAULT_PROVIDER = "default"
# A provider's answers that a route may also fall through on (``fall_through``); the
# next target is always tried on a connect error, a timeout, 408, 429 and 5xx.
FALL_THROUGH_STATUSES = frozenset({400, 401, 403, 404})

# The Messages API version the gateway speaks (the ``anthropic-version`` header).
ANTHROPIC_VERSION = "2023-06-01"
# Names end up in metric labels and log lines: short, plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# RFC 9110 token characters, for a header's name.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STRATEGIES = ("fallback", "hedge")
# The APIs a provider speaks: Chat Completions, or Anthropic's Messages.
KINDS = ("openai", "anthropic")
# Anthropic requires max_tokens; a request that gives none is sent this many.
_ANTHROPIC_MAX_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One provider. ``base_url`` ``None``: the built-in simulator (demo mode, or a
    ``simulate`` table).

    ``auth_header`` ``authorization`` sends ``Bearer <key>``; any other name sends the
    key as it is (Azure's ``api-key``). The timeouts are ``None`` where the provider
    keeps the gateway's (``GATEWAY_CONNECT_TIMEOUT``, ``GATEWAY_FIRST_TOKEN_TIMEOUT``).
    """

    name: str
    base_url: str | None
    api_key: str | None = None
    # The API it speaks (KINDS): "anthropic" is sent Messages requests at
    # ``<base>/messages`` with ``x-api-key`` and ``anthropic-version``.
    kind: str = "openai"
    # Anthropic's: the max_tokens of a request that names none.
    max_tokens: int = _ANTHROPIC_MAX_TOKENS
    # A simulated provider (the built-in simulator; ``base_url`` ``None``): its
    # behaviour, as SimulatorConfig's fields (``simulate = { status = 429 }``).
    simulate: tuple[tuple[str, int | float | str], ...] = ()
    auth_header: str = "authorization"
    headers: tuple[tuple[str, str], ...] = ()
    connect_timeout: float | None = None
    first_token_timeout: float | None = None
    # Skipped by routes for ``cooldown`` seconds once it has failed
    # ``cooldown_failures`` times within ``cooldown_window`` seconds (per instance).
    cooldown_failures: int = 3
    cooldown_window: float = 30.0
    cooldown: float = 30.0
    # TLS to an https provider (docs/operations.md): a PEM bundle trusted besides the
    # system's, for this provider only; a client certificate and key for mutual TLS;
    # ``verify`` False (a start-up warning names the provider) trusts any certificate.
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True)
class Target:
    """A provider and the model name sent to it; ``model`` ``None``: the client's."""

    provider: str
    model: str | None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A model name clients send, and the targets that serve it, in order."""

    name: str
    targets: tuple[Target, ...]
    strategy: str = "fallback"
    hedge_after: float = 1.5
    # Statuses of FALL_THROUGH_STATUSES on which this route tries its next target too.
    fall_through: frozenset[int] = frozenset()


def read_config(
    path: str, environ: Mapping[str, str] | None = None
) -> tuple[tuple[ProviderConfig, ...], tuple[RouteConfig, ...]]:
    """The providers and routes of the TOML file at ``path``; keys are read from
    ``environ`` (the process's environment by default)."""
    env = os.environ if environ is None else environ
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"GATEWAY_CONFIG: cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"GATEWAY_CONFIG: {path} is not valid TOML: {exc}") from None
    reader = _Reader(path)
    reader.only(data, "", {"providers", "models"})
    providers = tuple(
        _provider(reader, name, table, env)
        for name, table in reader.tables(data, "providers").items()
    )
    if not providers:
        raise ConfigError(f"GATEWAY_CONFIG: {path} has no [providers.<name>] table")
    routes = tuple(
        _route(reader, name, table, {p.name for p in providers})
        for name, table in reader.tables(data, "models").items()
    )
    if not routes:
        raise ConfigError(f"GATEWAY_CONFIG: {path} has no [models.<name>] table")
    return providers, routes


class _Reader:
    """Typed reads of a table's keys, each failure naming the file, table and key."""

    def __init__(self, path: str) -> None:
        self._path = path

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"GATEWAY_CONFIG: {self._path}: [{where}] {message}")

    def tables(self, data: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be tables, as [{key}.<name>]")
        for name, table in value.items():
            where = f'{key}."{name}"'
            if not isinstance(table, dict):
                raise self.fail(where, "must be a table")
            if key == "providers" and not _NAME.fullmatch(name):
                # A provider's name is a metric label and a log field.
                raise self.fail(where, "name must be letters, digits, '_', '.', '-' (at most 64)")
            if key == "models" and not (0 < len(name) <= 256 and name.isprintable()):
                # The name clients send as "model" (an Ollama tag, a path-like id).
                raise self.fail(where, "name must be printable, at most 256 characters")
        return value

    def only(self, table: dict[str, Any], where: str, keys: set[str]) -> None:
        unknown = sorted(set(table) - keys)
        if unknown:
            known = ", ".join(sorted(keys))
            raise self.fail(where or "top level", f"unknown key {unknown[0]!r} (known: {known})")

    def string(self, table: dict[str, Any], where: str, key: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"{key} must be a non-empty string")
        return value

    def seconds(self, table: dict[str, Any], where: str, key: str) -> float | None:
        value = table.get(key)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise self.fail(where, f"{key} must be a positive number of seconds, got {value!r}")
        return float(value)

    def pairs(self, table: dict[str, Any], where: str, key: str) -> tuple[tuple[str, str], ...]:
        value = table.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self.fail(where, f"{key} must be an inline table of strings")
        return tuple(value.items())


# What a simulated provider may be told (gateway/tools/simulator.py, SimulatorConfig).
SIMULATE_KEYS: dict[str, type] = {
    "tokens": int,
    "rate": float,
    "status": int,
    "stall_after": int,
    "reset_after": int,
    "headers_delay": float,
    "queue_seconds": float,
    "reasoning_tokens": int,
    "mode": str,
}

_PROVIDER_KEYS = {
    "simulate",
    "cooldown",
    "cooldown_failures",
    "cooldown_window",
    "base_url",
    "api_key_env",
    "auth_header",
    "query",
    "headers",
    "connect_timeout",
    "first_token_timeout",
    "ca_file",
    "client_cert",
    "client_key",
    "verify",
    "kind",
    "max_tokens",
}


def _provider(
    reader: _Reader, name: str, table: dict[str, Any], env: Mapping[str, str]
) -> ProviderConfig:
    where = f'providers."{name}"'
    reader.only(table, where, _PROVIDER_KEYS)
    raw_url = reader.string(table, where, "base_url")
    simulate = _simulate(reader, table, where)
    if (raw_url is None) == ("simulate" not in table):
        raise reader.fail(where, "base_url is required (or a simulate table, not both)")
    base_url = None
    if raw_url is not None:
        try:
            base_url = base_url_of(raw_url, dict(reader.pairs(table, where, "query")))
        except ValueError as exc:
            raise reader.fail(where, f"base_url {exc}") from None
    api_key = None
    key_env = reader.string(table, where, "api_key_env")
    if key_env is not None:
        api_key = env.get(key_env, "").strip()
        if not api_key:
            raise reader.fail(where, f"api_key_env names {key_env}, which is not set")
        if not (api_key.isascii() and api_key.isprintable()):
            raise reader.fail(where, f"the key in {key_env} is not printable ASCII")
    kind = reader.string(table, where, "kind") or "openai"
    if kind not in KINDS:
        raise reader.fail(where, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    default_auth = "x-api-key" if kind == "anthropic" else "authorization"
    auth_header = (reader.string(table, where, "auth_header") or default_auth).lower()
    headers = reader.pairs(table, where, "headers")
    if kind == "anthropic" and not any(h.lower() == "anthropic-version" for h, _ in headers):
        headers = (*headers, ("anthropic-version", ANTHROPIC_VERSION))
    for header, value in (("auth_header", auth_header), *headers):
        if not _HEADER_NAME.fullmatch(header):
            raise reader.fail(where, f"{header!r} is not a header name")
        if any(c in value for c in "\r\n\0"):
            raise reader.fail(where, f"the value of header {header!r} has a line break")
    verify = table.get("verify", True)
    if not isinstance(verify, bool):
        raise reader.fail(where, f"verify must be true or false, got {verify!r}")
    provider = ProviderConfig(
        name=name,
        base_url=base_url,
        api_key=api_key,
        kind=kind,
        max_tokens=_count(reader, table, where, "max_tokens", _ANTHROPIC_MAX_TOKENS),
        simulate=simulate,
        auth_header=auth_header,
        headers=headers,
        connect_timeout=reader.seconds(table, where, "connect_timeout"),
        first_token_timeout=reader.seconds(table, where, "first_token_timeout"),
        cooldown_failures=_count(reader, table, where, "cooldown_failures", 3),
        cooldown_window=reader.seconds(table, where, "cooldown_window") or 30.0,
        cooldown=reader.seconds(table, where, "cooldown") or 30.0,
        ca_file=reader.string(table, where, "ca_file"),
        client_cert=reader.string(table, where, "client_cert"),
        client_key=reader.string(table, where, "client_key"),
        verify=verify,
    )
    try:
        check_tls(provider)
    except ValueError as exc:
        raise reader.fail(where, str(exc)) from None
    return provider


def check_tls(provider: ProviderConfig, names: Mapping[str, str] | None = None) -> None:
    """``ValueError`` saying what is wrong with the provider's TLS settings: a file
    missing or unreadable, not PEM, a key that does not match its certificate, TLS
    settings for a provider that is not https. ``names``: what to call each setting
    (the variables, for the ``GATEWAY_UPSTREAM_*`` provider)."""
    name = {"ca_file": "ca_file", "client_cert": "client_cert", "client_key": "client_key"}
    name.update(names or {})
    given = [k for k in ("ca_file", "client_cert", "client_key") if getattr(provider, k)]
    if not given and provider.verify:
        return
    if provider.base_url is None or not provider.base_url.startswith("https:"):
        what = name[given[0]] if given else "verify"
        raise ValueError(f"{what} is for an https base_url")
    if (provider.client_cert is None) != (provider.client_key is None):
        raise ValueError(f"{name['client_cert']} and {name['client_key']} come together")
    # A bare context: the files are checked without loading the system's trust.
    load_tls(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), provider, name)


def _no_password() -> bytes:
    return b""


def load_tls(
    context: ssl.SSLContext, provider: ProviderConfig, names: Mapping[str, str] | None = None
) -> None:
    """Add the provider's CA bundle to ``context``'s trust and its client certificate
    to what it presents; ``ValueError`` naming the file that cannot be used."""
    name = dict(names or {})
    for key in ("ca_file", "client_cert", "client_key"):
        path = getattr(provider, key)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name.get(key, key)} {path}: no such file")
    for key, path in (("ca_file", provider.ca_file), ("client_cert", provider.client_cert)):
        if path is None:
            continue
        what = name.get(key, key)
        try:
            if key == "ca_file":
                context.load_verify_locations(cafile=path)
            else:
                # An encrypted key is refused, never asked for on the terminal.
                context.load_cert_chain(path, provider.client_key, password=_no_password)
        except OSError as exc:
            # ssl.SSLError is an OSError: not PEM, or a key that is not the
            # certificate's; a plain OSError: not readable.
            if not isinstance(exc, ssl.SSLError):
                reason = str(exc.strerror)
            elif key == "ca_file":
                reason = "not a PEM bundle of certificates"
            elif exc.reason == "KEY_VALUES_MISMATCH":
                key_name = name.get("client_key", "client_key")
                reason = f"{key_name} {provider.client_key} is not its key"
            else:
                reason = (
                    f"not a PEM certificate with {name.get('client_key', 'client_key')} "
                    f"{provider.client_key} its unencrypted PEM key"
                )
            raise ValueError(f"{what} {path} cannot be used: {reason}") from None


def _simulate(
    reader: _Reader, table: dict[str, Any], where: str
) -> tuple[tuple[str, int | float | str], ...]:
    value = table.get("simulate", {})
    if not isinstance(value, dict):
        raise reader.fail(where, "simulate must be an inline table, as simulate = { status = 429 }")
    fields: list[tuple[str, int | float | str]] = []
    for key, given in value.items():
        kind = SIMULATE_KEYS.get(key)
        if kind is None:
            known = ", ".join(sorted(SIMULATE_KEYS))
            raise reader.fail(where, f"simulate has an unknown key {key!r} (known: {known})")
        ok = (
            isinstance(given, str)
            if kind is str
            else (isinstance(given, int | float) and not isinstance(given, bool) and given >= 0)
        )
        if not ok or (kind is int and not isinstance(given, int)):
            raise reader.fail(where, f"simulate.{key} must be a {kind.__name__} (>= 0)")
        fields.append((key, kind(given)))
    return tuple(fields)


def _count(reader: _Reader, table: dict[str, Any], where: str, key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise reader.fail(where, f"{key} must be a whole number >= 1, got {value!r}")
    return value


def _route(reader: _Reader, name: str, table: dict[str, Any], providers: set[str]) -> RouteConfig:
    where = f'models."{name}"'
    reader.only(table, where, {"targets", "strategy", "hedge_after", "fall_through"})
    raw_targets = table.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise reader.fail(where, "targets must be a non-empty list of {provider, model}")
    targets = []
    for i, target in enumerate(raw_targets):
        at = f"{where} targets[{i}]"
        if not isinstance(target, dict):
            raise reader.fail(where, f"targets[{i}] must be {{ provider = ..., model = ... }}")
        unknown = sorted(set(target) - {"provider", "model"})
        if unknown:
            raise reader.fail(at, f"unknown key {unknown[0]!r} (known: model, provider)")
        provider = target.get("provider")
        if provider not in providers:
            raise reader.fail(at, f"provider {provider!r} is not a [providers.<name>] table")
        model = target.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise reader.fail(at, "model must be a non-empty string")
        if model is None and name != CATCH_ALL:
            model = name
        targets.append(Target(provider, model))
    strategy = reader.string(table, where, "strategy") or "fallback"
    if strategy not in _STRATEGIES:
        raise reader.fail(where, f"strategy must be fallback or hedge, got {strategy!r}")
    fall_through = table.get("fall_through", [])
    if not isinstance(fall_through, list) or not set(fall_through) <= FALL_THROUGH_STATUSES:
        raise reader.fail(where, "fall_through must be a list of 400, 401, 403, 404")
    return RouteConfig(
        name=name,
        targets=tuple(targets),
        strategy=strategy,
        hedge_after=reader.seconds(table, where, "hedge_after") or 1.5,
        fall_through=frozenset(fall_through),
    )


def base_url_of(url: str, query: Mapping[str, str] | None = None) -> str:
    """Any http(s) base of an OpenAI-compatible API, ``query`` added to its own:
    ``.../v1``, Gemini's ``.../v1beta/openai``, a proxy's path, an Azure deployment
    with ``api-version``. Requests go to ``<base>/chat/completions`` (query kept).
    ``ValueError`` saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {url!r}")
    if parts.fragment:
        raise ValueError(f"must not have a #fragment, got {url!r}")
    parts = parts._replace(path=parts.path.rstrip("/"))
    if query:
        given = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        parts = parts._replace(query=urllib.parse.urlencode([*given, *query.items()]))
    return urllib.parse.urlunsplit(parts)

"""Who a request comes from: the principal its sessions belong to (docs/security.md).

Three modes, from the settings:
- none: every request is the one anonymous principal (local development);
- bearer keys: ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as the
  Anthropic SDKs send it) names the principal; a wrong or missing key is a 401;
- trusted header: the application's own authenticating proxy sets a header naming
  the user; it is honoured only from ``GATEWAY_TRUSTED_PROXIES``, so a client that
  reaches the gateway directly cannot claim to be someone else.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.datastructures import Headers

from ..core.registry import ANONYMOUS
from ..errors import BadRequest, Unauthorized
from ..settings import Settings

__all__ = ["Authenticator", "check_bearer"]

_MAX_PRINCIPAL_CHARS = 256
_CHALLENGE = {"www-authenticate": 'Bearer realm="gateway"'}


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self._keys = [(name, key.encode()) for name, key in settings.api_keys]
        self._header = settings.principal_header
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]

    def principal(self, headers: Headers, client: str | None) -> str:
        """The principal of a request from the peer address ``client``; raise
        ``Unauthorized`` if it has none."""
        if self._keys:
            return self._from_key(headers)
        if self._header:
            if client is None or not self._trusted(client):
                raise Unauthorized("requests must come through the authenticating proxy")
            return self._from_proxy(_one(headers, self._header))
        return ANONYMOUS

    def _from_key(self, headers: Headers) -> str:
        # ``x-api-key``: where the Anthropic SDKs send the key (ANTHROPIC_API_KEY).
        given = _bearer(headers) or _api_key(headers)
        if given is None:
            raise Unauthorized(
                "an API key is required: Authorization: Bearer <key> (or x-api-key: <key>)",
                headers=_CHALLENGE,
            )
        found = None
        # Every key is compared, each in constant time: no timing tells which matched.
        for name, key in self._keys:
            if hmac.compare_digest(given, key):
                found = name
        if found is None:
            raise Unauthorized("the API key is not valid", headers=_CHALLENGE)
        return found

    def _from_proxy(self, value: str | None) -> str:
        principal = (value or "").strip()
        if not principal or len(principal) > _MAX_PRINCIPAL_CHARS or not principal.isprintable():
            raise Unauthorized("the authenticating proxy did not name a user")
        return principal

    def _trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._proxies)


def check_bearer(headers: Headers, key: str, realm: str, message: str) -> None:
    """Raise ``Unauthorized`` unless the request presents ``Bearer <key>`` (compared in
    constant time); for endpoints with a key of their own, such as /metrics."""
    given = _bearer(headers)
    if given is None or not hmac.compare_digest(given, key.encode()):
        raise Unauthorized(message, headers={"www-authenticate": f'Bearer realm="{realm}"'})


def _bearer(headers: Headers) -> bytes | None:
    """The credential of ``Authorization: Bearer <credential>``, or None."""
    scheme, _, credential = (_one(headers, "authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip().encode()


def _api_key(headers: Headers) -> bytes | None:
    value = (_one(headers, "x-api-key") or "").strip()
    return value.encode() if value else None


def _one(headers: Headers, name: str) -> str | None:
    """The header's value; sent twice, it names nobody for sure (proxies and servers
    disagree on which copy counts), so the request is refused."""
    values = headers.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"the {name} header was sent more than once", code="ambiguous_header")
    return values[0] if values else None

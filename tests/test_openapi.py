"""/openapi.json is kept true: every route described, and schemathesis finds no 5xx
and no answer that the description does not allow, on a running gateway."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from starlette.routing import Route

from gateway import Settings, create_app
from gateway.web.openapi import openapi
from gateway.web.validation import FORWARDED_FIELDS

from .processes import WAIT, Gateway

# A generated body that breaks the schema may also be over the body limit: 413 refuses it
# as surely as 400 (schemathesis's list of refusals leaves it out).
_REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
# /v1/messages: a request the schema allows may have no Chat Completions form (top_k, a
# document), which an OpenAI-compatible provider (the demo's) cannot be sent: a 400
# naming the field (docs/api.md). Whether it is depends on the route, not the schema.
_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
SCHEMA = schemathesis.openapi.from_dict(
    openapi(Settings()),
    config=SchemathesisConfig.from_dict(
        {
            "checks": {"negative_data_rejection": {"expected-statuses": _REFUSALS}},
            "operations": [
                {
                    "include-path": "/v1/messages",
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": [*_ACCEPTED, "400"]}
                    },
                }
            ],
        }
    ),
)


def test_the_chat_body_describes_every_field_forwarded_to_the_provider() -> None:
    chat = openapi(Settings())["paths"]["/api/chat/stream"]["post"]["requestBody"]
    described = chat["content"]["application/json"]["schema"]["properties"]
    assert set(described) == {"messages", "model", *FORWARDED_FIELDS}


def test_every_route_is_described_and_nothing_else() -> None:
    app = create_app(Settings())
    routes = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    described = {
        (path, method) for path, item in openapi(Settings())["paths"].items() for method in item
    }
    assert routes == described


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    # Short, fast simulated answers: a generated request that streams ends at once.
    gw = Gateway(request.param, GATEWAY_SIMULATOR_TOKENS="3", GATEWAY_SIMULATOR_RATE="1000")
    try:
        yield gw
    finally:
        gw.stop()
    assert not any("Traceback" in line for line in gw.lines), "\n".join(gw.lines)


@pytest.mark.slow
def test_the_served_description_is_the_one_tested(gateway: Gateway) -> None:
    served = httpx.get(f"{gateway.url}/openapi.json", timeout=WAIT).json()
    assert served == openapi(Settings())


@SCHEMA.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.slow
def test_the_api_matches_its_description(case: Any, gateway: Gateway) -> None:
    case.call_and_validate(base_url=gateway.url, timeout=WAIT)

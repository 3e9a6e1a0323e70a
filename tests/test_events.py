from __future__ import annotations

import pytest

from gateway.events import encode_event, encode_token


@pytest.mark.parametrize(
    "delta",
    [
        "Hello",
        " world",
        "",
        'quote " and \\ backslash',
        "line\nbreak\r\nand\rcr",
        "w\u00f6rld \U0001f600",
        "\u2028\u2029\x00\x1f",
        "</script>",
    ],
)
def test_token_template_matches_the_sse_starlette_encoding(delta: str) -> None:
    assert encode_token(42, delta) == encode_event("token", 42, {"delta": delta})

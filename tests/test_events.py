from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sse_starlette.event import JSONServerSentEvent

from gateway.core.events import encode_event, encode_reasoning, encode_token, json_string, json_text

DELTAS = [
    "Hello",
    " world",
    "",
    'quote " and \\ backslash',
    "line\nbreak\r\nand\rcr",
    "w\u00f6rld \U0001f600",
    "\u2028\u2029\x00\x1f",
    "</script>",
]


@pytest.mark.parametrize("delta", DELTAS)
def test_token_template_matches_the_event_encoding(delta: str) -> None:
    assert encode_token(42, delta) == encode_event("token", 42, {"delta": delta})
    assert encode_reasoning(42, delta) == encode_event("reasoning", 42, {"delta": delta})


@pytest.mark.parametrize("delta", [d for d in DELTAS if "\u2028" not in d])
def test_the_framing_is_sse_starlettes(delta: str) -> None:
    expected = JSONServerSentEvent({"delta": delta}, event="token", id="42", sep="\n").encode()
    assert encode_event("token", 42, {"delta": delta}) == expected


@pytest.mark.parametrize("text", ["a\u2028b", "\u2029", "x\u2028\u2029y\u2028"])
def test_line_separators_are_escaped_in_every_event(text: str) -> None:
    for encoded in (encode_token(1, text), encode_event("done", 2, {"usage": {"note": text}})):
        # Python's splitlines (and httpx's iter_lines) split at U+2028/U+2029:
        # the event must still be exactly its three lines and the blank one.
        lines = encoded.decode().splitlines()
        assert len(lines) == 4, lines
        assert lines[3] == ""
        assert lines[2].startswith("data: ")
        parsed = json.loads(lines[2][6:])
        assert text in (parsed.get("delta"), parsed.get("usage", {}).get("note"))


# Built with chr(): ruff reads the escapes "\ud83d" and "\ude00" as the same text.
@pytest.mark.parametrize(
    "text", [chr(0xD83D), chr(0xDE00), f"a{chr(0xD800)}b{chr(0xDFFF)}", f"\U0001f600{chr(0xD83D)}"]
)
def test_a_lone_surrogate_is_escaped_so_every_event_encodes(text: str) -> None:
    # JSON's "\ud83d" escape decodes to a lone surrogate (a provider may split an emoji
    # across two chunks); no UTF-8 encoder writes one raw.
    for encoded in (
        encode_token(1, text),
        encode_reasoning(1, text),
        encode_event("tool_call", 2, {"arguments": text}),
    ):
        data = encoded.decode().splitlines()[2]
        assert data.startswith("data: ")
        parsed = json.loads(data[6:])
        assert text in (parsed.get("delta"), parsed.get("arguments"))


@given(
    text=st.text(st.characters(exclude_categories=()))
    | st.text(st.characters(max_codepoint=127))
    | st.lists(st.sampled_from([chr(0xD83D), chr(0xDE00), "a", "\u2028"])).map("".join)
)
def test_a_deltas_json_is_json_texts_whatever_the_text(text: str) -> None:
    # The hot path writes ASCII text with msgspec: the same bytes as json_text.
    assert json_string(text) == json_text(text).encode()
    # A high and a low surrogate side by side (two deltas joined) parse as their pair.
    joined = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    assert json.loads(json_string(text)) == joined

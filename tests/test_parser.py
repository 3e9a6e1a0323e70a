"""The provider-stream parser under arbitrary chunk splits and malformed input."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import ProviderStreamParser, UpstreamProtocolError, UpstreamStatusError
from gateway.parser import ParsedChunk


def _chunk(content: str | None = None, finish: str | None = None, usage: bool = False) -> bytes:
    delta = {} if content is None else {"content": content}
    body: dict[str, object] = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body = {"choices": [], "usage": {"completion_tokens": 3}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = (
    b": keep-alive\n\n"
    + _chunk("")
    + _chunk("Hel")
    + b": keep-alive\n\n"
    + _chunk("lo, ")
    + _chunk("w\u00f6rld \U0001f600")
    + _chunk(None, "stop")
    + _chunk(usage=True)
    + b"data: [DONE]\n\n"
)


def _parse(pieces: list[bytes]) -> ParsedChunk:
    parser = ProviderStreamParser()
    total = ParsedChunk()
    for piece in pieces:
        out = parser.feed(piece)
        total.deltas += out.deltas
        total.finish_reason = out.finish_reason or total.finish_reason
        total.usage = out.usage or total.usage
        total.done = total.done or out.done
    return total


def _check(result: ParsedChunk) -> None:
    assert "".join(result.deltas) == "Hello, w\u00f6rld \U0001f600"
    assert result.finish_reason == "stop"
    assert result.usage == {"completion_tokens": 3}
    assert result.done


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_two_way_split(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    for i in range(len(stream) + 1):
        _check(_parse([stream[:i], stream[i:]]))


def test_random_splits() -> None:
    rng = random.Random(1234)
    stream = STREAM.replace(b"\n", b"\r\n")
    for _ in range(500):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 30)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        _check(_parse(pieces))


def test_keepalive_comments_produce_nothing() -> None:
    out = ProviderStreamParser().feed(b": keep-alive\n\n: keep-alive\n\n")
    assert out == ParsedChunk()


def test_multiline_data_is_joined() -> None:
    out = ProviderStreamParser().feed(
        b'data: {"choices":\ndata: [{"delta": {"content": "a"}}]}\n\n'
    )
    assert out.deltas == ["a"]


def test_data_without_space_after_colon() -> None:
    out = ProviderStreamParser().feed(b'data:{"choices":[{"delta":{"content":"z"}}]}\n\n')
    assert out.deltas == ["z"]


def test_nothing_after_done_counts() -> None:
    parser = ProviderStreamParser()
    assert parser.feed(b"data: [DONE]\n\n").done
    assert parser.feed(_chunk("late")).deltas == []


@pytest.mark.parametrize(
    "data",
    [
        b"data: {not json\n\n",
        b"data: [1, 2]\n\n",
        b'data: {"choices": 5}\n\n',
        b'data: {"choices": [5]}\n\n',
        b'data: {"choices": [{"delta": {"content": 5}}]}\n\n',
        b'data: {"choices": [{"delta": {"content": "\xff\xfe"}}]}\n\n',
    ],
)
def test_malformed_input_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ProviderStreamParser().feed(data)


def test_line_longer_than_the_bound_is_refused_without_buffering_it() -> None:
    parser = ProviderStreamParser(max_line_bytes=1000)
    parser.feed(b"data: " + b"a" * 900)
    with pytest.raises(UpstreamProtocolError, match="longer than 1000"):
        parser.feed(b"a" * 200)


def test_event_larger_than_the_bound_is_refused() -> None:
    parser = ProviderStreamParser(max_line_bytes=1000)
    with pytest.raises(UpstreamProtocolError, match="over 1000"):
        parser.feed(b"data: " + b"a" * 600 + b"\ndata: " + b"b" * 600 + b"\n")


def test_error_object_in_stream_is_upstream_error_with_a_safe_message() -> None:
    # The free text may echo the prompt or account details: only the type is passed on.
    chunk = b'data: {"error": {"message": "key sk-123 of bob@example.com", "type": "rate_limit"}}'
    with pytest.raises(UpstreamStatusError) as info:
        ProviderStreamParser().feed(chunk + b"\n\n")
    assert info.value.message == "provider sent an error: rate_limit"
    with pytest.raises(UpstreamStatusError) as info:
        ProviderStreamParser().feed(b'data: {"error": {"message": "secret", "type": "a b"}}\n\n')
    assert info.value.message == "provider sent an error"


_ENDINGS = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def _provider_streams(draw: st.DrawFn) -> tuple[bytes, list[str], str, dict[str, int]]:
    """A valid provider stream, with its deltas, finish reason and usage."""
    deltas = draw(st.lists(st.text(min_size=1, max_size=8), max_size=12))
    ending = draw(_ENDINGS)
    lines: list[str] = []

    def event(chunk: object) -> None:
        # One data: line, or the JSON over several (joined with "\n" it is the same JSON).
        text = json.dumps(chunk, indent=draw(st.sampled_from([None, 1])))
        lines.extend("data: " + piece for piece in text.split("\n"))
        lines.append("")

    for delta in deltas:
        if draw(st.booleans()):
            lines += [": keep-alive", ""]
        event({"choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]})
    finish = draw(st.sampled_from(["stop", "length"]))
    usage = {"prompt_tokens": draw(st.integers(0, 9)), "completion_tokens": len(deltas)}
    event({"choices": [{"delta": {}, "finish_reason": finish}]})
    event({"choices": [], "usage": usage})
    lines += ["data: [DONE]", ""]
    text = "".join(line + ending for line in lines)
    return text.encode(), deltas, finish, usage


@given(stream=_provider_streams(), data=st.data())
def test_any_split_of_a_valid_stream_parses_the_same(
    stream: tuple[bytes, list[str], str, dict[str, int]], data: st.DataObject
) -> None:
    raw, deltas, finish, usage = stream
    # Anywhere, and often right after a CR: a CRLF split across reads is the hard case.
    after_cr = [i + 1 for i, byte in enumerate(raw) if byte == 13] or [0]
    anywhere = st.integers(0, len(raw))
    cuts = sorted(data.draw(st.lists(anywhere | st.sampled_from(after_cr), max_size=20)))
    parser = ProviderStreamParser()
    got: list[str] = []
    seen_finish, seen_usage = None, None
    for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        parsed = parser.feed(raw[start:end])
        got += parsed.deltas
        seen_finish = parsed.finish_reason or seen_finish
        seen_usage = parsed.usage or seen_usage
    assert got == deltas
    assert seen_finish == finish
    assert seen_usage == usage
    assert parser.done


@given(junk=st.binary(min_size=1, max_size=200), data=st.data())
def test_arbitrary_bytes_parse_or_raise_a_protocol_error_never_anything_else(
    junk: bytes, data: st.DataObject
) -> None:
    raw = b"data: " + junk + b"\n\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=5)))
    parser = ProviderStreamParser(max_line_bytes=100)
    try:
        for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            parser.feed(raw[start:end])
    except (UpstreamProtocolError, UpstreamStatusError):
        pass

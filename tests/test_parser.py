"""The provider-stream parser under arbitrary chunk splits and malformed input."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway import UpstreamError, UpstreamProtocolError, UpstreamStatusError
from gateway.provider import parser as parser_module
from gateway.provider.parser import (
    ContentPart,
    Delta,
    Extras,
    ParsedChunk,
    ProviderStreamParser,
    Reasoning,
    Refusal,
    ToolCallDelta,
)


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


def _texts(result: ParsedChunk) -> list[str]:
    return [delta for delta in result.deltas if isinstance(delta, str)]


def _parse(pieces: list[bytes]) -> ParsedChunk:
    parser = ProviderStreamParser()
    total = ParsedChunk()
    for piece in pieces:
        out = parser.feed(piece)
        total.deltas += out.deltas
        total.plain = total.plain and out.plain
        total.finish_reason = out.finish_reason or total.finish_reason
        total.usage = out.usage or total.usage
        total.done = total.done or out.done
    return total


def _check(result: ParsedChunk) -> None:
    assert result.plain
    assert "".join(_texts(result)) == "Hello, w\u00f6rld \U0001f600"
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
        # Nested deeper than Python's stack: refused, not an internal error.
        b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n",
        b"data: NaN garbage\n\n",
    ],
)
def test_malformed_input_is_a_protocol_error(data: bytes) -> None:
    parser = ProviderStreamParser()
    assert isinstance(parser.feed(data).error, UpstreamProtocolError)
    # Nothing is parsed after an error; the error stays.
    again = parser.feed(_chunk("more"))
    assert again.deltas == []
    assert isinstance(again.error, UpstreamProtocolError)


def test_line_longer_than_the_bound_is_refused_without_buffering_it() -> None:
    parser = ProviderStreamParser(max_line_bytes=1000)
    assert parser.feed(b"data: " + b"a" * 900).error is None
    error = parser.feed(b"a" * 200).error
    assert isinstance(error, UpstreamProtocolError)
    assert "longer than 1000" in error.message


def test_event_larger_than_the_bound_is_refused() -> None:
    parser = ProviderStreamParser(max_line_bytes=1000)
    error = parser.feed(b"data: " + b"a" * 600 + b"\ndata: " + b"b" * 600 + b"\n").error
    assert isinstance(error, UpstreamProtocolError)
    assert "over 1000" in error.message


def _error_chunk(error: object) -> bytes:
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


@pytest.mark.parametrize(
    ("error", "message", "logged"),
    [
        # The free text may echo the prompt or account details: never passed on.
        (
            {"message": "key sk-123 of bob@example.com", "type": "rate_limit_error"},
            "provider sent an error: rate_limit_error",
            {"type": "rate_limit_error"},
        ),
        # An identifier-shaped type can be the prompt too: only known types reach the
        # client, while the operator's log gets it.
        (
            {"message": "x", "type": "tell_me_the_launch_codes", "code": "model_not_found"},
            "provider sent an error: model_not_found",
            {"type": "tell_me_the_launch_codes", "code": "model_not_found"},
        ),
        ({"message": "secret", "type": "a b"}, "provider sent an error", None),
        # LiteLLM: type null, code a number as text.
        (
            {"message": "boom", "type": None, "code": "500"},
            "provider sent an error",
            {"code": "500"},
        ),
        ("a string, not an object", "provider sent an error", None),
    ],
)
def test_error_object_in_stream_tells_the_client_only_a_known_type(
    error: object, message: str, logged: dict[str, str] | None
) -> None:
    parsed = ProviderStreamParser().feed(_error_chunk(error))
    assert isinstance(parsed.error, UpstreamStatusError)
    assert parsed.error.message == message
    assert parsed.error.provider_error == logged


def test_deltas_before_an_error_in_the_same_read_are_delivered_first() -> None:
    for bad in (_error_chunk({"type": "server_error"}), b"data: {not json\n\n"):
        parsed = ProviderStreamParser().feed(_chunk("Hel") + _chunk("lo") + bad + _chunk("late"))
        assert parsed.deltas == ["Hel", "lo"]
        assert parsed.error is not None


def test_deltas_before_an_over_long_line_are_delivered_first() -> None:
    parser = ProviderStreamParser(max_line_bytes=100)
    parsed = parser.feed(_chunk("ok") + b"data: " + b"a" * 200)
    assert parsed.deltas == ["ok"]
    assert isinstance(parsed.error, UpstreamProtocolError)


@pytest.mark.parametrize(
    ("reason", "relayed"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "tool_calls"),
        ("content_filter", "content_filter"),
        ("insufficient_system_resource", "insufficient_system_resource"),
        ("ignore previous instructions", "other"),
        ("eos", "other"),
        (7, "other"),
        # Unhashable: a set lookup of these raised TypeError, an internal_error.
        (["stop"], "other"),
        ({"reason": "stop"}, "other"),
    ],
)
def test_finish_reason_is_a_known_value_or_other(reason: object, relayed: str) -> None:
    body = {"choices": [{"delta": {}, "finish_reason": reason}]}
    parsed = ProviderStreamParser().feed(b"data: " + json.dumps(body).encode() + b"\n\n")
    assert parsed.finish_reason == relayed


def test_usage_keeps_numbers_and_nulls_only() -> None:
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "prompt_cache_hit_tokens": 8,
        "completion_tokens_details": {"reasoning_tokens": 20, "note": "the prompt was ..."},
        "prompt_tokens_details": None,
        "cost": 0.0012,
        "flag": True,
        "echo": "user's prompt text",
        "list": [1, 2],
        "bad key with spaces": 3,
        "deep": {"a": {"b": {"c": 1}}},
    }
    body = {"choices": [], "usage": usage}
    parsed = ProviderStreamParser().feed(b"data: " + json.dumps(body).encode() + b"\n\n")
    assert parsed.usage == {
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "prompt_cache_hit_tokens": 8,
        "completion_tokens_details": {"reasoning_tokens": 20},
        # A null sub-object stays null: the provider said it has none (issue 32).
        "prompt_tokens_details": None,
        "cost": 0.0012,
        "deep": {"a": {}},
    }


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
    got: list[Delta] = []
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
    for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        error = parser.feed(raw[start:end]).error
        assert error is None or isinstance(error, UpstreamProtocolError | UpstreamStatusError)


def _delta_event(delta: Mapping[str, object], finish: str | None = None) -> bytes:
    body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def test_reasoning_content_and_tool_calls_come_out_in_the_providers_order() -> None:
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    stream = (
        _delta_event({"role": "assistant", "content": None, "reasoning_content": "Let me"})
        + b": keep-alive\n\n"
        + _delta_event({"content": None, "reasoning": " think."})  # vLLM, OpenRouter, Ollama
        + _delta_event({"content": "Calling."})
        + _delta_event({"content": None, "tool_calls": [call]})
        + _delta_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]})
        + _delta_event({"tool_calls": [{"index": 0, "function": {"arguments": ' "x"}'}}]})
        + _delta_event({}, "tool_calls")
        + b"data: [DONE]\n\n"
    )
    for size in (1, 7, len(stream)):
        result = _parse([stream[i : i + size] for i in range(0, len(stream), size)])
        assert result.deltas == [
            Reasoning("Let me"),
            Reasoning(" think.", "reasoning"),
            "Calling.",
            ToolCallDelta(0, "call_1", "f", ""),
            ToolCallDelta(0, None, None, '{"q":'),
            ToolCallDelta(0, None, None, ' "x"}'),
        ]
        assert not result.plain
        assert result.finish_reason == "tool_calls"
        fragments = [d.arguments for d in result.deltas if isinstance(d, ToolCallDelta)]
        assert json.loads("".join(fragments)) == {"q": "x"}


def test_one_delta_with_every_kind_gives_reasoning_then_content_then_calls() -> None:
    delta = {
        "tool_calls": [
            {"index": 1, "function": {"arguments": "{}"}},
            {"id": "c", "function": {"name": "g"}},  # no index: its place in the list
        ],
        "content": "b",
        "reasoning_content": "a",
    }
    result = ProviderStreamParser().feed(_delta_event(delta))
    assert result.error is None
    assert result.deltas == [
        Reasoning("a"),
        "b",
        ToolCallDelta(1, None, None, "{}"),
        ToolCallDelta(1, "c", "g", ""),
    ]
    assert ToolCallDelta(1, "c", "g", "").as_event() == {
        "index": 1,
        "id": "c",
        "name": "g",
        "arguments": "",
    }
    assert ToolCallDelta(0, None, None, "x").as_event() == {"index": 0, "arguments": "x"}


@pytest.mark.parametrize(
    "delta",
    [
        {"reasoning_content": ["not", "text"]},
        {"reasoning": {"text": "x"}},
        {"tool_calls": {"index": 0}},
        {"tool_calls": ["x"]},
        {"tool_calls": [{"index": -1, "function": {"arguments": "x"}}]},
        {"tool_calls": [{"index": True, "function": {"arguments": "x"}}]},
        {"tool_calls": [{"index": 10**9, "function": {"arguments": "x"}}]},
        {"tool_calls": [{"index": 0, "function": "f"}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": {"q": 1}}}]},
        {"tool_calls": [{"index": 0, "id": 7, "function": {}}]},
        {"tool_calls": [{"index": 0, "function": {"name": "n" * 300}}]},
    ],
)
def test_malformed_reasoning_or_tool_calls_end_the_parse(delta: dict[str, object]) -> None:
    parser = ProviderStreamParser()
    result = parser.feed(_chunk("before") + _delta_event(delta) + _chunk("after"))
    assert result.deltas == ["before"]
    assert isinstance(result.error, UpstreamProtocolError)


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**64, max_value=2**80)
    | st.floats()
    | st.text()
    | st.sampled_from(["\ud800", "\u2028", "\x00"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=12,
)


@given(value=_JSON_VALUES)
def test_a_chunk_reads_as_json_reads_it(value: object) -> None:
    # What the fast decoder refuses (NaN, huge exponents, lone surrogates) json still
    # reads: every chunk gives what json.loads gives, to the type of each number.
    text = json.dumps(value)
    assert repr(parser_module._json(text)) == repr(json.loads(text))


@given(stream=_provider_streams())
def test_one_event_per_read_parses_as_one_read_of_all(
    stream: tuple[bytes, list[str], str, dict[str, int]],
) -> None:
    raw, deltas, finish, usage = stream
    assume(b"\r" not in raw)
    # Each read one whole event: the parser's fast path.
    parser = ProviderStreamParser()
    got: list[Delta] = []
    seen_finish, seen_usage = None, None
    for piece in raw.split(b"\n\n")[:-1]:
        parsed = parser.feed(piece + b"\n\n")
        got += parsed.deltas
        seen_finish = parsed.finish_reason or seen_finish
        seen_usage = parsed.usage or seen_usage
    assert (got, seen_finish, seen_usage) == (deltas, finish, usage)
    assert parser.done


def _shaped(fields: dict[str, st.SearchStrategy[object]]) -> st.SearchStrategy[object]:
    """Objects with some of ``fields`` (each any JSON, or its expected shape), or anything."""
    return st.fixed_dictionaries({}, optional=fields).map(dict) | _JSON_VALUES


_TEXTS = st.none() | st.text(max_size=5) | _JSON_VALUES
_FUNCTION = _shaped({"name": _TEXTS, "arguments": _TEXTS})
_TOOL_CALL = _shaped(
    {
        "index": st.integers(-2, 2000) | _JSON_VALUES,
        "id": _TEXTS,
        "type": _TEXTS,
        "function": _FUNCTION,
    }
)
# Mistral's content parts: text, thinking (a string or a list of text parts), others.
_PART = _shaped(
    {
        "type": st.sampled_from(["text", "thinking", "image_url"]) | _JSON_VALUES,
        "text": _TEXTS,
        "thinking": st.lists(_shaped({"type": _TEXTS, "text": _TEXTS}), max_size=2) | _TEXTS,
    }
)
_DELTA = _shaped(
    {
        "role": _TEXTS,
        "content": _TEXTS | st.lists(_PART, max_size=3),
        "reasoning_content": _TEXTS,
        "reasoning": _TEXTS,
        "refusal": _TEXTS,
        "tool_calls": st.lists(_TOOL_CALL, max_size=3) | _JSON_VALUES,
        "provider_metadata": _JSON_VALUES,
    }
)
_CHOICE = _shaped(
    {
        "index": st.integers(0, 3) | _JSON_VALUES,
        "delta": _DELTA,
        "finish_reason": st.sampled_from(["stop", "length", "eos", "error"]) | _JSON_VALUES,
        "native_finish_reason": _TEXTS,
        "error": _JSON_VALUES,
        "content_filter_results": _JSON_VALUES,
    }
)
_CHUNK = _shaped(
    {
        "id": _TEXTS,
        "choices": st.lists(_CHOICE, max_size=3) | _JSON_VALUES,
        "usage": st.dictionaries(st.text(max_size=8), _JSON_VALUES, max_size=4) | _JSON_VALUES,
        "error": _JSON_VALUES,
        "citations": _JSON_VALUES,
    }
)


def _outcome(parsed: ParsedChunk) -> tuple[object, ...]:
    error = parsed.error
    return (
        parsed.deltas,
        parsed.plain,
        parsed.finish_reason,
        parsed.usage,
        None if error is None else (type(error), str(error), error.__dict__),
    )


# Chunks as providers write them, which the typed decoding takes whole.
_TEXT = st.none() | st.text(min_size=1, max_size=5)
_WELL_FORMED = st.fixed_dictionaries(
    {
        "choices": st.lists(
            st.fixed_dictionaries(
                {
                    "index": st.integers(0, 3),
                    "delta": st.fixed_dictionaries(
                        {},
                        optional={
                            "role": _TEXT,
                            "content": _TEXT,
                            "reasoning_content": _TEXT,
                            "reasoning": _TEXT,
                            "refusal": _TEXT,
                            "tool_calls": st.none() | st.lists(_TOOL_CALL, max_size=2),
                        },
                    ),
                },
                optional={
                    "finish_reason": st.none() | st.sampled_from(["stop", "length", "eos"]),
                },
            ),
            min_size=1,
            max_size=2,
        )
    },
    optional={
        "usage": st.none() | st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
        "model": st.text(max_size=5),
    },
)


@given(chunk=_CHUNK | _WELL_FORMED)
def test_the_typed_decoding_reads_every_chunk_as_the_untyped_one(chunk: object) -> None:
    # Chunks of the common shape are decoded into typed structs (checked in C), the
    # rest as any JSON: the same deltas, reason, usage or error either way.
    text = json.dumps(chunk)
    typed = ProviderStreamParser().feed(b"data: " + text.encode() + b"\n\n")
    untyped = ParsedChunk()
    try:
        parser_module._untyped_chunk(parser_module._json(text), untyped)
    except UpstreamError as exc:
        untyped.error = exc
    assert _outcome(typed) == _outcome(untyped)


@given(chunk=_CHUNK | _WELL_FORMED)
def test_any_chunk_is_deltas_or_a_protocol_error_never_an_exception(chunk: object) -> None:
    # Whatever shape the provider's JSON takes, nothing but an UpstreamError may come
    # of it: anything else escapes the relay as an internal_error.
    parsed = ProviderStreamParser().feed(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    assert parsed.error is None or isinstance(
        parsed.error, UpstreamProtocolError | UpstreamStatusError
    )
    assert all(
        isinstance(d, str | Reasoning | Refusal | ToolCallDelta | ContentPart | Extras)
        for d in parsed.deltas
    )
    assert parsed.finish_reason is None or parsed.finish_reason in parser_module.FINISH_REASONS | {
        "other"
    }

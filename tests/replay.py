"""Recorded streams of real providers (tests/recorded/), a provider that replays one on
a real socket, and what a careful reader of the recording expects of an answer.

The expectations are read from the recorded chunks here, by code that shares nothing
with the gateway's parser, so a test compares the gateway with the recording, not
with itself.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.provider.parser import ProviderStreamParser
from gateway.server.serve import load_config

from .harness import Harness, answer_lifespan, serve_until

RECORDED = Path(__file__).parent / "recorded"

# The fields of OpenAI's chunk (its API reference), which the gateway writes itself on
# /v1, and the padding providers add against length side channels (OpenAI's
# `obfuscation`, Mistral's `p`): anything else is a provider's extra.
CHUNK_FIELDS = {
    "id",
    "object",
    "created",
    "model",
    "system_fingerprint",
    "service_tier",
    "obfuscation",
    "p",
    "choices",
    "usage",
}
CHOICE_FIELDS = {"index", "delta", "finish_reason", "logprobs"}
DELTA_FIELDS = {"role", "content", "reasoning_content", "reasoning", "refusal", "tool_calls"}
KNOWN_FINISH = {"stop", "length", "tool_calls", "content_filter", "function_call"}
_IDENT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def names() -> list[str]:
    return sorted(p.name for p in RECORDED.iterdir() if p.is_file() and p.name != "README.md")


def body(name: str) -> bytes:
    """The HTTP body the provider sent: a `.sse` file as it is, a `.chunks.txt` file's
    lines framed as the AI SDK's test helper frames them."""
    raw = (RECORDED / name).read_bytes()
    if name.endswith(".sse"):
        return raw
    lines = [line for line in raw.split(b"\n") if line]
    return b"".join(b"data: " + line + b"\n\n" for line in lines) + b"data: [DONE]\n\n"


def chunks(name: str) -> list[dict[str, Any]]:
    """The recording's chunks, as JSON."""
    out = []
    for event in body(name).split(b"\n\n"):
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            out.append(json.loads(event[6:]))
    return out


def split(data: bytes, rng: random.Random, pieces: int) -> list[bytes]:
    """``data`` cut at ``pieces - 1`` random offsets (some pieces may be one byte)."""
    cuts = sorted(rng.sample(range(1, len(data)), min(pieces - 1, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def splits(data: bytes, seed: str, count: int) -> list[list[bytes]]:
    """``data`` whole, byte by byte, and cut at ``count`` random sets of offsets."""
    rng = random.Random(seed)
    out = [[data], [data[i : i + 1] for i in range(len(data))]]
    return out + [split(data, rng, rng.randint(2, 60)) for _ in range(count)]


def parse(parser: ProviderStreamParser, pieces: list[bytes]) -> Parsed:
    """What ``parser`` makes of ``pieces`` fed in turn: every delta, the last finish
    reason and usage; it must end the stream without an error."""
    out = Parsed()
    for piece in pieces:
        parsed = parser.feed(piece)
        assert parsed.error is None, parsed.error
        out.deltas += parsed.deltas
        out.finish = parsed.finish_reason or out.finish
        out.usage = parsed.usage or out.usage
    assert parser.done
    return out


@dataclass
class Parsed:
    deltas: list[object] = field(default_factory=list)
    finish: str | None = None
    usage: dict[str, object] | None = None


def numbers(usage: dict[str, Any]) -> dict[str, Any]:
    """A usage object as the gateway promises to pass it: numbers and nulls under
    identifier keys, nested objects of them; text left out."""
    out: dict[str, Any] = {}
    for key, value in usage.items():
        if not _IDENT.fullmatch(key) or isinstance(value, bool | str | list):
            continue
        out[key] = numbers(value) if isinstance(value, dict) else value
    return out


@dataclass
class Expected:
    """What the recording says the answer is."""

    content: str = ""
    reasoning: str = ""
    refusal: str = ""
    # index -> {"id", "name", "arguments"}: the first non-empty id and name, arguments joined.
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    # Each chunk's extras, by level, for the chunks that have any, in order.
    extras: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    # Unknown content parts, as sent.
    parts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [self.tool_calls[i] for i in sorted(self.tool_calls)]

    @property
    def relayed_finish(self) -> str | None:
        if self.finish_reason is None:
            return None
        return self.finish_reason if self.finish_reason in KNOWN_FINISH else "other"


def expected(name: str) -> Expected:
    out = Expected()
    for chunk in chunks(name):
        extras: dict[str, dict[str, Any]] = {}
        top = {k: v for k, v in chunk.items() if k not in CHUNK_FIELDS}
        if top:
            extras["chunk"] = top
        for position, choice in enumerate(chunk.get("choices") or []):
            more = {k: v for k, v in choice.items() if k not in CHOICE_FIELDS}
            if more:
                extras.setdefault("choice", {}).update(more)
            delta = choice.get("delta") or {}
            more = {k: v for k, v in delta.items() if k not in DELTA_FIELDS}
            if more:
                extras.setdefault("delta", {}).update(more)
            out.reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
            content = delta.get("content")
            if isinstance(content, str):
                out.content += content
            for part in content if isinstance(content, list) else []:
                if part["type"] == "text":
                    out.content += part["text"]
                elif part["type"] == "thinking":
                    out.reasoning += "".join(p["text"] for p in part["thinking"])
                else:
                    out.parts.append(part)
            out.refusal += delta.get("refusal") or ""
            for call in delta.get("tool_calls") or []:
                index = call.get("index", position)
                joined = out.tool_calls.setdefault(
                    index, {"id": None, "name": None, "arguments": ""}
                )
                joined["id"] = joined["id"] or call.get("id") or None
                function = call.get("function") or {}
                joined["name"] = joined["name"] or function.get("name") or None
                joined["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            out.usage = numbers(chunk["usage"])
        if extras:
            out.extras.append(extras)
    return out


def deduplicated(extras: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
    """The extras as /api tells them: each one again only when it changed."""
    out: list[dict[str, dict[str, Any]]] = []
    for item in extras:
        if not out or out[-1] != item:
            out.append(item)
    return out


class Replay:
    """An ASGI provider that answers every request with the same bytes (a recording's,
    or any): whole in one send, or cut at random offsets (``seed``), one send per
    piece; by default as a 200 event stream. It keeps the request bodies it was sent."""

    def __init__(
        self,
        data: bytes,
        *,
        seed: int | None = None,
        pieces: int = 40,
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.data = data
        self.seed = seed
        self.pieces = pieces
        self.status = status
        self.headers = [(b"content-type", b"text/event-stream")] if headers is None else headers
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        request = b""
        while True:
            message = await receive()
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append(json.loads(request) if request else {})
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        if self.seed is None:
            pieces = [self.data]
        else:
            pieces = split(self.data, random.Random(self.seed), self.pieces)
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@asynccontextmanager
async def serving(provider: ASGIApp) -> AsyncIterator[str]:
    """``provider`` (an ASGI app) on a free loopback port for the block; its ``/v1``
    base URL."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        config = load_config(bind=["127.0.0.1:0"], graceful_timeout=1.0, accesslog=None)
        [(_, port)] = await tg.start(serve_until, provider, config, stop.wait)
        try:
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            stop.set()


@asynccontextmanager
async def replaying(provider: ASGIApp, **settings: Any) -> AsyncIterator[Harness]:
    """A gateway whose provider is ``provider`` (an ASGI app), each on a real socket."""
    async with serving(provider) as url, Harness(upstream_url=url, **settings) as h:
        yield h


def sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    """A stream made by hand, one ``data:`` event per chunk."""
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")

"""CPU per provider chunk of the gateway's own relay step, without sockets or a server.

Each of 100,000 plain-content chunks (the bytes bench/provider.py sends) goes through
``ProviderStreamParser.feed`` and ``ChatStream._deliver`` (encode, and hand to the
client's ``send``, here a no-op; in older trees queue, then ``Outbox.take``): the
per-token work that is ours, not hypercorn's or the kernel's. With
no I/O and no other process involved it is far steadier than `make bench` on a shared
machine, so it is how a change to the token path is checked (docs/benchmarks.md).

``python -m bench.hotpath [--tree PATH] [--repeats N] [--openai | --metrics | --transport
| --resume]``;
``--tree`` measures another checkout of the gateway, for an A/B run from one script;
``--openai`` encodes the chunks as ``/v1/chat/completions`` does; ``--metrics`` measures
instead what metrics.py adds per stream (it does no per-token work: it counts a stream
when it starts and when it ends), for streams that end each way; ``--transport``
measures instead the provider transport's ``receive()`` per chunk (gateway/provider/transport.py:
the HTTP/1.1 chunked body parsed), fed from memory as the socket would;
``--resume`` measures instead what resume adds: the ``ResumeStore``'s cost to a stream
(its start and its end) while it holds 10,000 ended streams within their window, the
default ``GATEWAY_MAX_SESSIONS``, with the longest single call (a stall of the event
loop); and the ``EventLog``'s per token, one event per chunk, each read by a follower
that keeps up (``since``), over a 5,000-token answer.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio

# Where each module lives since issue 34's folders, and its flat name in older trees
# (``--tree``).
_FLAT = {
    "core.session": "session",
    "core.metrics": "metrics",
    "provider.parser": "parser",
    "provider.transport": "transport",
    "resume.log": "resume",
    "web.formats": "formats",
    "web.stream": "stream",
    "web.writer": "writer",
}


def _module(name: str) -> Any:
    """A gateway module of the tree measured, by its name since issue 34. The layout is
    read from the tree's files: the editable install would find the new one's modules
    for any tree."""
    import gateway

    if (Path(gateway.__file__).parent / "web").is_dir():
        return importlib.import_module(f"gateway.{name}")
    return importlib.import_module(f"gateway.{_FLAT[name]}")


N = 100_000
_WORDS = [b" w%d" % i for i in range(97)]


async def _once(chunks: list[bytes], openai: bool) -> float:
    Session = _module("core.session").Session
    ProviderStreamParser = _module("provider.parser").ProviderStreamParser
    ChatStream = _module("web.stream").ChatStream

    session = Session("s", "m")
    sink: Any
    take: Any = None
    try:
        ClientWriter = _module("web.writer").ClientWriter
    except ImportError:  # before the relay wrote to the client itself: the outbox
        from gateway.outbox import Outbox  # type: ignore[import-not-found, unused-ignore]

        sink = Outbox(16)
        take = sink.take
    parser = ProviderStreamParser()
    # Any: the signature differs across the trees this measures (see below).
    deliver: Any = ChatStream._deliver
    # Older trees: before issue 12 no ``plain``; before issue 13 no answer format.
    params = inspect.signature(deliver).parameters
    extra: tuple[object, ...] = ()
    answer: Any = None
    if "answer" in params:
        formats = _module("web.formats")
        ChatCompletionChunks, GatewayEvents = formats.ChatCompletionChunks, formats.GatewayEvents
        answer = ChatCompletionChunks(include_usage=False) if openai else GatewayEvents()
        answer.start(session)
        extra = (answer,)
    if take is None:

        async def send(message: Any) -> None:
            pass

        sink = ClientWriter(session, answer, send)
        session.response_started = True
    takes_plain = "plain" in params
    start = time.process_time()
    for chunk in chunks:
        parsed = parser.feed(chunk)
        if takes_plain:
            await deliver(session, sink, *extra, parsed.deltas, parsed.plain)
        else:
            await deliver(session, sink, parsed.deltas)
        if take is not None:
            await take()
    return (time.process_time() - start) / len(chunks) * 1e6


class _Replay:
    """A byte stream that gives back prepared reads at once, as a socket with data
    waiting would: the transport's own work, without the kernel's."""

    def __init__(self, reads: list[bytes]) -> None:
        self._reads = iter(reads)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return next(self._reads)

    async def send(self, item: bytes) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def extra(self, attribute: object, default: object = None) -> object:
        return default


async def _transport_once(chunks: list[bytes]) -> float:
    import httpx2 as httpx

    transport = _module("provider.transport")

    # Named H11Transport before step 7 (docs/benchmarks.md).
    names = vars(transport)
    cls = names.get("HTTP1Transport") or names["H11Transport"]
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    reads = [head] + [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"]
    pool = cls(max_connections=1, max_keepalive=1)
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    replay: Any = _Replay(reads)
    connection = transport._Connection(replay, ("http", "127.0.0.1", 80))
    stream: Any = transport._ResponseStream(pool, connection, request, None)
    # The request was written: the old tree's h11 must know it, to read a response.
    h11_state = getattr(connection, "h11", None)
    if h11_state is not None:
        import h11

        h11_state.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        h11_state.send(h11.EndOfMessage())
    await stream.receive_head()
    receive = stream.receive
    start = time.process_time()
    for _ in chunks:
        await receive()
    spent = time.process_time() - start
    assert await receive() == b""
    return spent / len(chunks) * 1e6


async def _metrics_once(streams: int) -> float:
    Metrics = _module("core.metrics").Metrics
    sessions = _module("core.session")
    Completed, Failed, Session, Stopped = (
        sessions.Completed,
        sessions.Failed,
        sessions.Session,
        sessions.Stopped,
    )

    metrics = Metrics()
    # A quarter each: completed with the provider's usage, cancelled (the Stop latency
    # observed), timed out, failed.
    ends = [
        Completed("stop", {"prompt_tokens": 12, "completion_tokens": 300}),
        None,
        Stopped("timeout", "idle"),
        Failed("upstream_error", "x"),
    ]
    sessions = []
    for i in range(streams):
        session = Session("s", "m")
        # tokens_queued before issue 34
        counted = "tokens_delivered" if hasattr(session, "tokens_delivered") else "tokens_queued"
        setattr(session, counted, 300)
        session.first_delta_at = session.started_at + 0.2
        end = ends[i % 4]
        if end is None:
            session.cancel("cancel")
            session.provider_closed_at = session.stopped_at
        else:
            session.settle(end)
        sessions.append(session)
    now = anyio.current_time()
    start = time.process_time()
    for session in sessions:
        metrics.stream_started()
        metrics.stream_ended(session, now)
    return (time.process_time() - start) / streams * 1e6


def _resume_store_once(kept: int) -> tuple[float, float]:
    Session = _module("core.session").Session
    resume = _module("resume.log")
    EventLog, ResumeStore = resume.EventLog, resume.ResumeStore

    store = ResumeStore(3600.0, max_ended=kept)
    session = Session("s", "m")
    log = EventLog(1 << 20, lambda: 0, lambda: None)
    now = anyio.current_time()
    for i in range(kept):
        store.add("p", str(i), log, session)
        store.ended("p", str(i), log, now + 3600.0 + i)
    longest = 0.0
    start = time.process_time()
    for i in range(kept, 2 * kept):
        began = time.perf_counter()
        store.add("p", str(i), log, session)
        longest = max(longest, time.perf_counter() - began)
        began = time.perf_counter()
        # Each ends later than the kept ones: the soonest of those is dropped.
        store.ended("p", str(i), log, now + 3600.0 + i)
        longest = max(longest, time.perf_counter() - began)
    return (time.process_time() - start) / kept * 1e6, longest * 1000


def _resume_log_once(tokens: int) -> float:
    EventLog = _module("resume.log").EventLog

    seq = [0]
    log = EventLog(1 << 20, lambda: seq[0], lambda: None)
    events = [b'id: %d\nevent: token\ndata: {"delta":"w"}\n\n' % n for n in range(1, tokens + 1)]
    start = time.process_time()
    for n, event in enumerate(events, 1):
        seq[0] = n
        log.put_nowait(event, (n, 0, 0, 0))
        got = log.since(n - 1)
        assert got is not None
        log.written_id = got[1]
    return (time.process_time() - start) / tokens * 1e6


async def _main(repeats: int, openai: bool, metrics: bool, transport: bool, resume: bool) -> None:
    if resume:
        kept = N // 10
        pairs = [_resume_store_once(kept) for _ in range(repeats)]
        per_stream = [p for p, _ in pairs]
        print(
            f"resume store, CPU µs per stream: min {min(per_stream):.3f} "
            f"median {statistics.median(per_stream):.3f}; longest call "
            f"{max(ms for _, ms in pairs):.3f} ms ({repeats} runs of {kept} streams)"
        )
        tokens = N // 20
        runs = [_resume_log_once(tokens) for _ in range(repeats)]
        print(
            f"resume log, CPU µs per token followed: min {min(runs):.3f} "
            f"median {statistics.median(runs):.3f} ({repeats} runs of a {tokens}-token answer)"
        )
        return
    if metrics:
        runs = [await _metrics_once(N // 10) for _ in range(repeats)]
        print(
            f"metrics, CPU µs per stream: min {min(runs):.3f} "
            f"median {statistics.median(runs):.3f} ({repeats} runs of {N // 10} streams)"
        )
        return
    chunks = [
        b'data: {"id":"b","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":"' + _WORDS[i % len(_WORDS)] + b'"},"finish_reason":null}]}\n\n'
        for i in range(N)
    ]
    if transport:
        runs = [await _transport_once(chunks) for _ in range(repeats)]
        print(
            f"provider transport, CPU µs per chunk: min {min(runs):.3f} "
            f"median {statistics.median(runs):.3f} ({repeats} runs of {N} chunks)"
        )
        return
    runs = [await _once(chunks, openai) for _ in range(repeats)]
    print(
        f"relay step, CPU µs per chunk: min {min(runs):.3f} "
        f"median {statistics.median(runs):.3f} ({repeats} runs of {N} chunks)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", help="a checkout of the gateway to measure instead")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--openai", action="store_true", help="encode as /v1/chat/completions chunks"
    )
    parser.add_argument(
        "--metrics", action="store_true", help="the metrics' CPU per stream instead"
    )
    parser.add_argument(
        "--transport", action="store_true", help="the provider transport's CPU per chunk instead"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="what resume costs a stream and a followed token instead",
    )
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
        sys.modules.pop("gateway", None)
    anyio.run(_main, args.repeats, args.openai, args.metrics, args.transport, args.resume)


if __name__ == "__main__":
    main()

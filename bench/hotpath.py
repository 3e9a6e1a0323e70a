"""CPU per provider chunk of the gateway's own relay step, without sockets or a server.

Each of 100,000 plain-content chunks (the bytes bench/provider.py sends) goes through
``ProviderStreamParser.feed`` and ``ChatStream._deliver`` (encode, and hand to the
client's ``send``, here a no-op; in older trees queue, then ``Outbox.take``): the
per-token work that is ours, not hypercorn's or the kernel's. With
no I/O and no other process involved it is far steadier than `make bench` on a shared
machine, so it is how a change to the token path is checked (docs/benchmarks.md).

``python -m bench.hotpath [--tree PATH] [--repeats N] [--openai | --metrics]``;
``--tree`` measures another checkout of the gateway, for an A/B run from one script;
``--openai`` encodes the chunks as ``/v1/chat/completions`` does; ``--metrics`` measures
instead what metrics.py adds per stream (it does no per-token work: it counts a stream
when it starts and when it ends), for streams that end each way.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from typing import Any

import anyio

N = 100_000
_WORDS = [b" w%d" % i for i in range(97)]


async def _once(chunks: list[bytes], openai: bool) -> float:
    from gateway.parser import ProviderStreamParser
    from gateway.session import Session
    from gateway.stream import ChatStream

    session = Session("s", "m")
    sink: Any
    take: Any = None
    try:
        from gateway.writer import ClientWriter
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
        from gateway.formats import ChatCompletionChunks, GatewayEvents

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


async def _metrics_once(streams: int) -> float:
    from gateway.metrics import Metrics
    from gateway.session import Completed, Failed, Session, Stopped

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
        session.tokens_queued = 300
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


async def _main(repeats: int, openai: bool, metrics: bool) -> None:
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
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
        sys.modules.pop("gateway", None)
    anyio.run(_main, args.repeats, args.openai, args.metrics)


if __name__ == "__main__":
    main()

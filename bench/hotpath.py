"""CPU per provider chunk of the gateway's own relay step, without sockets or a server.

Each of 100,000 plain-content chunks (the bytes bench/provider.py sends) goes through
``ProviderStreamParser.feed``, ``ChatStream._deliver`` (encode and queue) and
``Outbox.take``: the per-token work that is ours, not hypercorn's or the kernel's. With
no I/O and no other process involved it is far steadier than `make bench` on a shared
machine, so it is how a change to the token path is checked (docs/benchmarks.md).

``python -m bench.hotpath [--tree PATH] [--repeats N] [--openai]``; ``--tree`` measures
another checkout of the gateway, for an A/B run from one script; ``--openai`` encodes
the chunks as ``/v1/chat/completions`` does.
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
    from gateway.outbox import Outbox
    from gateway.parser import ProviderStreamParser
    from gateway.session import Session
    from gateway.stream import ChatStream

    session = Session("s", "m")
    outbox = Outbox(16)
    parser = ProviderStreamParser()
    # Any: the signature differs across the trees this measures (see below).
    deliver: Any = ChatStream._deliver
    # Older trees: before issue 12 no ``plain``; before issue 13 no answer format.
    params = inspect.signature(deliver).parameters
    extra: tuple[object, ...] = ()
    if "answer" in params:
        from gateway.formats import ChatCompletionChunks, GatewayEvents

        answer = ChatCompletionChunks(include_usage=False) if openai else GatewayEvents()
        answer.start(session)
        extra = (answer,)
    takes_plain = "plain" in params
    start = time.process_time()
    for chunk in chunks:
        parsed = parser.feed(chunk)
        if takes_plain:
            await deliver(session, outbox, *extra, parsed.deltas, parsed.plain)
        else:
            await deliver(session, outbox, parsed.deltas)
        await outbox.take()
    return (time.process_time() - start) / len(chunks) * 1e6


async def _main(repeats: int, openai: bool) -> None:
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
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
        sys.modules.pop("gateway", None)
    anyio.run(_main, args.repeats, args.openai)


if __name__ == "__main__":
    main()

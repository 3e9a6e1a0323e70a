"""`gateway serve` with a bug planted in the cluster's message handling: every message
from Redis raises. tests/test_cluster.py runs it to see what a real bug in a
background task does to the instance (``python -m tests.faulty_gateway serve ...``)."""

from __future__ import annotations

import sys
from typing import Any

from gateway.cli import main
from gateway.cluster.instance import Cluster


async def _planted_bug(self: Any, message: Any) -> None:
    raise RuntimeError("planted bug in the message handler")


Cluster._on_message = _planted_bug  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

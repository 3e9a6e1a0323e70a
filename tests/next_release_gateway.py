"""`gateway serve` as the next release would be while it introduces a message format
version 2: it reads versions 1 and 2 and still writes 1 (docs/scaling.md). Run by
tests/test_cluster.py beside this release, as during a rolling upgrade
(``python -m tests.next_release_gateway serve ...``)."""

from __future__ import annotations

import sys

from gateway.cli import main
from gateway.cluster import messages

messages.PROTOCOL_VERSION = 2
messages.SEND_VERSION = 1

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

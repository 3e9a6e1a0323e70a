"""The ASGI entry point for ``hypercorn gateway.app:app``: built from the environment
at import, so a bad setting stops hypercorn before it serves anything."""

from __future__ import annotations

from .server import writes
from .server.keepalive import install
from .web.routes import create_app

# Plain `hypercorn gateway.app:app` serves with the fix and the writes as `gateway serve` does.
install()
writes.install()
app = create_app()

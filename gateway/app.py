"""The ASGI entry point for ``hypercorn gateway.app:app``: built from the environment
at import, so a bad setting stops hypercorn before it serves anything."""

from __future__ import annotations

from .web.routes import create_app

app = create_app()

"""The straightforward proxy a developer writes first, for comparison in `make bench`.

A Starlette route returns sse-starlette's ``EventSourceResponse`` over an async
generator that iterates httpx's ``aiter_lines()``; Stop cancels a scope kept in a
dict. (The scope is held across the generator's ``yield``: that is the naive way.)
It speaks the same event protocol as the gateway, so the same client drives both.

``python -m bench.baseline -k uvloop -b 127.0.0.1:9000 --upstream http://.../v1``
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2 as httpx
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import serving


def create_app(upstream_url: str) -> Starlette:
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(10.0, read=None), limits=httpx.Limits(max_connections=5000)
    )
    scopes: dict[str, anyio.CancelScope] = {}

    async def stream(request: Request) -> Response:
        sid = request.headers["x-session-id"]
        body = await request.json()
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}

        async def events() -> AsyncIterator[dict[str, Any]]:
            seq = 1
            yield {"event": "start", "id": str(seq), "data": json.dumps({"session_id": sid})}
            with anyio.CancelScope() as scope:
                scopes[sid] = scope
                try:
                    async with client.stream(
                        "POST", f"{upstream_url}/chat/completions", json=payload
                    ) as response:
                        async for line in response.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            for choice in chunk.get("choices") or []:
                                delta = (choice.get("delta") or {}).get("content")
                                if delta:
                                    seq += 1
                                    yield {
                                        "event": "token",
                                        "id": str(seq),
                                        "data": json.dumps({"delta": delta}),
                                    }
                finally:
                    scopes.pop(sid, None)
            seq += 1
            yield {"event": "done", "id": str(seq), "data": json.dumps({"status": "completed"})}

        return EventSourceResponse(events())

    async def cancel(request: Request) -> Response:
        scope = scopes.get(request.path_params["sid"])
        if scope is None:
            return JSONResponse({"ok": False, "reason": "not_found"}, status_code=404)
        scope.cancel()
        return JSONResponse({"ok": True, "cancelled": True})

    return Starlette(
        routes=[
            Route("/api/chat/stream", stream, methods=["POST"]),
            Route("/api/chat/cancel/{sid}", cancel, methods=["POST"]),
        ]
    )


if __name__ == "__main__":
    serving.main(create_app)

"""A stand-in enforcer for the portal's client tests: a real HTTP server on a Unix socket."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from aiohttp import web


@asynccontextmanager
async def unix_enforcer(path: Path, lookup: Any = None, acknowledge: Any = None,
                        promise: Any = None) -> AsyncIterator[list[Any]]:
    """Serve the given control routes at ``path``; yields what they received, in order:
    a lookup's query as a dict, a POST's (Content-Type, JSON body)."""
    seen: list[Any] = []

    def recording_query(handler: Any) -> Any:
        async def route(request: web.Request) -> web.StreamResponse:
            seen.append(dict(request.query))
            return await handler(request)
        return route

    def recording_body(handler: Any) -> Any:
        async def route(request: web.Request) -> web.StreamResponse:
            seen.append((request.headers.get("Content-Type"), await request.json()))
            return await handler(request)
        return route

    app = web.Application()
    if lookup is not None:
        app.router.add_get("/v1/lookup", recording_query(lookup))
    if acknowledge is not None:
        app.router.add_post("/v1/acknowledge", recording_body(acknowledge))
    if promise is not None:
        app.router.add_post("/v1/promise", recording_body(promise))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield seen
    finally:
        await runner.cleanup()

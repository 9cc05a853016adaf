"""A stand-in enforcer for the portal's client tests: a real HTTP server on a Unix socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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


#: A header only tests use: which TCP peer a request is to seem to come from (see ``with_test_peer``).
TEST_PEER = "X-Test-Peer"


def with_test_peer(app: web.Application) -> web.Application:
    """Let a test pick the TCP peer address per request, as if the connection came from it.

    The test client always connects from 127.0.0.1; this outermost middleware replaces the
    peer with ``X-Test-Peer``'s value (as aiohttp's own ``request.clone(remote=...)`` does), so
    IPv6 callers and neighbours in one /64 can be tried. The portal itself never reads headers
    for the caller's address; tests that check that use no such middleware.
    """
    @web.middleware
    async def peer(request: web.Request, handler: Any) -> web.StreamResponse:
        remote = request.headers.get(TEST_PEER)
        return await handler(request.clone(remote=remote) if remote else request)

    app.middlewares.insert(0, peer)
    return app

"""Redirected requests with long URLs and big headers still get the ``302`` to the portal.

A subscriber's browser sends the portal whatever it would send the site it asked for: an 8 KB
cookie of a web shop, a 9000-character search URL. Over aiohttp's default limits (8190 bytes a
line) that was aiohttp's plain ``400`` ("Got more than 8190 bytes ..."), not the redirect, and
the subscriber saw an error instead of "sign in to network". The limits are now 64 KiB a line
(``app.HANDLER_ARGS``); beyond them a request is still refused rather than read for ever.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from test_portal import PORTAL_HOST, PORTAL_URL, FakeEnforcer, config, on_portal, portal, requests_total

from captive_portal.app import MAX_LINE
from captive_portal.server import PortalServer
from enforcer.config import Config, Listen

__all__ = ["config"]  # the fixture, shared with test_portal

BIG_COOKIE = "session=" + "c" * 8200
LONG_PATH = "/search?q=" + "x" * 9000


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str]]:
    """Send ``request`` over a plain TCP connection, as a browser would; the status and headers."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers


def get(path: str, host: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "User-Agent: Mozilla/5.0 (test)",
             "Accept: text/html,*/*", *extra, "", ""]
    return "\r\n".join(lines).encode()


@pytest.mark.asyncio
@pytest.mark.parametrize("path,extra", [
    ("/", [f"Cookie: {BIG_COOKIE}"]),
    (LONG_PATH, []),
    (LONG_PATH, [f"Cookie: {BIG_COOKIE}", f"Referer: http://example.com/{'r' * 9000}"]),
])
async def test_a_redirected_request_with_a_big_cookie_or_a_long_url_gets_the_302(
        config: Config, path: str, extra: list[str]) -> None:
    """Through the portal's own server (PortalServer) on a real socket."""
    enforcer = FakeEnforcer()
    local = replace(config, portal=replace(config.portal, listen=Listen("127.0.0.1", 0)),
                    metrics=replace(config.metrics, portal_listen=None))
    server = PortalServer(local, enforcer)
    await server.start()
    try:
        port = server.sockets[0].getsockname()[1]
        status, headers = await raw_request(port, get(path, "example.com", *extra))
    finally:
        await server.close()
    assert status == 302 and headers["Location"] == PORTAL_URL and headers["Cache-Control"] == "no-store"
    assert enforcer.asked == []


@pytest.mark.asyncio
async def test_the_test_client_sees_the_same_limits(config: Config) -> None:
    """Through aiohttp's test server: the limits travel with the app, wherever it is served."""
    async with portal(config) as client:
        redirected = await client.get(LONG_PATH, headers={"Host": "example.com", "Cookie": BIG_COOKIE},
                                      allow_redirects=False)
        assert redirected.status == 302 and redirected.headers["Location"] == PORTAL_URL
        page = await client.get("/", headers=on_portal(Cookie=BIG_COOKIE))
        assert page.status == 200  # the portal's own page too: the cookie is the portal host's
        assert requests_total(client, "redirect") == 1


@pytest.mark.asyncio
async def test_beyond_the_limits_a_request_is_still_refused(config: Config) -> None:
    local = replace(config, portal=replace(config.portal, listen=Listen("127.0.0.1", 0)),
                    metrics=replace(config.metrics, portal_listen=None))
    server = PortalServer(local, FakeEnforcer())
    await server.start()
    try:
        port = server.sockets[0].getsockname()[1]
        status, _ = await raw_request(port, get("/", "example.com", f"Cookie: {'c' * (MAX_LINE + 10)}"))
        too_long, _ = await raw_request(port, get("/" + "p" * (MAX_LINE + 10), PORTAL_HOST))
    finally:
        await server.close()
    assert status == 400 and too_long == 400

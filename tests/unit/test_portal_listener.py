"""The portal's own listeners (``captive_portal.server``: ``LIMITS``, one guard for the process) against one
subscriber's idle connections, oversized heads and malformed requests, through ``PortalServer`` on loopback (clients
bind to 127.0.0.x to be different subscribers). The kernel test ``tests/kernel/test_portal_flood.py`` does the same
through the gateway with systemd's default open-files limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
from test_listener_guard import _closed, _connect
from test_portal import PORTAL_URL, FakeEnforcer, config
from test_supervisor import until

from captive_portal import server as server_module
from captive_portal.app import MAX_REQUEST_BYTES, REGISTRY_KEY
from captive_portal.server import PER_SOURCE, PortalServer
from enforcer.config import Config, Listen

__all__ = ["config"]  # the fixture, shared with test_portal

REDIRECTED = b"GET /some/page HTTP/1.1\r\nHost: example.com\r\nUser-Agent: test\r\n\r\n"


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[PortalServer, int]]:
    local = replace(config, portal=replace(config.portal, listen=Listen("127.0.0.1", 0)),
                    metrics=replace(config.metrics, portal_listen=None))
    server = PortalServer(local, FakeEnforcer())
    await server.start()
    try:
        yield server, server.sockets[0].getsockname()[1]
    finally:
        await server.close()


def shed_total(server: PortalServer, reason: str) -> float:
    value = server.app[REGISTRY_KEY].get_sample_value("walled_garden_portal_connections_shed_total",
                                                      {"reason": reason})
    assert value is not None
    return value


async def redirect(port: int, source: str) -> bytes:
    reader, writer = await _connect(port, source)
    try:
        writer.write(REDIRECTED)
        return await _closed(reader)
    finally:
        writer.close()


async def test_one_subscribers_idle_connections_cannot_take_the_portal_from_another(config: Config) -> None:
    async with running(config) as (server, port):
        idle = [await _connect(port, "127.0.0.2") for _ in range(PER_SOURCE + 20)]
        try:
            await until(lambda: shed_total(server, "source_cap") == 20)
            assert len(server.guard.connections) == PER_SOURCE
            answer = await redirect(port, "127.0.0.3")
            assert answer.startswith(b"HTTP/1.1 302") and f"Location: {PORTAL_URL}".encode() in answer
            own = await redirect(port, "127.0.0.2")
            assert own.startswith(b"HTTP/1.1 302"), "the flooding subscriber's own next request sheds its oldest"
        finally:
            for _, writer in idle:
                writer.close()


async def test_a_head_trickled_a_line_at_a_time_is_cut_off_at_the_head_deadline(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """One header line every few seconds used to keep a connection open for ever."""
    monkeypatch.setattr(server_module, "LIMITS", replace(server_module.LIMITS, head_timeout=0.5))
    async with running(config) as (server, port):
        reader, writer = await _connect(port, "127.0.0.2")
        started = asyncio.get_running_loop().time()
        try:
            writer.write(b"GET / HTTP/1.1\r\n")
            for _ in range(30):   # 3 s of one line every 0.1 s, unless closed first
                if reader.at_eof():
                    break
                writer.write(b"X-Slow: 1\r\n")
                await asyncio.sleep(0.1)
            assert await _closed(reader) == b""
        finally:
            writer.close()
        assert asyncio.get_running_loop().time() - started < 1.5
        assert shed_total(server, "head_timeout") == 1


async def test_a_request_head_over_the_bound_is_cut_off_before_the_portal_holds_it(config: Config) -> None:
    """126 header lines of 60 KB, each within aiohttp's limits: 7.5 MB a connection, and 16 such connections took
    the portal from 67 to 304 MB. Now a connection is closed once its request passes ``MAX_REQUEST_BYTES``."""
    async with running(config) as (server, port):
        reader, writer = await _connect(port, "127.0.0.2")
        line = b"X-Pad: " + b"a" * 60_000 + b"\r\n"
        sent = 0
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n")
            for _ in range(126):
                writer.write(line)
                sent += len(line)
                try:
                    await asyncio.wait_for(writer.drain(), 2)
                except ConnectionError:
                    break
            answer = await _closed(reader)
        finally:
            writer.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:80]
        assert shed_total(server, "too_large") == 1
        assert sent > MAX_REQUEST_BYTES
        assert (await redirect(port, "127.0.0.2")).startswith(b"HTTP/1.1 302")


async def test_malformed_requests_are_counted_as_bad_requests_and_logged_once_without_their_bytes(
        config: Config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    requests = [b"GET / HTTP/1.1\r\nHost: example.com\r\nCookie: SECRET" + b"c" * 70_000 + b"\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: example.com\r\n" + b"X-Many: SECRET\r\n" * 129 + b"\r\n",
                b"BREW /SECRET HTTP/1.1\r\nHost: example.com\r\n\r\n",
                b"GET /SECRET HTTP/1.1\r\nHost: example.com\r\nHost: example.org\r\n\r\n"]
    async with running(config) as (server, port):
        for request in requests:
            reader, writer = await _connect(port, "127.0.0.2")
            writer.write(request)
            assert b" 400 " in (await _closed(reader)).split(b"\r\n")[0]
            writer.close()
        counted = server.app[REGISTRY_KEY].get_sample_value("walled_garden_portal_requests_total",
                                                            {"kind": "bad_request"})
    assert counted == 4
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "bad_request" in r.getMessage()]
    assert logged == [logged[0]] and "source=127.0.0.2" in logged[0], logged
    assert "SECRET" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_every_listener_of_the_portal_shares_one_guard(config: Config) -> None:
    local = replace(config, portal=replace(config.portal, listen=Listen("127.0.0.1", 0)),
                    metrics=replace(config.metrics, portal_listen=Listen("127.0.0.1", 0)))
    server = PortalServer(local, FakeEnforcer())
    await server.start()
    try:
        assert server.guard.listening == len(server.sockets) + len(server.metrics_sockets) == 2
    finally:
        await server.close()
    assert server.guard.listening == 0

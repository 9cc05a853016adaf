"""``enforcer.listener_guard`` on loopback: the per-source and total caps, the request byte bound, a stalled TLS
handshake, a failing ``accept``, and aiohttp's error log kept short and quiet. Every loop is bounded; clients bind to
127.0.0.x addresses to be different sources."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_portal_server import make_certificate
from test_supervisor import until

from captive_portal.server import tls_context
from enforcer import listener_guard
from enforcer.listener_guard import ConnectionGuard, GuardedSite, Limits, RequestErrorLog, bind_socket, source_of


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="ok")


@asynccontextmanager
async def served(limits: Limits, app: web.Application | None = None, sock: socket.socket | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[ConnectionGuard, int, list[str]]]:
    """A guarded app on 127.0.0.1; yields the guard, its port and the reasons it counted, in order."""
    counted: list[str] = []
    guard = ConnectionGuard("test", limits, on_shed=counted.append)
    if app is None:
        app = web.Application()
        app.router.add_route("*", "/", _ok)
    app.middlewares.insert(0, guard.middleware)
    runner = web.AppRunner(app, access_log=None, logger=RequestErrorLog("test"))
    await runner.setup()
    sock = sock if sock is not None else bind_socket("127.0.0.1", 0)
    await GuardedSite(runner, sock, guard, ssl_context=ssl_context).start()
    try:
        yield guard, sock.getsockname()[1], counted
    finally:
        await runner.cleanup()


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5)


async def _closed(reader: asyncio.StreamReader, seconds: float = 3.0) -> bytes:
    """What the server sent before closing; fails if it is still open after ``seconds``."""
    data = b""
    async with asyncio.timeout(seconds):
        try:
            while chunk := await reader.read(4096):
                data += chunk
        except ConnectionError:   # reset, or a broken pipe from our own writes: closed all the same
            pass
    return data


async def _get(port: int, source: str) -> bytes:
    reader, writer = await _connect(port, source)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return await _closed(reader)
    finally:
        writer.close()


def test_a_source_is_an_ipv4_address_or_an_ipv6_64() -> None:
    assert source_of(("192.0.2.7", 80)) == "192.0.2.7" != source_of(("192.0.2.8", 80))
    same = source_of(("2001:db8:1:2::1", 80, 0, 0))
    assert same == source_of(("2001:db8:1:2:ffff::9", 80, 0, 0)) != source_of(("2001:db8:1:3::1", 80, 0, 0))
    assert source_of(("::ffff:192.0.2.7", 80, 0, 0)) == "192.0.2.7", "IPv4-mapped: the IPv4 address"
    assert source_of(("fe80::1%eth0", 80, 0, 2)) == source_of(("fe80::2", 80, 0, 2))


async def test_one_source_over_its_cap_sheds_its_own_oldest_idle_connection_never_anothers() -> None:
    async with served(Limits(per_source=3)) as (guard, port, counted):
        other = await _connect(port, "127.0.0.3")
        mine = [await _connect(port, "127.0.0.2") for _ in range(3)]
        await until(lambda: len(guard.connections) == 4)
        extra = await _connect(port, "127.0.0.2")
        try:
            assert await _closed(mine[0][0]) == b"", "the source's oldest idle connection made room"
            assert counted == ["source_cap"]
            other[1].write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await _closed(other[0])).startswith(b"HTTP/1.1 200"), "another source's idle one stays"
            assert len(guard.sources[source_of(("127.0.0.2", 0))]) == 3
        finally:
            for _, writer in [other, *mine, extra]:
                writer.close()


async def test_when_all_of_a_sources_connections_are_answering_its_next_is_refused() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/", slow)
    async with served(Limits(per_source=2), app) as (guard, port, counted):
        busy = [await _connect(port, "127.0.0.2") for _ in range(2)]
        for _, writer in busy:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await until(lambda: all(c.handling for c in guard.connections) and len(guard.connections) == 2)
        refused, writer = await _connect(port, "127.0.0.2")
        try:
            assert await _closed(refused) == b"" and counted == ["source_cap"]
            release.set()
            for reader, _ in busy:
                assert (await _closed(reader)).startswith(b"HTTP/1.1 200"), "never shed while being answered"
        finally:
            release.set()
            writer.close()
            for _, w in busy:
                w.close()


async def test_the_total_cap_sheds_the_oldest_idle_connection_of_any_source() -> None:
    async with served(Limits(max_connections=3)) as (guard, port, counted):
        first = await _connect(port, "127.0.0.2")
        rest = [await _connect(port, f"127.0.0.{i}") for i in (3, 4)]
        await until(lambda: len(guard.connections) == 3)
        try:
            assert (await _get(port, "127.0.0.5")).startswith(b"HTTP/1.1 200")
            assert await _closed(first[0]) == b"" and counted == ["connection_cap"]
        finally:
            for _, writer in [first, *rest]:
                writer.close()


async def test_a_request_over_its_byte_bound_is_answered_431_and_closed_before_it_is_buffered() -> None:
    async with served(Limits(max_request_bytes=32 * 1024)) as (_guard, port, counted):
        reader, writer = await _connect(port, "127.0.0.2")
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            for _ in range(8):                       # 8 lines of 6 KB: each within aiohttp's limits, not their sum
                writer.write(b"X-Pad: " + b"a" * 6000 + b"\r\n")
            answer = await _closed(reader)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:80]
            assert counted == ["too_large"]
            assert (await _get(port, "127.0.0.2")).startswith(b"HTTP/1.1 200"), "a request within it is answered"
        finally:
            writer.close()


async def test_a_slow_body_is_shed_at_its_deadline_and_an_oversized_one_answered_by_the_app() -> None:
    app = web.Application(client_max_size=100)
    app.router.add_post("/", _ok)
    async with served(Limits(body_timeout=0.3), app) as (_guard, port, counted):
        reader, writer = await _connect(port, "127.0.0.2")
        try:
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n0123")
            assert await _closed(reader) == b"" and counted == ["body_timeout"]
        finally:
            writer.close()
        reader, writer = await _connect(port, "127.0.0.2")
        try:   # no too_large answer of the guard's: the app's own (aiohttp's 413)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\nConnection: close\r\n\r\n" + b"x" * 500)
            assert (await _closed(reader)).startswith(b"HTTP/1.1 413")
        finally:
            writer.close()


@pytest.fixture
def tls(tmp_path: Path) -> ssl.SSLContext:
    return tls_context(make_certificate(tmp_path))


async def test_a_stalled_tls_handshake_holds_a_counted_place_until_the_head_deadline(tls: ssl.SSLContext) -> None:
    """TLS connections are counted from ``accept``, not from the end of their handshake (asyncio's
    ``create_server`` would hide them from the guard for its 60 s handshake timeout)."""
    async with served(Limits(head_timeout=0.5, per_source=2), ssl_context=tls) as (guard, port, counted):
        silent = [await _connect(port, "127.0.0.2") for _ in range(3)]   # no ClientHello
        try:
            await until(lambda: counted == ["source_cap"])
            assert len(guard.connections) == 2, "the third pushed the first out"
            assert await _closed(silent[0][0]) == b""
            assert await _closed(silent[2][0]) == b"" and counted.count("head_timeout") == 2
            await until(lambda: not guard.connections)
            client = ssl.create_default_context()
            client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await _closed(reader)).startswith(b"HTTP/1.1 200")
            writer.close()
        finally:
            for _, writer in silent:
                writer.close()


class _Exhausted(socket.socket):
    """A listening socket whose ``accept`` fails as it does with every descriptor in use."""

    def accept(self) -> tuple[socket.socket, Any]:
        raise OSError(errno.EMFILE, "Too many open files")


async def test_a_failing_accept_is_counted_and_paused_not_spun_on_or_logged_per_attempt(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(listener_guard, "ACCEPT_PAUSE", 0.2)
    sock = _Exhausted(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    caplog.set_level(logging.DEBUG)
    async with served(Limits(), sock=sock) as (_guard, port, counted):
        waiting = socket.create_connection(("127.0.0.1", port), 2)   # queued: never accepted
        try:
            await asyncio.sleep(1.0)
        finally:
            waiting.close()
    assert 2 <= counted.count("accept_failed") <= 7, "once per pause, not once per loop turn"
    assert len([r for r in caplog.records if "connection_shed" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_malformed_requests_are_counted_and_logged_once_without_what_they_sent(
        caplog: pytest.LogCaptureFixture) -> None:
    bad: list[int] = []
    guard = ConnectionGuard("test", Limits())
    app = web.Application(handler_args={"max_field_size": 1000, "max_headers": 8})
    app.router.add_get("/", _ok)
    app.middlewares.insert(0, guard.middleware)
    runner = web.AppRunner(app, access_log=None, logger=RequestErrorLog("test", lambda: bad.append(1)))
    await runner.setup()
    sock = bind_socket("127.0.0.1", 0)
    await GuardedSite(runner, sock, guard).start()
    port = sock.getsockname()[1]
    caplog.set_level(logging.DEBUG)
    requests = [b"GET / HTTP/1.1\r\nHost: x\r\nCookie: SECRETCOOKIE" + b"c" * 2000 + b"\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Many: SECRETMANY\r\n" * 9 + b"\r\n",
                b"BREW /SECRETPATH HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: SECRETHOST\r\nHost: y\r\n\r\n"]
    try:
        for request in requests * 3:
            reader, writer = await _connect(port, "127.0.0.2")
            writer.write(request)
            assert (await _closed(reader)).split(b"\r\n")[0].endswith(b" 400 Bad Request")
            writer.close()
    finally:
        await runner.cleanup()
    assert len(bad) == 12
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and "event=bad_request" in lines[0].getMessage() and "source=127.0.0.2" in \
        lines[0].getMessage(), [r.getMessage() for r in lines]
    assert "SECRET" not in caplog.text, "no byte of what the request said"


async def test_a_handlers_bug_keeps_its_traceback_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/", broken)
    caplog.set_level(logging.INFO)
    async with served(Limits(), app) as (_guard, port, _counted):
        for _ in range(5):
            assert (await _get(port, "127.0.0.2")).startswith(b"HTTP/1.1 500")
    failed = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(failed) == 1 and failed[0].exc_info is not None and "held_back=0" in failed[0].getMessage()

"""The webhook listener against hostile clients (docs/reference.md, Safety rules): idle and trickling connections,
oversized bodies, floods of unsigned requests. Loopback only; every loop is bounded."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from test_webhook import _event, _headers, setup  # noqa: F401  (a fixture)
from test_webhook_worker import bridge  # noqa: F401  (a fixture: the worker over the fake kernel)

from enforcer import listener_guard
from enforcer.api.listeners import start_tcp_site
from enforcer.demo.billing import signed_request

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PAY = {"type": "payment.received", "timestamp": "2026-11-23T10:00:00Z", "data": {"subscriber": "C-1"}}


async def _post_signed(url: str, body: dict[str, Any], event_id: str) -> tuple[int, dict[str, Any]]:
    request = signed_request(url, SECRET, body, event_id=event_id)
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.post(url, data=request.data, headers=dict(request.header_items())) as response):
        return response.status, await response.json()


async def test_hundreds_of_idle_connections_do_not_lock_billing_out(bridge: Any) -> None:  # noqa: F811
    """The worker under an open-files limit of 256 (systemd's default is 1024): 300 idle or
    half-sent connections would take every descriptor and billing's request would never be
    accepted; the oldest idle ones are shed for it instead."""
    worker, _, fake, url, _ = bridge
    port = int(url.split(":")[2].split("/")[0])
    idle: list[asyncio.StreamWriter] = []
    try:
        assert worker.process is not None
        hard = resource.prlimit(worker.process.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(worker.process.pid, resource.RLIMIT_NOFILE, (256, hard))
        for i in range(300):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 2:   # half of them trickle a request head that never ends
                writer.write(b"POST /v1/events HTTP/1.1\r\nHost: gw\r\n")
            idle.append(writer)
        await asyncio.sleep(0.5)
        started = time.monotonic()
        status, answer = await asyncio.wait_for(_post_signed(url, PAY, "idle-1"), 8)
        assert status == 200 and answer["result"] == "applied", answer
        assert time.monotonic() - started < 5
        assert "100.64.0.10" not in fake.view["mode4_32"]
    finally:
        for writer in idle:
            writer.close()


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True})


SHORT = listener_guard.Limits(head_timeout=0.3, body_timeout=0.3)


@pytest.fixture
async def listener(unused_tcp_port: int) -> Any:
    app = web.Application(client_max_size=1024)
    app.router.add_post("/", _ok)
    runner = await start_tcp_site(app, "127.0.0.1", unused_tcp_port, SHORT)
    yield unused_tcp_port
    await runner.cleanup()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing; fails the test if it is still open after ``seconds``."""
    data = b""
    async with asyncio.timeout(seconds):
        while chunk := await reader.read(4096):
            data += chunk
    return data


@pytest.mark.parametrize("sent", [b"", b"POST / HTTP/1.1\r\nHost: gw\r\n", b"POST / HTTP/1.1\r\n"
                                  b"Host: gw\r\nContent-Length: 100\r\n\r\n0123456789"],
                         ids=["nothing", "half-a-head", "half-a-body"])
async def test_a_connection_that_stalls_is_closed_at_its_deadline(listener: int, sent: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener)
    try:
        writer.write(sent)
        assert await _closed_within(reader, 3) == b""
    finally:
        writer.close()


async def test_a_kept_alive_connection_gets_a_new_deadline_after_each_answer(listener: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listener)
    try:
        for _ in range(3):
            await asyncio.sleep(0.15)   # each pause is shorter than the deadline, their sum is not
            writer.write(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}")
            async with asyncio.timeout(3):
                assert (await reader.readline()).startswith(b"HTTP/1.1 200")
                while await reader.readline() != b"\r\n":
                    pass
                await reader.readexactly(len(b'{"ok": true}'))
        assert await _closed_within(reader, 3) == b""
    finally:
        writer.close()


async def test_an_oversized_chunked_body_is_413(listener: int) -> None:
    chunk = b"x" * 4000
    async with aiohttp.ClientSession() as session:
        async def body() -> Any:
            for _ in range(4):
                yield chunk
        async with session.post(f"http://127.0.0.1:{listener}/", data=body()) as response:
            assert response.status == 413
            assert "larger than 1024" in (await response.json())["error"]


async def test_the_cap_sheds_the_oldest_idle_connection_never_a_busy_one(unused_tcp_port: int) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"slow": True})

    app = web.Application()
    app.router.add_post("/slow", slow)
    app.router.add_post("/", _ok)
    runner = await start_tcp_site(app, "127.0.0.1", unused_tcp_port, listener_guard.Limits(max_connections=3))
    url = f"http://127.0.0.1:{unused_tcp_port}"
    writers: list[asyncio.StreamWriter] = []
    try:
        async with aiohttp.ClientSession() as session:
            busy = asyncio.ensure_future(session.post(f"{url}/slow", data=b"{}"))
            await asyncio.sleep(0.2)
            readers = []
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port)
                readers.append(reader)
                writers.append(writer)
                await asyncio.sleep(0.05)
            async with aiohttp.ClientSession() as other, other.post(f"{url}/", data=b"{}") as response:
                assert response.status == 200
            assert await _closed_within(readers[0], 2) == b"", "the oldest idle connection was shed"
            assert await _closed_within(readers[1], 2) == b"", "and the next, for the second one"
            release.set()
            response = await asyncio.wait_for(busy, 5)
            assert response.status == 200 and await response.json() == {"slow": True}
    finally:
        release.set()
        for writer in writers:
            writer.close()
        await runner.cleanup()


async def test_a_flood_of_unsigned_requests_is_counted_logged_sparingly_and_billing_still_served(
        setup: Any, caplog: Any) -> None:  # noqa: F811
    client, enforcer, _fake, _, _ = setup
    caplog.set_level(logging.WARNING, logger="walled_garden.api")
    body = _event("payment.received", "C-1")
    bad = {**_headers(body), "webhook-signature": "v1,AAAA"}
    flood = [client.post("/v1/events", data=body, headers=bad) for _ in range(300)]
    signed = client.post("/v1/events", data=body, headers=_headers(body, "flood-pay"))
    responses = await asyncio.gather(*flood[:150], signed, *flood[150:])
    assert [r.status for r in responses].count(401) == 300
    assert responses[150].status == 200
    assert enforcer.metrics.events.labels("unknown", "unauthorized")._value.get() == 300
    rejected = [r for r in caplog.records if "webhook_rejected" in r.getMessage()]
    assert len(rejected) == 1, "one line per REJECT_LOG_EVERY seconds, not one per request"


def test_the_log_limiter_says_how_many_it_held_back() -> None:
    now = [0.0]
    limiter = listener_guard.LogLimiter(10.0, clock=lambda: now[0])
    assert limiter.allow() == 0
    assert [limiter.allow() for _ in range(5)] == [None] * 5
    now[0] = 10.0
    assert limiter.allow() == 5
    assert limiter.allow() is None

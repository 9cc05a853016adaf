"""The HTTP(S) list source: every failure class is reported and changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from enforcer.config import SubscribersConfig
from enforcer.sources import BACKOFF_START, SourceFailure, UrlSource

GOOD = "subscribers:\n  - {id: C-1, addresses: [100.64.0.10]}\n"


class Billing:
    """A billing export endpoint whose next answer each test chooses."""

    def __init__(self) -> None:
        self.body: bytes = GOOD.encode()
        self.status = 200
        self.delay = 0.0
        self.content_type = "application/yaml"
        self.etag = '"v1"'
        self.truncate = False
        self.stall_after: int | None = None   # bytes sent (no Content-Length), then silence
        self.seen: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status, text="billing is down")
        if request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304)
        if self.stall_after is not None:   # a slow or stalled link: part of the list, then nothing
            response = web.StreamResponse(headers={"Content-Type": self.content_type})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(self.body[:self.stall_after])
            await asyncio.sleep(5)
            await response.write(self.body[self.stall_after:])
            return response
        if self.truncate:  # announce more than we send, then hang up
            response = web.StreamResponse(headers={"Content-Length": str(len(self.body) + 100),
                                                   "Content-Type": self.content_type})
            await response.prepare(request)
            await response.write(self.body)
            request.transport.close()  # type: ignore[union-attr]
            return response
        return web.Response(body=self.body, content_type=self.content_type, headers={"ETag": self.etag})


@pytest.fixture
async def source(tmp_path: Path) -> Any:
    billing = Billing()
    app = web.Application()
    app.router.add_get("/export", billing.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    config = SubscribersConfig(source=str(server.make_url("/export")), poll_interval=60, timeout=0.5,
                               bearer_token_file=str(token))
    seen = Handed()
    url_source = UrlSource(config, seen.on_list, seen.on_failure, seen.on_unchanged)
    async with aiohttp.ClientSession() as session:
        yield url_source, session, billing, seen.lists, seen.failures, seen.unchanged
    await server.close()


class Handed:
    """What a source handed over: lists, failures, "unchanged"."""

    def __init__(self) -> None:
        self.lists: list[Any] = []
        self.failures: list[SourceFailure] = []
        self.unchanged: list[str] = []

    async def on_list(self, update: Any) -> None:
        self.lists.append(update)

    async def on_failure(self, failure: SourceFailure) -> None:
        self.failures.append(failure)

    async def on_unchanged(self, origin: str) -> None:
        self.unchanged.append(origin)


async def test_good_list_then_304_uses_etag_and_bearer_token(source: Any) -> None:
    url_source, session, billing, lists, failures, unchanged = source
    assert await url_source.poll(session)
    assert [s.id for s in lists[0].subscribers] == ["C-1"] and lists[0].fingerprint == '"v1"'
    assert billing.seen[0]["Authorization"] == "Bearer s3cret"
    assert await url_source.poll(session)
    assert billing.seen[1]["If-None-Match"] == '"v1"'
    assert len(lists) == 1 and len(unchanged) == 1 and not failures


@pytest.mark.parametrize("case, reason, needle", [
    ("timeout", "timeout", "within 0.5 s"),
    ("500", "http_500", "HTTP 500"),
    ("bad json", "invalid", "not valid JSON"),
    ("truncated csv", "invalid", "no line ending"),
    ("validation", "invalid", "100.64.0.999"),
    ("cut connection", "truncated", "cut short"),
    ("not utf-8", "invalid", "UTF-8"),
])
async def test_failures_are_reported_and_hand_over_nothing(source: Any, case: str, reason: str, needle: str) -> None:
    url_source, session, billing, lists, failures, _ = source
    if case == "timeout":
        billing.delay = 1.0
    elif case == "500":
        billing.status = 500
    elif case == "bad json":
        billing.body, billing.content_type = b'{"subscribers": [', "application/json"
    elif case == "truncated csv":
        billing.body, billing.content_type = b"id,addresses\nC-1,100.64.0.10\nC-2,100.64", "text/csv"
    elif case == "validation":
        billing.body = b"subscribers:\n  - {id: C-1, addresses: [100.64.0.999]}\n"
    elif case == "cut connection":
        billing.truncate = True
    elif case == "not utf-8":
        billing.body = b"subscribers:\n  - {id: C-\xff, addresses: [100.64.0.10]}\n"
    assert not await url_source.poll(session)
    assert lists == []
    assert [f.reason for f in failures] == [reason]
    assert needle in failures[0].message, failures[0].message


def test_backoff_grows_with_failures_and_is_jittered() -> None:
    config = SubscribersConfig(source="http://192.0.2.1/x", poll_interval=300)

    async def nothing(*_: Any) -> None:
        return None

    url_source = UrlSource(config, nothing, nothing, nothing)
    delays = []
    for failures in range(0, 10):
        url_source.failures = failures
        delays.append(url_source.next_delay())
    assert 225 <= delays[0] <= 375                      # healthy: the poll interval ±25 %
    assert BACKOFF_START * 0.75 <= delays[1] <= BACKOFF_START * 1.25
    assert delays[3] > delays[1] * 2                    # grows
    assert all(d <= 300 * 1.25 for d in delays)         # capped at the interval
    url_source.failures = 4
    assert len({round(url_source.next_delay(), 6) for _ in range(20)}) > 1  # jittered


def test_last_modified_is_only_a_validator_when_safely_old() -> None:
    from enforcer.sources import _usable_last_modified

    sent = "Mon, 23 Nov 2026 10:00:05 GMT"
    assert _usable_last_modified("Mon, 23 Nov 2026 10:00:00 GMT", sent) == "Mon, 23 Nov 2026 10:00:00 GMT"
    assert _usable_last_modified("Mon, 23 Nov 2026 10:00:05 GMT", sent) is None  # same second: weak
    assert _usable_last_modified("garbage", sent) is None
    assert _usable_last_modified("Mon, 23 Nov 2026 10:00:00 GMT", None) is None


def _pki(folder: Path) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    import subprocess

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=folder, check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test billing CA")
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(extra + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: str(folder / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


async def test_https_source_with_client_certificate(tmp_path: Path) -> None:
    import ssl

    pki = _pki(tmp_path)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca.pem"])
    server_ssl.load_cert_chain(pki["server.pem"], pki["server.key"])
    server_ssl.verify_mode = ssl.CERT_REQUIRED
    billing = Billing()
    app = web.Application()
    app.router.add_get("/export", billing.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    lists: list[Any] = []
    failures: list[SourceFailure] = []

    async def on_list(update: Any) -> None:
        lists.append(update)

    async def on_failure(failure: SourceFailure) -> None:
        failures.append(failure)

    try:
        url = f"https://127.0.0.1:{port}/export"
        with_cert = SubscribersConfig(source=url, timeout=5, ca_file=pki["ca.pem"], client_cert=pki["client.pem"],
                                      client_key=pki["client.key"])
        without_cert = SubscribersConfig(source=url, timeout=5, ca_file=pki["ca.pem"])
        async with aiohttp.ClientSession() as session:
            assert await UrlSource(with_cert, on_list, on_failure, on_list).poll(session)
            assert [s.id for s in lists[0].subscribers] == ["C-1"]
            assert not await UrlSource(without_cert, on_list, on_failure, on_list).poll(session)
            assert failures[-1].reason == "unreachable"
            untrusted = SubscribersConfig(source=url, timeout=5)  # system CAs do not know our test CA
            assert not await UrlSource(untrusted, on_list, on_failure, on_list).poll(session)
            assert "certificate" in failures[-1].message.lower()
    finally:
        await runner.cleanup()


# -- a source never dies, and never shows credentials ----------------------------------------

from enforcer.sources import REDACTED, FileSource, ListUpdate, redact_url  # noqa: E402


@pytest.mark.parametrize("url, shown", [
    ("https://billing.example/export.csv", "https://billing.example/export.csv"),
    ("https://wg:hunter2@billing.example/x", f"https://{REDACTED}@billing.example/x"),
    ("https://billing.example/x?token=abc123&format=csv", f"https://billing.example/x?token={REDACTED}&format=csv"),
    ("https://b.example/x?access_token=a&api_key=b&sig=c&X-Amz-Signature=d&password=e&auth=f&day=mon",
     f"https://b.example/x?access_token={REDACTED}&api_key={REDACTED}&sig={REDACTED}&X-Amz-Signature={REDACTED}"
     f"&password={REDACTED}&auth={REDACTED}&day=mon"),
    ("https://b.example/x#secret", f"https://b.example/x#{REDACTED}"),
    ("/etc/walled-garden/restricted.yaml", "/etc/walled-garden/restricted.yaml"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.fixture
async def secret_billing() -> Any:
    billing = Billing()
    app = web.Application()
    app.router.add_get("/export", billing.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield billing, f"http://wg:hunter2pw@127.0.0.1:{server.port}/export?token=t0ken-xyz&api_key=k3y-xyz"
    await server.close()


SECRETS = ("hunter2pw", "t0ken-xyz", "k3y-xyz")


async def test_credentials_in_the_url_never_reach_origins_messages_or_logs(
        secret_billing: Any, caplog: pytest.LogCaptureFixture) -> None:
    billing, url = secret_billing
    lists: list[ListUpdate] = []
    failures: list[SourceFailure] = []

    async def on_list(update: ListUpdate) -> None:
        lists.append(update)

    async def on_failure(failure: SourceFailure) -> None:
        failures.append(failure)

    url_source = UrlSource(SubscribersConfig(source=url, timeout=2), on_list, on_failure, on_list)  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as session:
        assert await url_source.poll(session)
        billing.body = b"subscribers:\n  - {id: C-1, addresses: [100.64.0.999]}\n"
        billing.etag = '"v2"'
        assert not await url_source.poll(session)
        billing.status = 503
        assert not await url_source.poll(session)
        nobody = re.sub(r":\d+/export", ":9/export", url)          # the discard port: connection refused
        dead = UrlSource(SubscribersConfig(source=nobody, timeout=2), on_list, on_failure, on_list)  # type: ignore[arg-type]
        assert not await dead.poll(session)
    assert lists and len(failures) == 3
    shown = [lists[0].origin] + [f.origin for f in failures] + [f.message for f in failures] + [caplog.text]
    assert "invalid" in [f.reason for f in failures] and "100.64.0.999" in failures[0].message
    for text in shown:
        for secret in SECRETS:
            assert secret not in text, text
    assert lists[0].origin.endswith(f"/export?token={REDACTED}&api_key={REDACTED}")


async def test_url_source_refuses_entries_outside_the_subscriber_prefixes(source: Any) -> None:
    from enforcer.address_space import AddressSpace

    url_source, session, _billing, lists, failures, _ = source
    url_source.space = AddressSpace((ipaddress.ip_network("198.51.100.0/24"),))
    assert not await url_source.poll(session)
    assert lists == [] and "outside gateway.subscriber_prefixes" in failures[0].message


async def test_url_source_run_survives_an_unexpected_error(source: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import enforcer.sources as sources

    url_source, _, billing, lists, failures, _ = source
    url_source.config = SubscribersConfig(source=url_source.url, poll_interval=0.02, timeout=2)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sources, "parse_list", broken)
    stop = asyncio.Event()
    task = asyncio.create_task(url_source.run(stop))
    for _ in range(200):
        if len(failures) >= 2:
            break
        await asyncio.sleep(0.02)
    assert failures[0].reason == "internal" and "RuntimeError: a bug" in failures[0].message
    monkeypatch.undo()
    billing.etag = '"v9"'
    for _ in range(300):
        if lists:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert lists and [s.id for s in lists[0].subscribers] == ["C-1"]


async def _watch(path: Path, on_list_error: bool = False, **kwargs: Any) -> Any:
    lists: list[ListUpdate] = []
    failures: list[SourceFailure] = []

    async def on_list(update: ListUpdate) -> None:
        if on_list_error and not lists:
            lists.append(update)
            raise RuntimeError("the daemon tripped")
        lists.append(update)

    async def on_failure(failure: SourceFailure) -> None:
        failures.append(failure)

    return FileSource(str(path), on_list, on_failure, **kwargs), lists, failures


async def _until(condition: Any) -> None:
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.parametrize("bad", [
    b"subscribers:\n  - {id: C-1, addresses: [100.64.0.1], exempt_until: 9999-12-31}\n",
    b"[" * 100_000 + b"]" * 100_000,
    b"id,addresses\nC-\xff,100.64.0.1\n",
    b"C-1,127.0.0.1\n",
])
async def test_file_source_reports_any_bad_list_and_reads_the_next(tmp_path: Path, bad: bytes) -> None:
    path = tmp_path / "restricted.csv"
    path.write_bytes(bad)
    file_source, lists, failures = await _watch(path)
    stop = asyncio.Event()
    task = asyncio.create_task(file_source.run(stop))
    try:
        await _until(lambda: failures)
        assert failures[0].reason == "invalid" and f"{path}:" in failures[0].message
        path.write_text("C-2,100.64.0.2\n")
        await _until(lambda: lists)
        assert [s.id for s in lists[0].subscribers] == ["C-2"] and not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_file_source_survives_unexpected_errors_reading_and_applying(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import enforcer.sources as sources

    path = tmp_path / "restricted.csv"
    path.write_text("C-1,100.64.0.1\n")
    file_source, lists, failures = await _watch(path, on_list_error=True)
    real = sources.read_list_file
    monkeypatch.setattr(sources, "read_list_file", lambda *a, **k: 1 / 0)
    await file_source.check("f1")
    assert failures[-1].reason == "internal" and "ZeroDivisionError" in failures[-1].message
    monkeypatch.setattr(sources, "read_list_file", real)
    await file_source.check("f2")           # on_list raises: reported, the source goes on
    assert failures[-1].reason == "internal" and "the daemon tripped" in failures[-1].message
    await file_source.check("f3")
    assert len(lists) == 2


async def test_file_source_refuses_entries_outside_the_subscriber_prefixes(tmp_path: Path) -> None:
    from enforcer.address_space import AddressSpace

    path = tmp_path / "restricted.csv"
    path.write_text("C-1,100.64.0.1\nC-2,198.51.100.9\n")
    file_source, lists, failures = await _watch(path, space=AddressSpace((ipaddress.ip_network("100.64.0.0/10"),)))
    await file_source.check()
    assert not lists and f"{path}:2" in failures[0].message and "outside" in failures[0].message


def _entries(n: int) -> bytes:
    return ("subscribers:\n" + "".join(f"  - {{id: C-{i}, addresses: [100.64.{i // 250}.{i % 250 + 1}]}}\n"
                                        for i in range(n))).encode()


async def test_a_list_cut_by_a_stalled_link_is_a_timeout_not_a_shorter_list(source: Any) -> None:
    """Ten whole entries arrive, then the link stalls: a valid list of ten that would lift the
    other forty. The poll must wait for the end (its timeout), and hand over nothing."""
    url_source, session, billing, lists, failures, _ = source
    billing.body = _entries(50)
    billing.stall_after = billing.body.index(b"  - {id: C-10,")
    assert not await url_source.poll(session)
    assert lists == [] and [f.reason for f in failures] == ["timeout"], failures


async def test_a_list_larger_than_the_socket_buffer_arrives_whole(source: Any) -> None:
    url_source, session, billing, lists, failures, _ = source
    url_source.config = dataclasses.replace(url_source.config, timeout=30)
    billing.body = _entries(40_000)            # ~2 MB
    assert len(billing.body) > 1 << 20
    assert await url_source.poll(session), failures
    assert len(lists[0].subscribers) == 40_000 and not failures


@pytest.mark.parametrize("framing", ["close-delimited", "content-length", "chunked"])
async def test_an_answer_that_cannot_tell_a_cut_from_its_end_is_refused(tmp_path: Path, framing: str) -> None:
    """Without Content-Length or chunks (HTTP/1.0 style, the body ends when the connection
    does), half a list cut after a whole line looks complete and would lift the other half."""
    body = _entries(20)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/yaml\r\nConnection: close\r\n"
        if framing == "content-length":
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        elif framing == "chunked":
            writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode()
                         + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        else:
            writer.write(f"{head}\r\n".encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen = Handed()
    lists, failures = seen.lists, seen.failures
    config = SubscribersConfig(source=f"http://127.0.0.1:{port}/export", poll_interval=60, timeout=5)
    try:
        async with aiohttp.ClientSession() as session:
            ok = await UrlSource(config, seen.on_list, seen.on_failure, seen.on_unchanged).poll(session)
    finally:
        server.close()
        await server.wait_closed()
    if framing == "close-delimited":
        assert not ok and lists == [] and [f.reason for f in failures] == ["truncated"], failures
        assert "Content-Length" in failures[0].message
    else:
        assert ok and len(lists[0].subscribers) == 20, failures

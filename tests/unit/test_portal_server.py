"""Running the portal: dual-stack sockets, HTTPS, the metrics endpoint, clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import aiohttp
import aiohttp.abc
import pytest

from captive_portal.enforcer_client import Ack, Lookup
from captive_portal.server import PortalServer, bind_sockets, tls_context
from enforcer.config import Config, Listen, PortalTls, parse_config
from required import tool

ROOT = Path(__file__).resolve().parents[2]
PORTAL_HOST = "portal.isp.example"
PORTAL_URL = f"http://{PORTAL_HOST}/"
CONFIG_YAML = f"""
state_dir: /nonexistent/wg-unit
subscribers: {{source: /nonexistent/wg-unit/list.yaml}}
portal: {{listen: "0.0.0.0:8080", url: "{PORTAL_URL}", provider: {{name: "Example ISP"}}}}
api: {{socket: /nonexistent/wg-unit/control.sock}}
"""


class FakeEnforcer:
    """Says every caller is restricted and remembers who asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def lookup(self, address: str) -> Lookup:
        self.asked.append(address)
        return Lookup(address, True, "walled-garden", "overdue", "")

    async def acknowledge(self, address: str) -> Ack:
        return Ack(False, error="walled-garden")


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback here")


#: Any free loopback port (Listen is frozen: one value serves every default).
LOOPBACK_ANY_PORT = Listen("127.0.0.1", 0)


def local_config(portal: Listen, metrics: Listen | None = LOOPBACK_ANY_PORT) -> Config:
    config = parse_config(CONFIG_YAML)
    return replace(config, portal=replace(config.portal, listen=portal),
                   metrics=replace(config.metrics, portal_listen=metrics))


def test_a_literal_address_gets_one_socket() -> None:
    sockets = bind_sockets(Listen("127.0.0.1", 0))
    try:
        assert [s.family for s in sockets] == [socket.AF_INET]
        assert sockets[0].getsockname()[0] == "127.0.0.1"
    finally:
        for sock in sockets:
            sock.close()


@needs_ipv6
@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_a_wildcard_binds_both_families_on_one_port(wildcard: str) -> None:
    sockets = bind_sockets(Listen(wildcard, 0))
    try:
        assert [s.family for s in sockets] == [socket.AF_INET, socket.AF_INET6]
        v4, v6 = sockets
        assert v4.getsockname()[1] == v6.getsockname()[1]
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for sock in sockets:
            sock.close()


def test_names_are_never_resolved() -> None:
    with pytest.raises(ValueError):
        bind_sockets(Listen("localhost", 0))


@pytest.mark.asyncio
async def test_server_serves_portal_and_metrics() -> None:
    server = PortalServer(local_config(Listen("127.0.0.1", 0)), FakeEnforcer())
    await server.start()
    try:
        port = server.sockets[0].getsockname()[1]
        metrics_port = server.metrics_sockets[0].getsockname()[1]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/anything", headers={"Host": "example.com"},
                                allow_redirects=False) as response:
                assert response.status == 302 and response.headers["Location"] == PORTAL_URL
            async with http.get(f"http://127.0.0.1:{port}/", headers={"Host": PORTAL_HOST}) as response:
                assert response.status == 200
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=")
                text = await response.text()
    finally:
        await server.close()
    assert 'walled_garden_portal_requests_total{kind="redirect"} 1.0' in text
    assert 'walled_garden_portal_requests_total{kind="page"} 1.0' in text
    assert "# TYPE walled_garden_portal_requests_total counter" in text


@needs_ipv6
@pytest.mark.asyncio
async def test_wildcard_server_answers_on_ipv4_and_ipv6_with_plain_peer_addresses() -> None:
    enforcer = FakeEnforcer()
    server = PortalServer(local_config(Listen("0.0.0.0", 0), metrics=None), enforcer)
    await server.start()
    try:
        assert server.metrics_sockets == []
        port = server.sockets[0].getsockname()[1]
        async with aiohttp.ClientSession() as http:
            for host in ("127.0.0.1", "[::1]"):
                async with http.get(f"http://{host}:{port}/api/captive", headers={"Host": PORTAL_HOST}) as r:
                    assert r.status == 200
    finally:
        await server.close()
    assert enforcer.asked == ["127.0.0.1", "::1"]


def make_certificate(directory: Path, name: str = "portal") -> PortalTls:
    """A self-signed certificate for ``portal.isp.example`` (P-256: made in milliseconds)."""
    openssl = tool("openssl", "openssl")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", f"/CN={PORTAL_HOST}",
                    "-addext", f"subjectAltName=DNS:{PORTAL_HOST}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=20)
    return PortalTls(Listen("127.0.0.1", 0), str(cert), str(key))


def trusting(tls: PortalTls) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=tls.cert)


@pytest.mark.asyncio
async def test_https_listener_serves_the_same_portal(tmp_path: Path) -> None:
    tls = make_certificate(tmp_path)
    config = local_config(Listen("127.0.0.1", 0), metrics=None)
    config = replace(config, portal=replace(config.portal, url=f"https://{PORTAL_HOST}/", tls=tls))
    enforcer = FakeEnforcer()
    server = PortalServer(config, enforcer)
    await server.start()
    try:
        plain_port = server.sockets[0].getsockname()[1]
        port = server.tls_sockets[0].getsockname()[1]
        # Resolve the portal's name to the test listener, so the certificate is verified for real.
        connector = aiohttp.TCPConnector(ssl=trusting(tls), resolver=Pinned())
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(f"https://{PORTAL_HOST}:{port}/") as response:
                assert response.status == 200  # host named, on its HTTPS port: the portal page
                assert "restricted" in await response.text()
            async with http.get(f"https://{PORTAL_HOST}:{port}/api/captive") as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "application/captive+json"
                assert response.headers["Cache-Control"] == "private, no-store"
                assert await response.json(content_type=None) == {
                    "captive": True, "user-portal-url": f"https://{PORTAL_HOST}/"}
            async with http.get(f"https://{PORTAL_HOST}:{port}/x", headers={"Host": "example.com"},
                                allow_redirects=False) as response:
                assert response.status == 302 and response.headers["Location"] == f"https://{PORTAL_HOST}/"
            async with http.get(f"http://127.0.0.1:{plain_port}/generate_204",
                                headers={"Host": "connectivitycheck.gstatic.com"}, allow_redirects=False) as response:
                assert response.status == 302 and response.headers["Location"] == f"https://{PORTAL_HOST}/"
        # A renewed certificate is picked up on SIGHUP; a broken one keeps the old.
        renewed = make_certificate(tmp_path, "renewed")
        os.replace(renewed.cert, tls.cert)
        os.replace(renewed.key, tls.key)
        server.reload_tls()
        await asyncio.to_thread(Path(tls.key).write_text, "broken")
        server.reload_tls()
        # Only the renewed certificate is trusted now (tls.cert holds it): the server must present it.
        connector = aiohttp.TCPConnector(ssl=trusting(tls), resolver=Pinned())
        async with (aiohttp.ClientSession(connector=connector) as http,
                    http.get(f"https://{PORTAL_HOST}:{port}/api/captive") as response):
            assert response.status == 200
    finally:
        await server.close()
    assert enforcer.asked == ["127.0.0.1", "127.0.0.1", "127.0.0.1"]


class Pinned(aiohttp.abc.AbstractResolver):
    """Resolves the portal's name to 127.0.0.1 and nothing else."""

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        assert host == PORTAL_HOST, host
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


@needs_ipv6
@pytest.mark.asyncio
async def test_https_wildcard_binds_both_families(tmp_path: Path) -> None:
    tls = replace(make_certificate(tmp_path), listen=Listen("::", 0))
    config = local_config(Listen("127.0.0.1", 0), metrics=None)
    server = PortalServer(replace(config, portal=replace(config.portal, tls=tls)), FakeEnforcer())
    await server.start()
    try:
        assert [s.family for s in server.tls_sockets] == [socket.AF_INET, socket.AF_INET6]
        port = server.tls_sockets[0].getsockname()[1]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
            for host in ("127.0.0.1", "[::1]"):
                async with http.get(f"https://{host}:{port}/api/captive", headers={"Host": PORTAL_HOST}) as r:
                    assert r.status == 200
    finally:
        await server.close()


def test_a_bad_certificate_fails_start_up(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(ssl.SSLError):
        tls_context(PortalTls(Listen("127.0.0.1", 0), str(tmp_path / "c.pem"), str(tmp_path / "c.pem")))


def test_run_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The CLI entry point: one start-up line naming where it listens, exit 0 on SIGTERM."""
    script = textwrap.dedent(f"""
        import logging
        from dataclasses import replace
        from enforcer.config import Listen, parse_config
        from captive_portal.server import run
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        config = parse_config({CONFIG_YAML!r})
        config = replace(config, portal=replace(config.portal, listen=Listen("127.0.0.1", 0)),
                         metrics=replace(config.metrics, portal_listen=Listen("127.0.0.1", 0)))
        run(config)
        print("exited", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "event=portal_started" in line and " listen=127.0.0.1:" in line, line
        assert " metrics=127.0.0.1:" in line and "\n" not in line.rstrip("\n"), line
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "exited" in stdout

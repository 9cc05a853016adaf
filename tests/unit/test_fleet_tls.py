"""NATS over TLS with client certificates, from files (docs/security.md): a gateway with the
fleet's CA and its own certificate follows the stream; one without a certificate the server
accepts gets nowhere, answers "retry later" and changes nothing."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from enforcer.config import parse_config
from enforcer.daemon import Enforcer
from enforcer.dataplane.fake import FakeDataplane
from enforcer.events import PAYMENT, Event
from enforcer.model import Mode
from enforcer.outcome import Outcome, Refusal, Refused
from enforcer.sources import ListUpdate
from enforcer.subscribers import parse_list
from tests.daemon_helpers import NoConntrack
from tests.nats_server import NatsServer
from tests.required import tool

LIST = "subscribers:\n  - {id: C-1, addresses: [100.64.0.10], reason: overdue}\n"


def pki(tmp: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    openssl = tool("openssl", "openssl")
    d = tmp / "pki"
    d.mkdir()

    def run(*argv: str) -> None:
        subprocess.run([openssl, *argv], cwd=d, check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", "/CN=test fleet CA", "-keyout", "ca.key", "-out", "ca.pem")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return d


async def gateway(tmp: Path, name: str, url: str, tls: str) -> Enforcer:
    (tmp / "l.yaml").write_text(LIST)
    config = parse_config(f"state_dir: {tmp}/{name}\nsubscribers: {{source: {tmp}/l.yaml}}\n"
                          f"fleet: {{gateway: {name}, nats: {{url: '{url}'{tls}}}, stream: WG_TLS, "
                          "catch_up_timeout: 5s, answer_timeout: 3s}\n")
    enforcer = Enforcer(config, dataplane=FakeDataplane(), conntrack=NoConntrack())  # type: ignore[arg-type]
    await enforcer.engine.restore()
    await enforcer.lists.on_list(ListUpdate(parse_list(LIST, "l.yaml"), "l.yaml", "1"))
    return enforcer


async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    d = pki(tmp_path)
    tls = (f'tls {{\n  cert_file: "{d}/server.pem"\n  key_file: "{d}/server.key"\n  ca_file: "{d}/ca.pem"\n'
           "  verify: true\n  timeout: 2\n}\n")
    server = NatsServer(tmp_path / "nats", config=tls)
    server.start()
    url = f"tls://127.0.0.1:{server.port}"
    good = await gateway(tmp_path, "gw-tls", url, f", ca_file: {d}/ca.pem, cert_file: {d}/client.pem, "
                                                  f"key_file: {d}/client.key")
    bad = await gateway(tmp_path, "gw-nocert", url, f", ca_file: {d}/ca.pem")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(e.fleet.run(stop)) for e in (good, bad) if e.fleet is not None]
    try:
        assert good.fleet is not None and bad.fleet is not None
        assert await good.fleet.caught_up(10), good.fleet.error
        result = await asyncio.wait_for(good.sink.submit(Event("evt-tls", PAYMENT, time.time(), "C-1"),
                                                         time.perf_counter()), 10)
        assert isinstance(result, Outcome) and result.body["mode"] == "free", result
        assert not await bad.fleet.caught_up(2)
        refused = await asyncio.wait_for(bad.sink.submit(Event("evt-nocert", PAYMENT, time.time(), "C-1"),
                                                         time.perf_counter()), 10)
        assert isinstance(refused, Refusal) and refused.kind is Refused.UNAVAILABLE, refused
        assert bad.engine.decisions["C-1"].mode is Mode.WALLED_GARDEN
        assert "cannot connect" in bad.fleet.error, bad.fleet.error
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        for e in (good, bad):
            await e.close()
        server.stop()

"""The real DHCP/RADIUS peers of the session tests work: dnsmasq, Kea 4/6, udhcpc, dhclient -6, radclient.

These prove the helpers of dhcp_peers.py against the genuine binaries, so the end-to-end
session tests built on them fail only for the daemon's reasons. Each test starts its own
segment and servers in its own namespaces and directory, and stays well under 20 s.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhcp_peers import Dhcp6Client, DhcpClient, Dnsmasq, Kea4, Kea6, Lan, radclient, unused_address

from enforcer.demo.topology import Topology
from required import tool

POOL4 = ("100.64.200.100", "100.64.200.150")


@pytest.fixture
def lan() -> Iterator[Lan]:
    with Lan(clients=2) as segment:
        yield segment


def _need(*programs: tuple[str, str]) -> None:
    for name, package in programs:
        tool(name, package)


def test_dnsmasq_lease_lands_in_the_lease_file_and_a_release_removes_it(lan: Lan, tmp_path: Path) -> None:
    _need(("dnsmasq", "dnsmasq-base"), ("udhcpc", "udhcpc"))
    a = lan.clients[0]
    with Dnsmasq(lan.gateway_netns, lan.bridge, *POOL4, tmp_path / "dnsmasq.leases") as server, \
            DhcpClient(a.netns, a.interface, tmp_path) as client:
        address = client.acquire()
        assert ipaddress.IPv4Address(POOL4[0]) <= ipaddress.IPv4Address(address) <= ipaddress.IPv4Address(POOL4[1])
        assert lan.addresses4(a.netns) == [address]
        server.wait_lease(lambda leases: [(m, ip) for _, m, ip in leases] == [(a.mac, address)])
        print("dnsmasq lease line:", (tmp_path / "dnsmasq.leases").read_text().strip())

        client.release()
        server.wait_lease(lambda leases: leases == [])
        assert lan.addresses4(a.netns) == []


def test_dnsmasq_moves_a_client_and_hands_its_old_address_to_another(lan: Lan, tmp_path: Path) -> None:
    _need(("dnsmasq", "dnsmasq-base"), ("udhcpc", "udhcpc"))
    a, b = lan.clients
    with Dnsmasq(lan.gateway_netns, lan.bridge, *POOL4, tmp_path / "dnsmasq.leases") as server, \
            DhcpClient(a.netns, a.interface, tmp_path) as client_a, \
            DhcpClient(b.netns, b.interface, tmp_path) as client_b:
        old_a = client_a.acquire()
        old_b = client_b.acquire()
        assert old_a != old_b
        new_a = unused_address(old_a, old_b)

        server.reassign(a.mac, new_a)
        assert client_a.renew() == new_a      # NAK of old_a, then DISCOVER -> reserved address
        server.wait_lease(lambda leases: {(m, ip) for _, m, ip in leases} == {(a.mac, new_a), (b.mac, old_b)})

        server.reassign(b.mac, old_a)
        assert client_b.renew() == old_a
        server.wait_lease(lambda leases: {(m, ip) for _, m, ip in leases} == {(a.mac, new_a), (b.mac, old_a)})
        assert lan.addresses4(a.netns) == [new_a]
        assert lan.addresses4(b.netns) == [old_a]


def test_dnsmasq_renew_without_a_change_keeps_the_address(lan: Lan, tmp_path: Path) -> None:
    _need(("dnsmasq", "dnsmasq-base"), ("udhcpc", "udhcpc"))
    a = lan.clients[0]
    with Dnsmasq(lan.gateway_netns, lan.bridge, *POOL4, tmp_path / "dnsmasq.leases") as server, \
            DhcpClient(a.netns, a.interface, tmp_path) as client:
        address = client.acquire()
        before = server.leases()[0][0]
        time.sleep(1.1)   # the lease's expiry is in whole seconds: let it visibly move
        assert client.renew() == address
        server.wait_lease(lambda leases: len(leases) == 1 and leases[0][0] != before and leases[0][2] == address)


def test_kea4_writes_its_memfile_and_a_release_appends_a_zero_lifetime(lan: Lan, tmp_path: Path) -> None:
    _need(("kea-dhcp4", "kea-dhcp4-server"), ("udhcpc", "udhcpc"))
    a = lan.clients[0]
    leases = tmp_path / "kea-leases4.csv"
    with Kea4(lan.gateway_netns, lan.bridge, "100.64.200.0/24", "100.64.200.160 - 100.64.200.170", leases) as kea, \
            DhcpClient(a.netns, a.interface, tmp_path) as client:
        address = client.acquire()
        kea.wait_lease(lambda rows: any(r["address"] == address and r["hwaddr"] == a.mac for r in rows))
        lines = leases.read_text().splitlines()
        assert lines[0] == ("address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,"
                            "hostname,state,user_context")
        print("kea4 memfile:", *lines, sep="\n")

        client.release()
        kea.wait_lease(lambda rows: rows[-1]["address"] == address and rows[-1]["valid_lifetime"] == "0")
        print("kea4 after release:", leases.read_text().splitlines()[-1])


def test_kea4_lease_file_cleanup_moves_leases_to_dot_2(lan: Lan, tmp_path: Path) -> None:
    _need(("kea-dhcp4", "kea-dhcp4-server"), ("kea-lfc", "kea-common"), ("udhcpc", "udhcpc"))
    a = lan.clients[0]
    leases = tmp_path / "kea-leases4.csv"
    with Kea4(lan.gateway_netns, lan.bridge, "100.64.200.0/24", ("100.64.200.160", "100.64.200.170"), leases,
              lfc_interval=1) as kea, DhcpClient(a.netns, a.interface, tmp_path) as client:
        address = client.acquire()
        compacted = Path(f"{leases}.2")

        def cleaned() -> bool:
            live = leases.read_text().splitlines() if leases.exists() else []
            return compacted.exists() and address in compacted.read_text() and len(live) == 1
        deadline = time.monotonic() + 8.0
        while not cleaned():
            assert time.monotonic() < deadline, f"no LFC rewrite: {sorted(p.name for p in tmp_path.iterdir())}"
            time.sleep(0.1)
        assert [r["address"] for r in kea.leases()] == [address]


def test_kea6_hands_out_an_address_and_a_delegated_prefix(lan: Lan, tmp_path: Path) -> None:
    _need(("kea-dhcp6", "kea-dhcp6-server"), ("dhclient", "isc-dhcp-client"))
    a = lan.clients[0]
    leases = tmp_path / "kea-leases6.csv"
    with Kea6(lan.gateway_netns, lan.bridge, "2001:db8:100:200::/64", "2001:db8:100:200::100 - 2001:db8:100:200::1ff",
              "2001:db8:2100::/48", leases) as kea, Dhcp6Client(a.netns, a.interface, tmp_path) as client:
        address, prefix = client.acquire()
        assert ipaddress.ip_address(address) in ipaddress.ip_network("2001:db8:100:200::/64")
        assert prefix is not None
        assert ipaddress.IPv6Network(prefix).subnet_of(ipaddress.IPv6Network("2001:db8:2100::/48"))
        assert ipaddress.ip_network(prefix).prefixlen == 56
        kea.wait_lease(lambda rows: {(r["lease_type"], r["address"]) for r in rows}
                       == {("0", address), ("2", str(ipaddress.ip_network(prefix).network_address))})
        lines = leases.read_text().splitlines()
        assert lines[0].startswith("address,duid,valid_lifetime,expire,subnet_id,pref_lifetime,lease_type,iaid,"
                                   "prefix_len,")
        assert all(r["hwaddr"] == a.mac for r in kea.leases())
        print("kea6 memfile:", *lines, sep="\n")

        client.release()
        kea.wait_lease(lambda rows: len(rows) == 4 and all(r["valid_lifetime"] == "0" for r in rows[2:]))


def test_radclient_gives_up_quickly_when_nothing_answers(lan: Lan) -> None:
    _need(("radclient", "freeradius-utils"))
    start = time.monotonic()
    result = radclient(lan.gateway4, 18130, "testing123",
                       {"Acct-Status-Type": "Start", "User-Name": "C-1001", "Framed-IP-Address": "100.64.200.5",
                        "Acct-Session-Id": "s-1"}, netns=lan.gateway_netns, timeout=1.0, retries=1)
    assert not result.answered
    assert result.returncode != 0
    assert "No reply from server" in result.output
    assert time.monotonic() - start < 4.0


def _accounting_responder(secret: bytes) -> tuple[socket.socket, list[bytes]]:
    """A minimal RADIUS accounting server on loopback: answers every request, records it (RFC 2866 §3)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5.0)
    received: list[bytes] = []

    def serve() -> None:
        try:
            data, peer = sock.recvfrom(4096)
        except OSError:
            return
        received.append(data)
        code, ident = 5, data[1]
        authenticator = hashlib.md5(struct.pack("!BBH", code, ident, 20) + data[4:20] + secret).digest()
        sock.sendto(struct.pack("!BBH", code, ident, 20) + authenticator, peer)

    threading.Thread(target=serve, daemon=True).start()
    return sock, received


def test_radclient_reports_an_answered_request() -> None:
    _need(("radclient", "freeradius-utils"))
    sock, received = _accounting_responder(b"testing123")
    try:
        result = radclient("127.0.0.1", sock.getsockname()[1], "testing123",
                           {"Acct-Status-Type": "Interim-Update", "User-Name": 'C-"1002"', "Acct-Session-Id": "s-2"})
    finally:
        sock.close()
    assert result.answered, result.output
    assert "Received Accounting-Response" in result.output
    assert received and b'C-"1002"' in received[0]


def test_radclient_refuses_bad_input_before_sending() -> None:
    with pytest.raises(ValueError, match="attribute name"):
        radclient("127.0.0.1", 1813, "s", {"User-Name = x\nFoo": "y"})
    with pytest.raises(ValueError, match="only loopback"):
        radclient("192.0.2.1", 1813, "s", {"User-Name": "x"})
    with pytest.raises(ValueError, match="outside the test ranges"):
        radclient("8.8.8.8", 1813, "s", {"User-Name": "x"}, netns="x")


def test_a_lan_in_a_topology_gateway_reaches_upstream_and_leaves_no_bridge(tmp_path: Path) -> None:
    """The session tests' layout: the segment hangs off the daemon's gateway namespace."""
    _need(("dnsmasq", "dnsmasq-base"), ("udhcpc", "udhcpc"))
    with Topology(subscribers=1) as topo:
        topo.serve_http(topo.upstream, "UPSTREAM OK", ports=(80,))
        with Lan(clients=1, gateway_netns=topo.gateway.netns) as segment:
            a = segment.clients[0]
            with Dnsmasq(segment.gateway_netns, segment.bridge, *POOL4, tmp_path / "dnsmasq.leases"), \
                    DhcpClient(a.netns, a.interface, tmp_path) as client:
                address = client.acquire()
                subprocess.run(["ip", "netns", "exec", a.netns, "ip", "route", "add", "default", "via",
                                segment.gateway4], check=True, timeout=10)
                r = subprocess.run(["ip", "netns", "exec", a.netns, "curl", "-sS", "--max-time", "5",
                                    f"http://{topo.upstream.addr4}/"], capture_output=True, text=True, timeout=15)
                assert r.stdout == "UPSTREAM OK", (address, r.stderr)
        links = topo.run(topo.gateway.netns, "ip", "-o", "link").stdout
        assert segment.bridge not in links

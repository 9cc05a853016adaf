"""The gateway itself, on the real kernel (docs/reference.md, Safety rules).

Subscriber 1 is free, subscriber 2 restricted (its IPv4 address and its IPv6 /64). The daemon
runs with its real webhook listener on 0.0.0.0:8787; instead of the portal, tiny HTTP servers in
the gateway namespace stand for its listeners, bound to the gateway's literal addresses on link
1: plain on 8080, "TLS" on 8443 (plain HTTP is enough to see where the connection lands). A
plain service on 9100 and a TCP listener on 53 stand for the gateway's other services and DNS.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import tcp_connect

from enforcer.dataplane.layout import CALLER_SET, PORTAL_CT_MARK
from enforcer.demo.lab import API_PORT, PORTAL_PORT, Lab
from enforcer.demo.topology import Topology

TLS_PORT = 8443
OTHER_PORT = 9100


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Topology, Lab]]:
    with Topology(subscribers=2) as topo:
        restricted = topo.subscribers[1]
        lab = Lab(topo, tmp_path, [{"id": "C-2002", "addresses": [restricted.addr4, "2001:db8:100:2::/64"],
                                    "reason": "overdue"}])
        for name in ("cert.pem", "key.pem"):   # the daemon only needs them readable; no portal runs
            (tmp_path / name).write_text("not used by the daemon\n")
        lab.config["portal"]["tls"] = {"listen": f"0.0.0.0:{TLS_PORT}", "cert": str(tmp_path / "cert.pem"),
                                       "key": str(tmp_path / "key.pem")}
        import yaml
        lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
        topo.serve_http(topo.gateway, "PORTAL LISTENER", ports=(PORTAL_PORT,))
        topo.serve_http(topo.gateway, "PORTAL TLS LISTENER", ports=(TLS_PORT,))
        topo.serve_http(topo.gateway, "OTHER SERVICE", ports=(OTHER_PORT, 53))
        lab.start_daemon()
        try:
            yield topo, lab
        finally:
            lab.stop_daemon()
            (tmp_path / "daemon.log").exists() and print(lab.log())


def refused_local(topo: Topology, lab: Lab) -> int:
    out = topo.run(topo.gateway.netns, "nft", "list", "counter", "inet", lab.table, "refused_local").stdout
    return int(out.split("packets")[1].split()[0])


def test_restricted_subscriber_is_refused_at_once_by_the_webhook_port_and_other_local_services(gateway) -> None:
    topo, lab = gateway
    free, restricted = topo.subscribers[0].netns, topo.subscribers[1].netns
    gw4, gw6 = topo.gateway_addr4(1), topo.gateway_addr6(1)
    for host in (gw4, gw6, topo.gateway_addr4(2)):
        for port in (API_PORT, OTHER_PORT):
            result, seconds = tcp_connect(topo, restricted, host, port)
            assert result == "ECONNREFUSED" and seconds < 1.0, (host, port, result, seconds)
    assert refused_local(topo, lab) >= 6
    # the same services answer a free subscriber: the refusal is ours, not a closed port
    # (the webhook listener is on 0.0.0.0, IPv4 only)
    for host, port in ((gw4, API_PORT), (gw4, OTHER_PORT), (gw6, OTHER_PORT)):
        assert tcp_connect(topo, free, host, port)[0] == "connected", (host, port)


def test_restricted_subscriber_reaches_the_portal_listeners_and_dns_on_the_gateway(gateway) -> None:
    topo, lab = gateway
    restricted = topo.subscribers[1].netns
    gw4, gw6 = topo.gateway_addr4(1), topo.gateway_addr6(1)
    assert topo.curl(restricted, f"http://{gw4}:{PORTAL_PORT}/")[:2] == (200, "PORTAL LISTENER")
    assert topo.curl(restricted, f"http://[{gw6}]:{PORTAL_PORT}/")[:2] == (200, "PORTAL LISTENER")
    assert topo.curl(restricted, f"http://{gw4}:{TLS_PORT}/")[:2] == (200, "PORTAL TLS LISTENER")
    assert tcp_connect(topo, restricted, gw4, 53)[0] == "connected"
    assert tcp_connect(topo, restricted, gw6, 53)[0] == "connected"
    assert refused_local(topo, lab) == 0


def test_a_free_subscriber_on_the_gateways_port_80_and_443_gets_the_portal_listeners(gateway) -> None:
    topo, _lab = gateway
    free = topo.subscribers[0].netns
    gw4 = topo.gateway_addr4(1)
    assert topo.curl(free, f"http://{gw4}/")[:2] == (200, "PORTAL LISTENER")
    assert topo.curl(free, f"http://{gw4}:443/")[:2] == (200, "PORTAL TLS LISTENER")
    assert topo.curl(free, f"http://[{topo.gateway_addr6(1)}]/")[:2] == (200, "PORTAL LISTENER")
    # upstream HTTP of a free subscriber is not touched
    assert topo.curl(free, "http://198.51.100.10/")[0] == 0, "nothing listens upstream in this test"


def test_portal_connections_carry_the_ct_mark_and_their_callers_are_remembered(gateway) -> None:
    topo, lab = gateway
    free, restricted = topo.subscribers[0], topo.subscribers[1]
    gw = topo.gateway.netns
    assert topo.curl(free.netns, f"http://{topo.gateway_addr4(1)}/")[0] == 200
    assert topo.curl(restricted.netns, f"http://{topo.gateway_addr4(1)}:{PORTAL_PORT}/")[0] == 200
    assert tcp_connect(topo, free.netns, topo.gateway_addr4(1), OTHER_PORT)[0] == "connected"
    mark = f"{PORTAL_CT_MARK:#x}/{PORTAL_CT_MARK:#x}"

    def marked(source: str) -> str:
        return topo.run(gw, "conntrack", "-L", "-p", "tcp", "-s", source, "-m", mark).stdout

    free_entries = marked(free.addr4)
    assert "dport=80 " in free_entries and f"sport={PORTAL_PORT} " in free_entries, free_entries
    assert f"dport={OTHER_PORT} " not in free_entries, "only portal connections are marked"
    assert f"dport={PORTAL_PORT} " in marked(restricted.addr4)
    unmarked = topo.run(gw, "conntrack", "-L", "-p", "tcp", "-s", free.addr4, "--dport", str(OTHER_PORT)).stdout
    assert f"dport={OTHER_PORT} " in unmarked
    for address, expected in ((free.addr4, 0), (restricted.addr4, 0), ("100.64.1.99", 1)):
        found = topo.run(gw, "nft", "get", "element", "inet", lab.table, CALLER_SET[4], "{", address, "}")
        assert found.returncode == expected, (address, found.stderr)


def _link_local(topo: Topology, netns: str, dev: str) -> str:
    out = topo.run(netns, "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link").stdout
    (address,) = [word.split("/")[0] for word in out.split() if word.startswith("fe80:")]
    return address


def test_a_link_local_source_is_confined_like_a_restricted_subscriber(gateway) -> None:
    """Every host on a subscriber link has an IPv6 link-local address that no subscriber set
    holds; from it, a service listening on ``::`` would be open to a restricted subscriber
    (SPEC 8). From a subscriber interface a link-local source meets the ``local`` chain."""
    import subprocess
    import sys
    topo, lab = gateway
    listener = topo.popen(topo.gateway.netns, sys.executable, "-c",
                          "import socket, time\n"
                          "s = socket.socket(socket.AF_INET6); s.bind(('::', 9200)); s.listen(8)\n"
                          "print('up', flush=True); time.sleep(120)",
                          stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "up"
        before = refused_local(topo, lab)
        for i, who in ((1, "restricted"), (0, "free")):
            gateway_ll = _link_local(topo, topo.gateway.netns, topo.subscriber_interfaces[i])
            target = f"{gateway_ll}%{topo._sub_peer[i]}"
            result, seconds = tcp_connect(topo, topo.subscribers[i].netns, target, 9200)
            # refused; the reset to a link-local source does not arrive here (measured: the
            # connect times out), so either answer shows the refusal; "connected" is the hole
            assert result in ("ECONNREFUSED", "timeout"), (who, result, seconds)
        assert refused_local(topo, lab) >= before + 2
        # the listener is really there: from the gateway's own namespace it answers
        assert tcp_connect(topo, topo.gateway.netns, "::1", 9200)[0] == "connected"
    finally:
        listener.kill()
        listener.wait(timeout=10)

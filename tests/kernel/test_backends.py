"""The same traffic checks against both dataplane backends (``gateway.backend``): nftables, and
ipset with our own iptables chains through iptables-nft and through iptables-legacy.

Restricted (walled garden: HTTP to the portal, HTTPS refused with a reset, UDP with ICMP
admin-prohibited, the garden and DNS reachable, IPv6 too), free (untouched), notice (HTTP to the
portal, everything else open), throttle (a download slowed to the configured rate), and a payment
that frees the restricted subscriber. The topology (``Topology``) and gateway (``Lab``) are the
other kernel tests'; only the ``gateway`` section differs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kernel_helpers import SUB1, python_in, tcp_connect
from test_packets import PROBE

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology

UPSTREAM = "http://198.51.100.10/"
UPSTREAM6 = "http://[2001:db8:198::10]/"
BIG = "x" * 120_000             # one argv string of the test server: under 128 KiB
RATE = "80 kbit/s"              # 10 kB/s: past the 64 KiB burst, the 120 kB body takes ~5 s throttled
SUB_NOTICE, SUB_THROTTLE = "C-2003", "C-2004"
BACKENDS = ("nftables", "ipset-nft", "ipset-legacy")


def _tools(backend: str) -> None:
    if backend == "nftables":
        return
    variant = backend.split("-")[1]
    for name in ("ipset", f"iptables-{variant}-restore", f"ip6tables-{variant}-restore"):
        if shutil.which(name) is None:
            message = f"needs {name} (Debian packages ipset, iptables; bash .ci/install installs them)"
            if os.environ.get("CI"):
                pytest.fail(f"{message}: CI refuses to skip")
            pytest.skip(message)


@pytest.fixture(params=BACKENDS)
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Topology, Lab, str]]:
    """Four subscribers: s1 walled garden (IPv4 and its IPv6 /64), s2 free, s3 notice, s4 throttled."""
    backend: str = request.param
    _tools(backend)
    with Topology(subscribers=4) as topo:
        topo.serve_http(topo.upstream, "UPSTREAM OK", ports=(80, 443, 8000))
        topo.serve_http(topo.upstream, BIG, ports=(8001,))
        topo.serve_http(topo.garden, "GARDEN OK", ports=(80, 443))
        s1, _, s3, s4 = topo.subscribers
        entries = [{"id": SUB1, "addresses": [s1.addr4, "2001:db8:100:1::/64"], "reason": "overdue"},
                   {"id": SUB_NOTICE, "addresses": [s3.addr4], "mode": "notice", "reason": "overdue"},
                   {"id": SUB_THROTTLE, "addresses": [s4.addr4], "mode": "throttle", "reason": "fair_use"}]
        lab = Lab(topo, tmp_path, entries)
        lab.config["policy"]["throttle_rate"] = RATE
        if backend != "nftables":
            lab.config["gateway"]["backend"] = "ipset"
            lab.config["gateway"]["ipset"] = {"rules": "own", "iptables": backend.split("-")[1]}
        lab.config_path.write_text(yaml.safe_dump(lab.config, sort_keys=False))
        lab.start_daemon()
        lab.start_portal()
        try:
            yield topo, lab, backend
        finally:
            lab.stop_daemon()
            print(lab.log())


def test_walled_garden_free_notice_and_throttle(gateway: tuple[Topology, Lab, str]) -> None:
    topo, lab, backend = gateway
    restricted, free, notice, throttled = (s.netns for s in topo.subscribers)
    # Walled garden: HTTP to the portal (which answers), HTTPS reset at once, the garden reachable.
    status, body, headers, _ = topo.curl(restricted, UPSTREAM)
    assert status == 302 and headers["location"] == lab.portal_url, (backend, status, body)
    status, body, _, _ = topo.curl(restricted, lab.portal_url)
    assert status == 200 and "restricted" in body.lower(), backend
    result, seconds = tcp_connect(topo, restricted, "198.51.100.10", 443)
    assert result == "ECONNREFUSED" and seconds < 1.0, (backend, result, seconds)
    assert topo.curl(restricted, "http://203.0.113.10/")[:2] == (200, "GARDEN OK"), backend
    assert topo.curl(restricted, UPSTREAM6)[0] == 302, backend
    out = json.loads(python_in(topo, restricted, PROBE, timeout=60).stdout.strip().splitlines()[-1])
    assert out == {"tcp4": "RA", "udp4": [3, 13], "udp6": [1, 1], "garden_tcp4": "SA"}, (backend, out)
    # Free: untouched.
    assert topo.curl(free, UPSTREAM)[:2] == (200, "UPSTREAM OK"), backend
    assert tcp_connect(topo, free, "198.51.100.10", 443)[0] == "connected", backend
    # Notice: HTTP to the portal, the rest open.
    status, _, headers, _ = topo.curl(notice, UPSTREAM)
    assert status == 302 and headers["location"] == lab.portal_url, backend
    assert tcp_connect(topo, notice, "198.51.100.10", 443)[0] == "connected", backend
    assert topo.curl(notice, "http://198.51.100.10:8000/")[:2] == (200, "UPSTREAM OK"), backend
    # Throttle: the 120 kB body at 10 kB/s takes seconds; the free subscriber gets it at once.
    status, body, _, fast = topo.curl(free, "http://198.51.100.10:8001/", timeout=10)
    assert status == 200 and len(body) == len(BIG) and fast < 1.0, (backend, fast)
    status, body, _, slow = topo.curl(throttled, "http://198.51.100.10:8001/", timeout=25)
    assert status == 200 and len(body) == len(BIG), backend
    # ipset: the test server's TSO sends 64 KiB packets through the veths, which hashlimit would
    # charge one second at the rate each without the extra charges (iptables_rules' docstring).
    assert 2.5 < slow < 15, (backend, slow)


def test_payment_frees_and_a_restart_keeps_the_restriction(gateway: tuple[Topology, Lab, str]) -> None:
    topo, lab, backend = gateway
    restricted = topo.subscribers[0].netns
    lab.stop_daemon(kill=True)
    lab.start_daemon()   # reads the kernel back (the ipset backend always does) and reconciles
    assert topo.curl(restricted, UPSTREAM)[0] == 302, backend
    assert "kernel_trusted" not in lab.log() or backend == "nftables", "ipset never trusts a digest mark"
    lab.send_event("payment.received", SUB1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and topo.curl(restricted, UPSTREAM)[0] != 200:
        time.sleep(0.1)
    assert topo.curl(restricted, UPSTREAM)[:2] == (200, "UPSTREAM OK"), backend
    assert tcp_connect(topo, restricted, "198.51.100.10", 443)[0] == "connected", backend

"""Kernel tests for the namespace ISP: real traffic, real cleanup.

Needs root. In CI a missing root must fail loudly instead of silently skipping.
"""

from __future__ import annotations

import os
import subprocess

import pytest

if os.geteuid() != 0:
    if os.environ.get("CI"):
        raise RuntimeError("kernel tests need root (CI is set, refusing to skip)")
    pytest.skip("kernel tests need root", allow_module_level=True)

from enforcer.demo.topology import Host, Topology


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_plain_routing_and_cleanup() -> None:
    topo = Topology(subscribers=2)
    with topo:
        assert set(topo.namespaces) <= _netns_names()
        assert topo.subscribers[0] == Host(f"{topo.tag}-s1", "100.64.1.10", "2001:db8:100:1::10")
        assert topo.gateway_addr4(2) == "100.64.2.1"
        assert topo.gateway_addr6(2) == "2001:db8:100:2::1"
        assert len(topo.subscriber_interfaces) == 2
        assert all(len(name) <= 15 for name in topo.subscriber_interfaces)

        topo.serve_http(topo.upstream, "UPSTREAM OK")
        topo.serve_http(topo.garden, "GARDEN OK", ports=(80, 8080))
        server_pids = [p.pid for p in topo._procs]
        assert server_pids and all(_alive(pid) for pid in server_pids)

        for sub in topo.subscribers:
            for url in ("http://198.51.100.10/", "http://[2001:db8:198::10]/some/path"):
                status, body, headers, elapsed = topo.curl(sub.netns, url)
                assert (status, body) == (200, "UPSTREAM OK"), (sub, url, status, body)
                assert headers["content-type"].startswith("text/plain")
                assert 0 <= elapsed < 5
            for url in ("http://203.0.113.10/", "http://[2001:db8:203::10]:8080/x"):
                status, body, _, _ = topo.curl(sub.netns, url)
                assert (status, body) == (200, "GARDEN OK"), (sub, url, status, body)

        # HEAD works and a closed port reports status 0 with curl's error text.
        status, body, headers, _ = topo.curl(topo.subscribers[0].netns, "http://198.51.100.10/", extra=("-I",))
        assert status == 200 and headers["content-length"] == str(len("UPSTREAM OK"))
        status, body, _, _ = topo.curl(topo.subscribers[0].netns, "http://198.51.100.10:81/", timeout=3)
        assert status == 0 and body

        # Refuses to aim traffic outside the simulated ranges.
        with pytest.raises(ValueError):
            topo.curl(topo.subscribers[0].netns, "http://8.8.8.8/")

    names = _netns_names()
    assert not any(ns in names for ns in topo.namespaces)
    assert not any(n.startswith(topo.tag) for n in names)
    assert not any(_alive(pid) for pid in server_pids)
    topo.close()  # idempotent


def test_gateway_is_isolated() -> None:
    with Topology(subscribers=2) as topo:
        gw = topo.gateway.netns
        for fam in ("-4", "-6"):
            routes = topo.run(gw, "ip", fam, "route", "show", check=True).stdout
            assert "default" not in routes, routes
        for host in (topo.upstream, topo.garden):
            routes = topo.run(host.netns, "ip", "route", "show", check=True).stdout
            assert "default" not in routes, routes

        links = topo.run(gw, "ip", "-o", "link", "show", check=True).stdout.splitlines()
        names = {line.split(":", 2)[1].strip().split("@", 1)[0] for line in links}
        expected = {"lo", *topo.subscriber_interfaces, topo.upstream_interface, topo.garden_interface}
        assert names == expected, names

        # Every non-lo link in the gateway is a veth whose peer lives in one of our namespaces.
        details = topo.run(gw, "ip", "-d", "-o", "link", "show", check=True).stdout.splitlines()
        for line in details:
            if line.split(":", 2)[1].strip() == "lo":
                continue
            assert " veth " in line, line
        # Forwarding on in the gateway.
        assert topo.run(gw, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
        assert topo.run(gw, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"
    assert not any(n.startswith(topo.tag) for n in _netns_names())


def test_failure_during_use_still_cleans_up() -> None:
    topo = Topology(subscribers=1)
    with pytest.raises(RuntimeError, match="boom"), topo:
        proc = topo.popen(topo.upstream.netns, "sleep", "30")
        raise RuntimeError("boom")
    assert proc.poll() is not None
    assert not any(n.startswith(topo.tag) for n in _netns_names())

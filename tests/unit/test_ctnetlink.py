"""The source-address matching of the in-process conntrack flush (the dump itself is
exercised on the real kernel by tests/kernel/test_enforcement.py)."""

from __future__ import annotations

import ipaddress

from enforcer.conntrack import Conntrack
from enforcer.ctnetlink import NetworkIndex

net = ipaddress.ip_network


def test_index_finds_the_longest_matching_network() -> None:
    wide, narrow, host6 = net("100.64.0.0/24"), net("100.64.0.128/25"), net("2001:db8::1/128")
    index = NetworkIndex([wide, narrow, host6, net("2001:db8:1::/56")])
    assert index.find(4, int(ipaddress.ip_address("100.64.0.200"))) == narrow
    assert index.find(4, int(ipaddress.ip_address("100.64.0.5"))) == wide
    assert index.find(4, int(ipaddress.ip_address("100.64.1.5"))) is None
    assert index.find(6, int(ipaddress.ip_address("2001:db8::1"))) == host6
    assert index.find(6, int(ipaddress.ip_address("2001:db8:1:0:ff::9"))) == net("2001:db8:1::/56")
    assert index.find(6, int(ipaddress.ip_address("2001:db8::2"))) is None


def test_the_tool_is_the_fallback_when_netlink_is_off() -> None:
    ct = Conntrack(netlink=False)
    assert ct._open_netlink() is None

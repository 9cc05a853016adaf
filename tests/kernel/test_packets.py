"""Packet-level checks with scapy: exactly which refusal a restricted subscriber receives."""

from __future__ import annotations

import json

from kernel_helpers import python_in

from enforcer.demo.lab import Lab
from enforcer.demo.topology import Topology

PROBE = """
    import json, logging
    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
    from scapy.all import IP, IPv6, TCP, UDP, ICMP, ICMPv6DestUnreach, conf, sr1
    conf.verb = 0
    out = {}
    r = sr1(IP(dst="198.51.100.10")/TCP(sport=40001, dport=443, flags="S"), timeout=2)
    out["tcp4"] = r[TCP].sprintf("%TCP.flags%") if r is not None and r.haslayer(TCP) else None
    r = sr1(IP(dst="198.51.100.10")/UDP(sport=40002, dport=443)/b"quic", timeout=2)
    out["udp4"] = [r[ICMP].type, r[ICMP].code] if r is not None and r.haslayer(ICMP) else None
    r = sr1(IPv6(dst="2001:db8:198::10")/UDP(sport=40003, dport=443)/b"quic", timeout=2)
    out["udp6"] = [r[ICMPv6DestUnreach].type, r[ICMPv6DestUnreach].code] \\
        if r is not None and r.haslayer(ICMPv6DestUnreach) else None
    r = sr1(IP(dst="203.0.113.10")/TCP(sport=40004, dport=443, flags="S"), timeout=2)
    out["garden_tcp4"] = r[TCP].sprintf("%TCP.flags%") if r is not None and r.haslayer(TCP) else None
    print(json.dumps(out))
"""


def test_restricted_refusals_are_rst_and_icmp_admin_prohibited(topo: Topology, lab: Lab) -> None:
    result = python_in(topo, topo.subscribers[0].netns, PROBE, timeout=60)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tcp4"] == "RA", out                 # TCP reset from the gateway, at once
    assert out["udp4"] == [3, 13], out              # ICMP destination unreachable, communication prohibited
    assert out["udp6"] == [1, 1], out               # ICMPv6 destination unreachable, administratively prohibited
    assert out["garden_tcp4"] == "SA", out          # the walled garden answers the handshake itself


def test_free_subscriber_udp_is_not_refused(topo: Topology, lab: Lab) -> None:
    result = python_in(topo, topo.subscribers[1].netns, PROBE, timeout=60)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tcp4"] == "SA", out                 # upstream's TLS port answers (our plain server on 443)
    assert out["udp4"] == [3, 3], out               # the host's own port-unreachable, not our prohibition

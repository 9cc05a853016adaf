"""The ipset backend's iptables rules as text: the longest entry decides, and the lines an
operator with ``rules: external`` adds (their traffic is checked in tests/kernel/test_ipset_backend.py)."""

from __future__ import annotations

import ipaddress
import shlex

from enforcer.dataplane.iptables_rules import EXTERNAL_CHAIN, chains, external_lines
from enforcer.dataplane.layout import Layout


def layout(*prefixes: tuple[int, int]) -> Layout:
    base = Layout("wg", ("eth1",), (ipaddress.ip_network("203.0.113.0/24"),), None, 8080)
    return base.with_prefixes(set(prefixes))


def test_a_longer_entry_inside_a_shorter_one_is_decided_by_its_own_rules_first() -> None:
    up = [line for line in chains(layout((4, 24)), 4)["filter"] if line.startswith("-A WALLED-GARDEN-UP ")]
    assert up == [
        "-A WALLED-GARDEN-UP -m set --match-set walled-portal4-32 src -g WALLED-GARDEN-GARDEN",
        "-A WALLED-GARDEN-UP -m set --match-set walled-throttle4-32 src -g WALLED-GARDEN-THROTTLE",
        "-A WALLED-GARDEN-UP -m set --match-set walled-notice4-32 src -j RETURN",   # a notice /32 in a walled /24
        "-A WALLED-GARDEN-UP -m set --match-set walled-portal4 src -g WALLED-GARDEN-GARDEN",
        "-A WALLED-GARDEN-UP -m set --match-set walled-throttle4 src -g WALLED-GARDEN-THROTTLE"]
    nat = chains(layout((4, 24)), 4)["nat"]
    own = [i for i, line in enumerate(nat) if "walled-notice4-32 src -m set ! --match-set walled-noticeack4-32" in line]
    umbrella = [i for i, line in enumerate(nat) if "walled-portal4 src" in line]
    assert own and umbrella and own[0] < umbrella[0], "an acknowledged /32 is not redirected for its /24"


def test_one_length_per_family_needs_no_rules_of_its_own() -> None:
    up = [line for line in chains(layout(), 4)["filter"] if line.startswith("-A WALLED-GARDEN-UP ")]
    assert len(up) == 2


def test_external_lines_refuse_every_protocol_but_the_allowed_few_and_keep_the_portal_working() -> None:
    lines = external_lines(4, 8080, ("eth1", "ppp*"))
    assert lines[0] == f"iptables -N {EXTERNAL_CHAIN}"
    chain = [line for line in lines if f"-A {EXTERNAL_CHAIN} " in line]
    assert chain[-1] == f"iptables -A {EXTERNAL_CHAIN} -j REJECT --reject-with icmp-admin-prohibited"
    assert not any("ACCEPT" in line for line in lines)
    jumps = [line for line in lines if "-I FORWARD" in line]
    assert jumps == [f"iptables -I FORWARD 1 -i eth1 -m set --match-set walled-portal4 src -j {EXTERNAL_CHAIN}",
                     f"iptables -I FORWARD 1 -i ppp+ -m set --match-set walled-portal4 src -j {EXTERNAL_CHAIN}"]
    assert sum("CONNMARK --or-mark 0x400000" in line for line in lines) == 2
    assert sum("--add-set walled-portalcaller4 src" in line for line in lines) == 2
    positions = [int(shlex.split(line)[5]) for line in lines if "-t nat -I PREROUTING" in line]
    assert positions == list(range(1, len(positions) + 1))


def test_listed_resolvers_and_ntp_servers_are_the_only_ones_let_through() -> None:
    lines = external_lines(6, 80, ("eth1",), dns=("2001:db8::53",), ntp=())
    assert "ip6tables -A WG-RESTRICTED -m set --match-set walled-dns6 dst -p udp --dport 53 -j RETURN" in lines
    assert "ip6tables -A WG-RESTRICTED -m set --match-set walled-ntp6 dst -p udp --dport 123 -j RETURN" in lines
    assert not any("REDIRECT --to-ports 80" in line and "--dst-type LOCAL" in line for line in lines), \
        "the portal listens on 80 itself: no redirect to it"

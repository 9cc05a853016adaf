"""The table with ``dns: gateway`` (docs/reference.md, "DNS-driven walled garden"): restricted and
notice subscribers' DNS to any address is redirected to the forwarder, nothing else reaches its
port, DNS-learnt addresses are part of the garden everywhere the fixed ones are, and NTP goes only
to the listed servers."""

from __future__ import annotations

import ipaddress

from test_layout import block, chain

from enforcer.dataplane.layout import DNS_GARDEN_SETS, GARDEN_CT_MARK, PORTAL_CT_MARK, Layout

ip = ipaddress.ip_address
net = ipaddress.ip_network


def layout(**kw: object) -> Layout:
    args: dict[str, object] = dict(table="walled_garden", interfaces=("eth1",), allow=(net("192.0.2.0/24"),),
                                   dns=(), portal_port=8080, dns_port=5300, ntp=(ip("198.51.100.123"),),
                                   dns_garden_size=1000)
    args.update(kw)
    return Layout(**args)   # type: ignore[arg-type]


def test_dns_of_restricted_and_notice_subscribers_to_any_address_goes_to_the_forwarder() -> None:
    nat = chain(layout().render(), "prerouting")
    for version, plen, match in ((4, 32, "ip saddr"), (6, 64, "ip6 saddr & ffff:ffff:ffff:ffff::")):
        for kind in ("portal", "notice"):
            assert (f'iifname {{ "eth1" }} {match} @{kind}{version}_{plen} meta l4proto {{ tcp, udp }} '
                    "th dport 53 redirect to :5300") in nat
    assert not any("dport 53" in rule and "daddr" in rule for rule in nat), "to any address, not some"


def test_nothing_but_redirected_dns_reaches_the_forwarder_port() -> None:
    text = layout().render()
    assert chain(text, "input")[1] == "meta l4proto { tcp, udp } th dport 5300 ct status & dnat == 0 drop"
    assert "iifname" not in chain(text, "input")[1], "from every interface, loopback and WAN too"
    assert "meta l4proto { tcp, udp } th dport 5300 accept" in chain(text, "local")


def test_learnt_addresses_are_garden_everywhere_and_their_connections_outlive_the_ttl() -> None:
    text = layout().render()
    for version in (4, 6):
        addr = "ipv4_addr" if version == 4 else "ipv6_addr"
        name = DNS_GARDEN_SETS[version]
        assert block(text, "set", name) == f"set {name} {{ type {addr}; size 1000; flags timeout; }}"
        assert f"add element inet walled_garden {name} " not in text, "created empty: the forwarder fills it"
    garden = chain(text, "garden")
    mark = f"{GARDEN_CT_MARK:#010x}"
    assert garden[0] == f"ct mark & {mark} == {mark} accept"
    assert f"ip daddr @dnsgarden4 ct mark set ct mark | {mark} accept" in garden
    assert f"ip6 daddr @dnsgarden6 ct mark set ct mark | {mark} accept" in garden
    assert GARDEN_CT_MARK & PORTAL_CT_MARK == 0 and bin(GARDEN_CT_MARK).count("1") == 1
    assert not any("dport 53" in rule for rule in garden), "no DNS leaves the garden but through the forwarder"
    assert all("ip daddr != @dnsgarden4" in rule for rule in chain(text, "prerouting") if "dport 80" in rule
               and "ip saddr" in rule)
    assert "ip daddr @dnsgarden4 accept" in chain(text, "throttle")
    assert all("!= @dnsgarden" in rule for rule in chain(text, "to_subscriber") if "update" in rule)


def test_ntp_only_to_listed_servers_or_anywhere() -> None:
    garden = chain(layout().render(), "garden")
    assert "ip daddr @ntp4 udp dport 123 accept" in garden and "udp dport 123 accept" not in garden
    assert block(layout().render(), "set", "ntp4") == "set ntp4 { type ipv4_addr; elements = { 198.51.100.123 }; }"
    assert "udp dport 123 accept" in chain(layout(ntp=None).render(), "garden")
    assert "udp dport 123 accept" in chain(layout().render(), "local"), "the gateway's own NTP stays reachable"


def test_without_gateway_mode_nothing_changes_for_dns() -> None:
    text = layout(dns=None, dns_port=None, ntp=None).render()
    assert "dnsgarden" not in text and "redirect to :5300" not in text and "ct status" not in text
    assert "meta l4proto { tcp, udp } th dport 53 accept" in chain(text, "garden")
    listed = layout(dns=(ip("192.0.2.53"),), dns_port=None, ntp=None).render()
    assert "ip daddr @dns4 meta l4proto { tcp, udp } th dport 53 accept" in chain(listed, "garden")
    assert layout().tag != layout(dns_port=5301).tag != layout(dns_port=None, dns=None).tag

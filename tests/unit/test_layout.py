"""The table layout (docs/reference.md, Dataplane): hash sets per mode and prefix length (no verdict maps), masked
lookups, a tag of the layout; and reading a ``nft -j list table`` listing back."""

from __future__ import annotations

import ipaddress
import re

import pytest

from enforcer.dataplane.kernel import parse_listing
from enforcer.dataplane.layout import (
    HOST_ALLOW,
    PORTAL_CT_MARK,
    SENTINELS,
    STANDARD_PREFIXES,
    Layout,
    elements_for,
    mode_map,
    redirect_set,
    tag_address,
)
from enforcer.model import Mode

net = ipaddress.ip_network
ip = ipaddress.ip_address


def layout(**kw) -> Layout:
    args = dict(table="walled_garden", interfaces=("eth1",),
                allow=(net("192.0.2.0/24"), net("2001:db8:ffff::/48")), dns=None, portal_port=8080)
    args.update(kw)
    return Layout(**args)


def block(text: str, kind: str, name: str) -> str:
    """The one-line declaration of a set or map."""
    (line,) = [line.strip() for line in text.splitlines() if line.strip().startswith(f"{kind} {name} ")]
    return line


def chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"\tchain {name} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 1:end]]


# -- render ---------------------------------------------------------------------------------

def test_one_portal_notice_and_throttle_set_per_prefix_length_and_no_verdict_maps():
    text = layout().with_prefixes({(4, 24)}).render()
    for version, plen in STANDARD_PREFIXES | {(4, 24)}:
        addr = "ipv4_addr" if version == 4 else "ipv6_addr"
        for kind in ("portal", "notice", "throttle"):
            name = f"{kind}{version}_{plen}"
            assert text.count(f"set {name} ") == 1
            assert block(text, "set", name) == f"set {name} {{ type {addr}; }}"
    # a verdict map is re-validated whole by the kernel on every transaction that adds a goto
    assert re.findall(r"^\s*map ", text, re.M) == []
    assert "vmap" not in text and "mode4_32" not in text


def test_standard_prefixes():
    assert {(4, 32), (6, 128), (6, 64), (6, 56)} == STANDARD_PREFIXES
    assert layout().prefixes == STANDARD_PREFIXES


def test_subscriber_containers_are_hash_not_interval():
    text = layout().with_prefixes({(4, 24), (6, 48)}).render()
    for line in text.splitlines():
        if re.match(r"\s*(map |set (portal|notice|throttle)[46]_|set allowhost)", line):
            assert "interval" not in line, line
    # the static allow sets are the only interval sets
    assert [line.split()[1] for line in text.splitlines() if "flags interval" in line] == ["allow4", "allow6"]


def test_masked_lookups_for_non_host_prefixes():
    text = layout().with_prefixes({(4, 24)}).render()
    forward = chain(text, "from_subscriber")
    for match, suffix in (("ip6 saddr & ffff:ffff:ffff:ff00::", "6_56"), ("ip6 saddr & ffff:ffff:ffff:ffff::", "6_64"),
                          ("ip saddr & 255.255.255.0", "4_24"),
                          ("ip saddr", "4_32"), ("ip6 saddr", "6_128")):  # host prefixes: no mask
        assert f"{match} @portal{suffix} goto garden" in forward
        assert f"{match} @throttle{suffix} goto throttle" in forward
        # notice leaves forwarding open: looked up only to stop the walk before a shorter prefix
        assert (f"{match} @notice{suffix} goto notice" in forward) == (suffix not in ("4_24", "6_56"))
    nat = chain(text, "prerouting")
    assert any(r.startswith('iifname { "eth1" } ip6 saddr & ffff:ffff:ffff:ff00:: @portal6_56 tcp dport 80 ')
               for r in nat)
    assert any(r.startswith('iifname { "eth1" } ip saddr @portal4_32 tcp dport 80 ') for r in nat)


def test_longest_prefix_is_looked_up_first():
    text = layout().with_prefixes({(4, 24), (4, 16)}).render()
    # one forward hook: each direction's interface tested once; downloads first (that chain
    # only drops or returns), then the subscriber's own packets
    assert chain(text, "forward")[1:] == ['oifname { "eth1" } jump to_subscriber',
                                          'iifname { "eth1" } jump from_subscriber']
    forward = chain(text, "from_subscriber")
    assert forward[8] == "meta nfproto ipv4 return", "an IPv4 packet returns before the IPv6 sets"
    order = [re.fullmatch(r".*@(\w+?)(\d)_(\d+) goto (\w+)", r).groups() for r in forward if "goto" in r]
    # per prefix length, longest first: walled garden, then throttle before notice (a throttled
    # key is in the notice set too, so the throttle lookup must come first); the shortest prefix
    # of a family needs no notice lookup (notice leaves forwarding open, and nothing follows)
    expected = []
    for v, plen, shortest in (("4", "32", False), ("4", "24", False), ("4", "16", True),
                              ("6", "128", False), ("6", "64", False), ("6", "56", True)):
        kinds = (("portal", "garden"), ("throttle", "throttle")) + (() if shortest else (("notice", "notice"),))
        expected += [(kind, v, plen, chain_) for kind, chain_ in kinds]
    assert order == expected


def test_forward_and_nat_hooks():
    text = layout().render()
    forward = chain(text, "forward")
    assert forward[0] == "type filter hook forward priority filter - 10; policy accept;"
    nat = chain(text, "prerouting")
    assert nat[0] == "type nat hook prerouting priority dstnat - 10; policy accept;"
    assert nat[1].endswith("fib daddr type local jump portal_call"), "the portal's own connections, marked first"
    assert all(r.endswith("redirect to :8080") for r in nat[2:])
    assert all("ip daddr != @allow4 ip daddr != @allowhost4" in r for r in nat[1:] if "ip saddr" in r)
    assert all("ip6 daddr != @allow6 ip6 daddr != @allowhost6" in r for r in nat[1:] if "ip6 saddr" in r)
    assert "redirect to :9999" in layout(portal_port=9999).render()


def test_iifname_only_when_interfaces_given():
    text = layout(interfaces=()).render()
    assert "iifname" not in text
    assert "\t\tip saddr @portal4_32 goto garden\n\t\tip saddr @throttle4_32 goto throttle\n" \
           "\t\tmeta nfproto ipv4 return\n" in text
    assert chain(text, "forward")[1:] == ["jump to_subscriber", "jump from_subscriber"]
    two = layout(interfaces=("eth1", "eth2.100")).render()
    forward = chain(two, "forward")
    assert forward[1:] == ['oifname { "eth1", "eth2.100" } jump to_subscriber',
                           'iifname { "eth1", "eth2.100" } jump from_subscriber']
    assert all(r.startswith('iifname { "eth1", "eth2.100" } ') for r in chain(two, "prerouting")[1:])


def test_garden_chain():
    rules = chain(layout().render(), "garden")
    assert rules[:4] == ["ip daddr @allow4 accept", "ip6 daddr @allow6 accept",
                         "ip daddr @allowhost4 accept", "ip6 daddr @allowhost6 accept"]
    assert "meta l4proto { tcp, udp } th dport 53 accept" in rules  # dns: any
    assert "udp dport 123 accept" in rules
    assert rules[-2] == 'meta l4proto tcp counter name "refused_tcp" reject with tcp reset'
    assert rules[-1] == 'counter name "refused_other" reject with icmpx admin-prohibited'
    assert any(r.startswith("icmp type {") for r in rules)
    assert any(r.startswith("icmpv6 type {") and "packet-too-big" in r for r in rules)
    assert chain(layout().render(), "notice") == []


def test_dns_list_restricts_resolvers():
    text = layout(dns=(ip("192.0.2.53"), ip("2001:db8::53"))).render()
    assert block(text, "set", "dns4") == "set dns4 { type ipv4_addr; elements = { 192.0.2.53 }; }"
    assert block(text, "set", "dns6") == "set dns6 { type ipv6_addr; elements = { 2001:db8::53 }; }"
    rules = chain(text, "garden")
    assert "ip daddr @dns4 meta l4proto { tcp, udp } th dport 53 accept" in rules
    assert "ip6 daddr @dns6 meta l4proto { tcp, udp } th dport 53 accept" in rules
    assert "meta l4proto { tcp, udp } th dport 53 accept" not in rules
    assert "set dns4" not in layout(dns=None).render()


def test_allow_sets_hold_the_configured_networks():
    text = layout().render()
    assert block(text, "set", "allow4") == "set allow4 { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 }; }"
    assert block(text, "set", "allow6") == ("set allow6 { type ipv6_addr; flags interval; "
                                           "elements = { 2001:db8:ffff::/48 }; }")
    empty = layout(allow=()).render()
    assert block(empty, "set", "allow4") == "set allow4 { type ipv4_addr; flags interval; }"
    assert block(empty, "set", HOST_ALLOW[4]) == "set allowhost4 { type ipv4_addr; }"


@pytest.mark.parametrize("allow", [
    (net("192.0.2.0/24"), net("192.0.2.128/25")),
    (net("192.0.2.0/24"), net("192.0.2.0/24")),
])
def test_allow_set_elements_do_not_overlap(allow):
    text = layout(allow=allow).render()
    elements = re.search(r"set allow4 \{[^}]*elements = \{ ([^}]*) \}", text).group(1).split(", ")
    nets = [net(e) for e in elements]
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            assert not a.overlaps(b), f"{a} overlaps {b}"


def test_table_header_and_layout_tag_rule():
    lay = layout(table="wg_test")
    text = lay.render()
    assert text.startswith("table inet wg_test {\n")
    assert text.endswith("}\n")
    assert chain(text, "layout") == [f'counter comment "walled-garden layout {lay.tag}"']
    assert "@@TAG@@" not in text
    assert text.count("{") == text.count("}")


def test_tag_is_stable():
    assert layout().tag == layout().tag
    assert re.fullmatch(r"[0-9a-f]{16}", layout().tag)
    assert layout().with_prefixes(set()).tag == layout().tag
    assert layout().render() == layout().render()
    base = layout()
    assert base.with_prefixes({(4, 32)}) is base  # nothing new: the same layout


@pytest.mark.parametrize("change", [
    dict(table="other"),
    dict(interfaces=()),
    dict(interfaces=("eth2",)),
    dict(allow=(net("198.51.100.0/24"),)),
    dict(dns=(ip("192.0.2.53"),)),
    dict(portal_port=8081),
])
def test_tag_changes_when_config_changes(change):
    assert layout(**change).tag != layout().tag


def test_tag_changes_with_a_new_prefix_length():
    base = layout()
    wider = base.with_prefixes({(4, 24)})
    assert wider.prefixes == STANDARD_PREFIXES | {(4, 24)}
    assert wider.tag != base.tag
    assert wider.with_prefixes({(4, 24)}) == wider
    assert wider.with_prefixes({(4, 24)}).tag == wider.tag
    assert wider.with_prefixes(set()).tag == base.tag  # back to the standard shape


def test_containers():
    c = layout().with_prefixes({(4, 24)}).containers()
    expected = {"allowhost4": "set", "allowhost6": "set"}
    for v, plen in ((4, 24), (4, 32), (6, 56), (6, 64), (6, 128)):
        expected.update({f"portal{v}_{plen}": "set", f"notice{v}_{plen}": "set", f"throttle{v}_{plen}": "set"})
    assert c == expected
    assert not any(name.startswith("mode") for name in c), "the mode view is the reconciler's, not the kernel's"
    assert not any(name.startswith("noticeack") for name in c), "acknowledgements are not reconciled"
    assert not any(name.startswith("thr") and not name.startswith("throttle") for name in c), \
        "throttle meters are filled by the kernel, not reconciled"


# -- elements_for ---------------------------------------------------------------------------

@pytest.mark.parametrize("network, mode, expected", [
    ("100.64.0.10/32", Mode.WALLED_GARDEN, [("portal4_32", "100.64.0.10", None)]),
    ("100.64.1.0/24", Mode.NOTICE, [("notice4_24", "100.64.1.0", None)]),
    ("2001:db8:10:100::/56", Mode.THROTTLE,
     [("notice6_56", "2001:db8:10:100::", None), ("throttle6_56", "2001:db8:10:100::", None)]),
    ("2001:db8::1/128", Mode.WALLED_GARDEN, [("portal6_128", "2001:db8::1", None)]),
])
def test_elements_for(network, mode, expected):
    assert elements_for(net(network), mode) == expected


def test_container_names():
    assert mode_map(6, 56) == "mode6_56"
    assert redirect_set(4, 32) == "portal4_32"
    assert redirect_set(4, 32, Mode.NOTICE) == redirect_set(4, 32, Mode.THROTTLE) == "notice4_32"


# -- reading the kernel back ----------------------------------------------------------------

LISTING = {"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "walled_garden", "handle": 7}},
    {"map": {"family": "inet", "name": "mode4_32", "table": "walled_garden", "type": "ipv4_addr",
             "handle": 12, "map": "verdict",
             "elem": [["100.64.0.10", {"goto": {"target": "garden"}}],
                      [{"elem": {"val": "100.64.0.11", "counter": {"packets": 3, "bytes": 180}}},
                       {"goto": {"target": "notice"}}],
                      ["100.64.0.12", {"accept": None}]]}},
    {"set": {"family": "inet", "name": "portal4_32", "table": "walled_garden", "type": "ipv4_addr",
             "handle": 13, "elem": ["100.64.0.10", "100.64.0.11"]}},
    {"map": {"family": "inet", "name": "mode6_56", "table": "walled_garden", "type": "ipv6_addr",
             "handle": 14, "map": "verdict",
             "elem": [["2001:db8:10:100::", {"goto": {"target": "throttle"}}]]}},
    {"set": {"family": "inet", "name": "portal6_56", "table": "walled_garden", "type": "ipv6_addr",
             "handle": 15}},
    {"set": {"family": "inet", "name": "allow4", "table": "walled_garden", "type": "ipv4_addr",
             "handle": 20, "flags": ["interval"],
             "elem": [{"prefix": {"addr": "192.0.2.0", "len": 24}}, "198.51.100.7"]}},
    {"set": {"family": "inet", "name": "intruder", "table": "someone_else", "type": "ipv4_addr",
             "elem": ["10.0.0.1"]}},
    {"chain": {"family": "inet", "table": "walled_garden", "name": "layout", "handle": 30}},
    {"rule": {"family": "inet", "table": "walled_garden", "chain": "forward", "handle": 40,
              "comment": "walled-garden layout 0000000000000000", "expr": []}},
    {"rule": {"family": "inet", "table": "walled_garden", "chain": "layout", "handle": 61,
              "comment": "walled-garden layout e11a588d2d6056ef",
              "expr": [{"counter": {"packets": 0, "bytes": 0}}]}},
]}


def test_parse_listing():
    state = parse_listing(LISTING, "walled_garden")
    assert state.layout_tag == "e11a588d2d6056ef"  # only from the layout chain
    assert state.elements == {
        "mode4_32": {"100.64.0.10": "goto garden", "100.64.0.11": "goto notice", "100.64.0.12": "accept"},
        "portal4_32": {"100.64.0.10": None, "100.64.0.11": None},
        "mode6_56": {"2001:db8:10:100::": "goto throttle"},
        "portal6_56": {},
        "allow4": {"192.0.2.0/24": None, "198.51.100.7": None},
    }


def test_parse_listing_without_layout_rule_or_table():
    assert parse_listing({"nftables": []}, "walled_garden").layout_tag is None
    assert parse_listing({}, "walled_garden").elements == {}
    no_tag = {"nftables": [r for r in LISTING["nftables"] if "rule" not in r]}
    assert parse_listing(no_tag, "walled_garden").layout_tag is None


def test_parse_listing_round_trips_what_the_layout_renders():
    lay = layout()
    rule = {"rule": {"family": "inet", "table": "walled_garden", "chain": "layout", "handle": 1,
                     "comment": f"walled-garden layout {lay.tag}", "expr": []}}
    elements = [("portal4_32", "100.64.0.10", None),
                ("notice6_56", "2001:db8:10:100::", None), ("throttle6_56", "2001:db8:10:100::", None)]
    listing = {"nftables": [rule,
                            {"set": {"table": "walled_garden", "name": "portal4_32", "elem": ["100.64.0.10"]}},
                            {"set": {"table": "walled_garden", "name": "notice6_56", "elem": ["2001:db8:10:100::"]}},
                            {"set": {"table": "walled_garden", "name": "throttle6_56",
                                     "elem": ["2001:db8:10:100::"]}}]}
    state = parse_listing(listing, "walled_garden")
    assert state.layout_tag == lay.tag
    assert {(c, k, v) for c, items in state.elements.items() for k, v in items.items()} == set(elements)
    assert (elements_for(net("100.64.0.10/32"), Mode.WALLED_GARDEN)
            + elements_for(net("2001:db8:10:100::/56"), Mode.THROTTLE)) == elements


# -- the gateway itself: the portal for everyone, the restricted confined ---------------------

def test_every_subscriber_reaching_the_gateway_on_80_and_443_lands_on_the_portal():
    nat = chain(layout(portal_tls_port=8443).render(), "prerouting")
    # first (after the portal's mark), before the restricted-only rules, and without any
    # subscriber set: free ones too
    assert nat[2:4] == ['iifname { "eth1" } tcp dport 80 fib daddr type local redirect to :8080',
                        'iifname { "eth1" } tcp dport 443 fib daddr type local redirect to :8443']
    # the restricted subscribers' HTTP to other hosts is still redirected
    assert any("@portal4_32 tcp dport 80 ip daddr != @allow4" in r and r.endswith("redirect to :8080")
               for r in nat[4:])
    # no TLS listener: 443 on the gateway is not redirected
    assert not any("dport 443" in r and "redirect" in r for r in chain(layout().render(), "prerouting"))


def test_a_portal_already_on_80_or_443_is_not_redirected():
    nat = chain(layout(portal_port=80, portal_tls_port=443).render(), "prerouting")
    assert not any("fib daddr" in r and "redirect" in r for r in nat)
    nat = chain(layout(portal_port=80, portal_tls_port=8443).render(), "prerouting")
    assert [r for r in nat if "fib daddr" in r and "redirect" in r] == [
        'iifname { "eth1" } tcp dport 443 fib daddr type local redirect to :8443']


def test_portal_hook_marks_and_remembers_callers_of_the_gateways_own_addresses_only():
    """In the nat hook (a connection's first packet only), before any redirect, while the
    destination is the one the subscriber chose: the page's own connections to the gateway are
    marked (they survive the lift), redirected HTTP to other sites is not (a browser's spare
    connection to that site must be flushed at the lift)."""
    text = layout(portal_tls_port=8443).render()
    rules = chain(text, "prerouting")
    assert rules[0] == "type nat hook prerouting priority dstnat - 10; policy accept;"
    assert rules[1] == 'iifname { "eth1" } tcp dport { 80, 443, 8080, 8443 } fib daddr type local jump portal_call'
    assert all("portal_call" not in r for r in rules[2:])
    assert "chain portal {" not in text, "no prerouting filter hook: forwarded packets never meet these rules"
    assert chain(text, "portal_call") == [f"ct mark set ct mark or {PORTAL_CT_MARK:#010x}",
                                          "update @portalcaller4 { ip saddr }", "update @portalcaller6 { ip6 saddr }"]
    assert bin(PORTAL_CT_MARK).count("1") == 1, "one bit of ct mark, so the operators' other bits survive"
    for version in (4, 6):
        addr = "ipv4_addr" if version == 4 else "ipv6_addr"
        assert block(text, "set", f"portalcaller{version}") == (
            f"set portalcaller{version} {{ type {addr}; size 1048576; flags dynamic,timeout; timeout 15m; }}")
    assert "ct mark" not in " ".join(chain(text, "input")), "not after nat: redirected HTTP would be marked too"
    assert "tcp dport { 80, 8080 } fib daddr type local jump portal_call" in layout().render()


def test_restricted_subscribers_reach_only_portal_dns_ntp_dhcp_and_icmp_on_the_gateway():
    text = layout(portal_tls_port=8443).with_prefixes({(4, 24)}).render()
    jumps = chain(text, "input")[1:]
    # every portal and notice set (throttle keys are in notice too), longest prefix first, masked
    expected = []
    for version, plen in ((4, 32), (4, 24), (6, 128), (6, 64), (6, 56)):
        match = {(4, 32): "ip saddr", (4, 24): "ip saddr & 255.255.255.0", (6, 128): "ip6 saddr",
                 (6, 64): "ip6 saddr & ffff:ffff:ffff:ffff::", (6, 56): "ip6 saddr & ffff:ffff:ffff:ff00::"}
        for kind in ("portal", "notice"):
            expected.append(f'iifname {{ "eth1" }} {match[(version, plen)]} @{kind}{version}_{plen} goto local')
    # a link-local source is in no set: from a subscriber interface, it is confined too
    expected.append('iifname { "eth1" } ip6 saddr fe80::/10 meta l4proto { tcp, udp } goto local')
    assert jumps == expected
    anywhere = chain(layout(interfaces=()).render(), "input")
    assert not any("fe80::/10" in r for r in anywhere), "no interfaces named: the operator's own link-local too"
    assert chain(text, "local") == [
        "ct state established,related accept",
        "tcp dport { 8080, 8443 } accept",
        "meta l4proto { tcp, udp } th dport 53 accept",
        "udp dport 123 accept",
        "udp dport { 67, 68, 546, 547 } accept",
        "meta l4proto { icmp, ipv6-icmp } accept",
        'meta l4proto tcp counter name "refused_local" reject with tcp reset',
        'counter name "refused_local" reject with icmpx admin-prohibited']
    assert "\tcounter refused_local { }" in text.splitlines()


def test_every_reconciled_set_is_created_with_its_sentinel_and_no_other():
    lay = layout(table="wg_s").with_prefixes({(4, 24), (4, 16)})
    text = lay.render()
    added = [line for line in text.splitlines() if line.startswith("add element")]
    family = {name: int(re.search(r"([46])(?:_\d+)?$", name).group(1)) for name in lay.containers()}
    assert added == [f"add element inet wg_s {name} {{ {SENTINELS[family[name]]} }}" for name in lay.containers()] + [
        f"add element inet wg_s layouttag {{ {tag_address(lay.tag)} }}"]
    assert "\tset layouttag { type ipv6_addr; }" in text.splitlines()
    assert int(ipaddress.IPv6Address(tag_address(lay.tag))) == int(lay.tag, 16), "the tag, readable back"
    assert "add element inet wg_s portal4_16 { 255.255.255.255 }" in added    # not mistaken for v6
    assert "add element inet wg_s allowhost6 { ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff }" in added
    assert not any(name in line for line in added for name in lay.ack_sets() + ["portalcaller"])
    # never a subscriber: limited broadcast and reserved-scope multicast
    assert ip(SENTINELS[4]) == ip("255.255.255.255") and ip(SENTINELS[6]).is_multicast


def test_parse_listing_takes_the_sentinel_out_and_says_which_sets_hold_it():
    listing = {"nftables": [
        {"set": {"table": "walled_garden", "name": "portal4_32", "elem": ["100.64.0.10", "255.255.255.255"]}},
        {"set": {"table": "walled_garden", "name": "notice4_32", "elem": ["100.64.0.11"]}},
        {"set": {"table": "walled_garden", "name": "portal6_64", "elem": [SENTINELS[6]]}},
    ]}
    state = parse_listing(listing, "walled_garden")
    assert state.elements == {"portal4_32": {"100.64.0.10": None}, "notice4_32": {"100.64.0.11": None},
                              "portal6_64": {}}
    assert state.sealed == {"portal4_32", "portal6_64"}


@pytest.mark.parametrize("change", [dict(portal_tls_port=8443)])
def test_tag_changes_with_the_tls_port(change):
    assert layout(**change).tag != layout().tag

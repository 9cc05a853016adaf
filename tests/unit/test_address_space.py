"""``AddressSpace`` (gateway.subscriber_prefixes, special-use ranges) and ``find_overlaps``."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.address_space import AddressSpace, find_overlaps, span, special_use_problem
from enforcer.config import parse_config

net = ipaddress.ip_network
SPACE = AddressSpace((net("100.64.0.0/10"), net("2001:db8::/32")))


@pytest.mark.parametrize("network", ["100.64.0.0/11", "100.64.0.5/32", "100.127.255.0/24", "2001:db8::/33",
                                     "2001:db8:ffff:ff00::/56"])
def test_inside_the_prefixes_is_fine(network: str) -> None:
    assert SPACE.problem(net(network)) is None


@pytest.mark.parametrize("network", ["100.63.255.255/32", "100.128.0.0/16", "100.0.0.0/8", "198.51.100.7/32",
                                     "2001:db9::/48", "2001:db8::/31"])
def test_outside_or_over_the_prefixes_is_named(network: str) -> None:
    problem = SPACE.problem(net(network)) or ""
    assert "outside gateway.subscriber_prefixes (100.64.0.0/10, 2001:db8::/32)" in problem


@pytest.mark.parametrize("network, words", [("127.0.0.1/32", "loopback"), ("::1/128", "loopback"),
                                            ("224.0.0.0/16", "multicast"), ("::ffff:0:0/96", "IPv4-mapped"),
                                            ("255.255.255.255/32", "broadcast"), ("0.0.0.0/16", "unspecified")])
def test_special_use_is_refused_with_or_without_prefixes(network: str, words: str) -> None:
    assert words in (AddressSpace().problem(net(network)) or "")
    assert words in (SPACE.problem(net(network)) or "")
    assert words in (special_use_problem(net(network)) or "")


def test_without_prefixes_any_unicast_address_is_fine() -> None:
    space = AddressSpace()
    assert not space.restricted and SPACE.restricted
    assert space.problem(net("198.51.100.7/32")) is None and space.problem(net("2a00::/32")) is None


def test_from_config() -> None:
    config = parse_config("subscribers: {source: /tmp/l.yaml}\n"
                          "gateway: {subscriber_prefixes: ['100.64.0.0/10', '2001:db8::/32']}\n", "c.yaml")
    assert AddressSpace.from_config(config) == SPACE
    assert AddressSpace.from_config(parse_config("subscribers: {source: /tmp/l.yaml}\n")) == AddressSpace()


# -- a whole subscriber prefix is no one subscriber's -----------------------------------------

NESTED = AddressSpace((net("100.64.0.0/10"), net("100.64.8.0/22"), net("2001:db8::/32"), net("2001:db8:5::/48")))


@pytest.mark.parametrize("network, entry", [
    ("100.64.8.0/22", "100.64.8.0/22"), ("100.64.8.0/21", "100.64.8.0/22"), ("100.64.0.0/16", "100.64.8.0/22"),
    ("100.64.0.0/10", "100.64.0.0/10"), ("2001:db8::/32", "2001:db8::/32"),
])
def test_covering_a_whole_entry_is_refused_naming_it(network: str, entry: str) -> None:
    """``subscriber.restricted`` with ``2001:db8::/32`` (or a whole IPv4 pool) would wall every
    subscriber of it; the message names the entry so the operator sees which."""
    assert NESTED.problem(net(network)) == (f"{network} covers the whole gateway.subscriber_prefixes entry {entry}; "
                                            "refusing a prefix that wide for one subscriber")


@pytest.mark.parametrize("network", ["100.64.8.0/23", "100.64.8.7/32", "100.65.0.0/16", "2001:db8:5::/49",
                                     "2001:db8:6::/48", "2001:db8:5:1::/64"])
def test_inside_an_entry_without_covering_one_is_fine(network: str) -> None:
    assert NESTED.problem(net(network)) is None


@pytest.mark.parametrize("network", ["198.51.100.7/32", "100.64.20.0/29", "100.64.21.0/24", "2001:db8:5::/48"])
def test_an_entry_of_one_customers_size_may_be_held_whole(network: str) -> None:
    """An entry no broader than /24 (IPv4) or /48 (IPv6) may be one customer's block, listed or
    leased as it is (a static address, a /29, a delegated /48): not a pool to protect."""
    space = AddressSpace((net("100.64.0.0/10"), net("198.51.100.7/32"), net("100.64.20.0/29"), net("100.64.21.0/24"),
                          net("2001:db8:5::/48")))
    assert space.problem(net(network)) is None
    version, first, last = span(net(network))
    assert space.accepts(version, first, last)


_ANY = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)).map(
        lambda t: ipaddress.IPv4Network((t[0] >> (32 - t[1]) << (32 - t[1]), t[1]))),
    st.tuples(st.sampled_from([0x2001_0DB8_0000, 0x2001_0DB8_0004, 0x2001_0DB8_0005, 0x2001_0DB9_0000]),
              st.integers(0, 2**80 - 1), st.integers(28, 128)).map(
        lambda t: ipaddress.IPv6Network(((t[0] << 80 | t[1]) >> (128 - t[2]) << (128 - t[2]), t[2]))),
    st.sampled_from([net("100.64.8.0/22"), net("2001:db8:5::/48"), net("2001:db8:4::/46"), net("100.64.0.0/10")]))


@given(_ANY, st.sampled_from([SPACE, NESTED, AddressSpace()]))
@settings(max_examples=500, deadline=None)
def test_accepts_agrees_with_problem(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
                                     space: AddressSpace) -> None:
    """The bulk parser asks ``accepts``; the full check asks ``problem``: one answer."""
    (version, first, last) = span(network)
    assert space.accepts(version, first, last) == (space.problem(network) is None), network


# -- find_overlaps ---------------------------------------------------------------------------

def test_overlaps_between_owners_only() -> None:
    entries = [("C-1", net("100.64.0.0/24")), ("C-1", net("100.64.0.7/32")),       # its own: fine
               ("C-2", net("100.64.0.5/32")),                                        # inside C-1's /24
               ("C-3", net("100.64.1.1/32")), ("C-4", net("100.64.1.1/32")),         # the same address
               ("C-5", net("2001:db8::/56")), ("C-6", net("2001:db8:0:1::/64")),     # v6 nested
               ("C-7", net("2001:db8:1::/56"))]
    pairs = find_overlaps(entries)
    assert sorted(pairs) == sorted([
        (("C-1", net("100.64.0.0/24")), ("C-2", net("100.64.0.5/32"))),
        (("C-3", net("100.64.1.1/32")), ("C-4", net("100.64.1.1/32"))),
        (("C-5", net("2001:db8::/56")), ("C-6", net("2001:db8:0:1::/64"))),
    ])


def test_families_never_overlap() -> None:
    assert find_overlaps([("a", net("0.0.0.0/0")), ("b", net("::/96"))]) == []


_NETWORKS = st.one_of(
    st.tuples(st.integers(0, 255), st.integers(24, 32)).map(
        lambda t: ipaddress.ip_network((0x64400000 | t[0], t[1]), strict=False)),
    st.tuples(st.integers(0, 255), st.integers(120, 128)).map(
        lambda t: ipaddress.ip_network((0x20010DB8 << 96 | t[0], t[1]), strict=False)))


@given(st.lists(st.tuples(st.sampled_from("ABCD"), _NETWORKS), max_size=25))
@settings(max_examples=300, deadline=None)
def test_overlaps_agree_with_brute_force(entries: list) -> None:
    """Every network inside another owner's is reported (one of two equal ones), paired with an
    overlapping network of another owner."""
    pairs = find_overlaps(entries)
    inner = {entry for _, entry in pairs}
    for (other, outer), (owner, network) in pairs:
        assert other != owner and network.subnet_of(outer)
    for owner, network in entries:
        for other, outer in entries:
            if other == owner or network.version != outer.version or not network.subnet_of(outer):
                continue
            if network != outer:
                assert (owner, network) in inner
            else:
                assert (owner, network) in inner or (other, outer) in inner


def test_overlaps_of_100k_entries_are_quick() -> None:
    entries = [(f"C-{i}", ipaddress.IPv4Network((0x64400000 + i, 32))) for i in range(100_000)]
    entries += [(f"C-{i}", ipaddress.IPv6Network(((0x20010DB8 << 96) + (i << 72), 56))) for i in range(100_000)]
    entries.append(("C-x", ipaddress.IPv4Network((0x64400000 + 256, 24))))
    started = time.perf_counter()
    pairs = find_overlaps(entries)
    assert time.perf_counter() - started < 5.0
    assert len(pairs) == 256 and all(outer[0] == "C-x" for outer, _ in pairs)

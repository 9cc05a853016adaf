"""The address-claims index against a brute-force overlap check (hypothesis)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.claims import ClaimsIndex
from enforcer.subscribers import key_network

V4 = st.builds(lambda a, p: ipaddress.ip_network(
                   f"{ipaddress.IPv4Address(a & ~((1 << (32 - p)) - 1) & 0xFFFFFFFF)}/{p}"),
               st.integers(0x64400000, 0x644000FF), st.sampled_from([22, 24, 29, 30, 32]))
V6 = st.builds(lambda a, p: ipaddress.ip_network(
    f"{ipaddress.IPv6Address(((0x20010db8 << 96) | a) & ~((1 << (128 - p)) - 1))}/{p}"),
    st.integers(0, (1 << 80) - 1), st.sampled_from([48, 56, 64, 128]))
OPS = st.lists(st.tuples(st.sampled_from(["A", "B", "C", "D"]), st.lists(st.one_of(V4, V6), max_size=3)),
               max_size=25)


def overlaps(a: ipaddress._BaseNetwork, b: ipaddress._BaseNetwork) -> bool:
    return a.version == b.version and (a.subnet_of(b) or b.subnet_of(a))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_index_agrees_with_brute_force(ops: list) -> None:
    index = ClaimsIndex()
    held: dict[str, tuple] = {}
    for sid, networks in ops:
        expected = next(((n, other) for n in networks for other, theirs in held.items()
                         if other != sid for t in theirs if overlaps(n, t)), None)
        found = index.conflict(sid, networks)
        assert (found is None) == (expected is None), (sid, networks, held, found)
        if found is None and len({str(n) for n in networks}) == len(networks) and not any(
                overlaps(a, b) for i, a in enumerate(networks) for b in networks[i + 1:]):
            index.claim(sid, networks)
            held[sid] = tuple(networks)
            if not networks:
                held.pop(sid, None)


def test_broad_prefix_names_the_neighbour() -> None:
    index = ClaimsIndex()
    index.claim("C-1", [ipaddress.ip_network("100.64.0.10/32")])
    found = index.conflict("C-9", [ipaddress.ip_network("100.64.0.0/16")])
    assert found is not None and found.holder == "C-1"
    assert str(found) == "100.64.0.0/16 covers 100.64.0.10/32, held by subscriber C-1"
    index.claim("C-1", [])
    assert index.conflict("C-9", [ipaddress.ip_network("100.64.0.0/16")]) is None


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_a_bulk_rebuild_answers_like_claims_one_by_one(ops: list) -> None:
    one_by_one = ClaimsIndex()
    for sid, networks in ops:
        if one_by_one.conflict(sid, networks) is None and not any(
                overlaps(a, b) for i, a in enumerate(networks) for b in networks[i + 1:]):
            one_by_one.claim(sid, networks)
    bulk, from_networks = ClaimsIndex(), ClaimsIndex()
    bulk.rebuild_keys(dict(one_by_one.held))       # the kernel keys, as the engine passes them
    from_networks.rebuild({sid: [key_network(k) for k in keys] for sid, keys in one_by_one.held.items()})
    assert from_networks.held == bulk.held
    probes = [n for _, networks in ops for n in networks] + [ipaddress.ip_network("100.64.0.0/24"),
                                                            ipaddress.ip_network("2001:db8::/40")]
    for probe in probes:
        mine, theirs = one_by_one.conflict("?", [probe]), bulk.conflict("?", [probe])
        assert (mine is None) == (theirs is None), probe
    for sid, networks in ops[:5]:   # and both keep working the same after more claims
        if one_by_one.conflict(sid, networks) is None and not any(
                overlaps(a, b) for i, a in enumerate(networks) for b in networks[i + 1:]):
            one_by_one.claim(sid, networks)
            bulk.claim(sid, networks)
    for probe in probes:
        assert (one_by_one.conflict("?", [probe]) is None) == (bulk.conflict("?", [probe]) is None), probe

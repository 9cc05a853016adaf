"""The newer session holds what it names when addresses *overlap*, not only when they are equal.

Found by a SPEC §9 audit: a restricted subscriber's Kea delegated prefix 2001:db8:100:10::/60
stayed enforced after a RADIUS Start gave 2001:db8:100:10::5 (inside it) to a paying subscriber,
walling the payer, because the book compared networks for equality only. Now the newer session
holds its address and the older session's overlapping prefix is released whole (as for an exact
re-lease); when the newer one ends, the older gets it back unless another newer one overlaps it.
The last test checks the book against a brute-force statement of that rule (hypothesis).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.match import Match
from enforcer.model import Network
from enforcer.sessions.book import SessionBook
from enforcer.sessions.session import Session

KEA, PAYER = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def net(text: str) -> Network:
    return ipaddress.ip_network(text)


def _s(source: str, key: str, mac: str, *addresses: str, seen: float) -> Session:
    return Session(source, key, Match(mac=mac), tuple(map(net, addresses)), seen=seen)


def test_a_newer_address_inside_an_older_prefix_releases_the_prefix_and_the_older_gets_it_back() -> None:
    book = SessionBook()
    pd = _s("kea", "2001:db8:100:10::/60", KEA, "2001:db8:100:10::/60", seen=1)
    book.start([pd])
    change = book.start([_s("radius", "192.0.2.2/00000001", PAYER, "2001:db8:100:10::5", seen=2)])
    assert ("mac", KEA) in change.touched, "the prefix's holder loses it: decided again"
    assert book.held(pd) == (), "the whole /60 is released: nothing walls ::5"
    holder = book.holder(net("2001:db8:100:10::5/128"))
    assert holder is not None and holder.key == "192.0.2.2/00000001"
    assert book.holder(net("2001:db8:100:10::7/128")) is None, "the rest of the /60 is free too"
    back = book.stop([("radius", "192.0.2.2/00000001")])
    assert ("mac", KEA) in back.touched
    assert book.held(pd) == (net("2001:db8:100:10::/60"),)
    assert book.holder(net("2001:db8:100:10::7/128")) is pd


def test_a_newer_prefix_containing_an_older_address_takes_it() -> None:
    book = SessionBook()
    address = _s("radius", "nas/1", PAYER, "100.64.3.20", seen=1)
    book.start([address])
    prefix = _s("cli", "100.64.3.16/29", KEA, "100.64.3.16/29", seen=2)
    assert ("mac", PAYER) in book.start([prefix]).touched
    assert book.held(address) == ()
    assert book.holder(net("100.64.3.20/32")) is prefix


def test_an_older_session_arriving_later_does_not_take_a_newer_ones_address() -> None:
    """A restart loads sessions in any order: ``seen`` decides, not the order of arrival."""
    newer = _s("radius", "nas/1", PAYER, "2001:db8:100:10::5", seen=2)
    older = _s("kea", "2001:db8:100:10::/60", KEA, "2001:db8:100:10::/60", seen=1)
    for order in ([newer, older], [older, newer]):
        book = SessionBook(order)
        assert book.held(older) == () and book.held(newer) == (net("2001:db8:100:10::5/128"),)


def test_the_older_gets_its_prefix_back_only_when_no_newer_session_overlaps_it() -> None:
    book = SessionBook()
    pd = _s("kea", "2001:db8:100:10::/60", KEA, "2001:db8:100:10::/60", seen=1)
    book.start([pd, _s("radius", "nas/1", PAYER, "2001:db8:100:10::5", seen=2),
                _s("radius", "nas/2", PAYER, "2001:db8:100:11::/64", seen=3)])
    book.stop([("radius", "nas/1")])
    assert book.held(pd) == (), "nas/2's /64 still lies within it"
    book.stop([("radius", "nas/2")])
    assert book.held(pd) == (net("2001:db8:100:10::/60"),)


def test_a_sessions_own_nested_addresses_do_not_compete() -> None:
    book = SessionBook()
    session = _s("radius", "nas/1", KEA, "2001:db8:100:1::/64", "2001:db8:100:1::5", seen=1)
    book.start([session])
    assert book.held(session) == session.addresses


def test_a_prefix_length_seen_first_after_many_addresses_still_finds_them() -> None:
    book = SessionBook()
    book.start([_s("kea", f"2001:db8:100:10::{i:x}", PAYER, f"2001:db8:100:10::{i:x}", seen=1) for i in range(1, 9)])
    book.start([_s("kea", "2001:db8:100:20::1", PAYER, "2001:db8:100:20::1", seen=1)])
    wide = _s("cli", "2001:db8:100:10::/60", KEA, "2001:db8:100:10::/60", seen=2)
    book.start([wide])
    assert [s.key for s in book.sessions.values() if not book.held(s)] == [
        f"2001:db8:100:10::{i:x}" for i in range(1, 9)]
    assert book.held(wide) == wide.addresses


# -- against the rule stated plainly -----------------------------------------------------------------

V4 = st.builds(lambda a, p: ipaddress.ip_network((a >> (32 - p) << (32 - p), p)),
               st.integers(0x64400000, 0x6440001F), st.sampled_from([27, 29, 30, 32]))
V6 = st.builds(lambda a, p: ipaddress.ip_network((((0x20010db8 << 96) | a) >> (128 - p) << (128 - p), p)),
               st.integers(0, 0xFF).map(lambda a: a << 68), st.sampled_from([56, 60, 64, 128]))
SESSION = st.tuples(st.sampled_from("abcdef"), st.lists(st.one_of(V4, V6), max_size=3, unique=True),
                    st.integers(0, 4))
OPS = st.lists(st.one_of(st.tuples(st.just("start"), SESSION), st.tuples(st.just("stop"), st.sampled_from("abcdef"))),
               max_size=30)


def _overlap(a: Any, b: Any) -> bool:
    return bool(a.version == b.version and (a.subnet_of(b) or b.subnet_of(a)))


def expected_held(sessions: dict[str, Session], key: str) -> set[Network]:
    """The rule: an address is held unless a newer session (``seen``, then id) names an
    overlapping one."""
    me = sessions[key]
    return {a for a in me.addresses
            if not any((o.seen, o.id) > (me.seen, me.id) and any(_overlap(a, b) for b in o.addresses)
                       for o in sessions.values() if o.key != key)}


@settings(max_examples=400, deadline=None)
@given(OPS)
def test_the_book_follows_the_rule_and_touches_whoever_gains_or_loses(ops: list[Any]) -> None:
    book = SessionBook()
    model: dict[str, Session] = {}
    for op, arg in ops:
        before = {k: expected_held(model, k) for k in model}
        if op == "start":
            key, addresses, seen = arg
            session = Session("src", key, Match(username=f"u-{key}"), tuple(addresses), seen=float(seen))
            change = book.start([session])
            if model.get(key) != session:   # one equal but for ``seen`` changes nothing, keeps its instant
                model[key] = session
        else:
            change = book.stop([("src", arg)])
            model.pop(arg, None)
        for key, session in model.items():
            now = expected_held(model, key)
            assert set(book.held(book.sessions[session.id])) == now, (key, ops)
            if key in before and before[key] != now:
                assert ("username", f"u-{key}") in change.touched, (key, "changed hands but was not touched")
    rebuilt = SessionBook(reversed(list(model.values())))   # a restart, in another order
    for key, session in model.items():
        assert set(rebuilt.held(rebuilt.sessions[session.id])) == expected_held(model, key)

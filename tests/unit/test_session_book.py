"""The session book: merging sources, newest holder of an address, what a change touches."""

from __future__ import annotations

import ipaddress

from enforcer.match import Match
from enforcer.sessions.book import SessionBook
from enforcer.sessions.session import Session


def _s(source: str, key: str, mac: str, *addresses: str, seen: float = 0.0, expires: float | None = None,
       subscriber: str = "") -> Session:
    return Session(source, key, Match(mac=mac), tuple(ipaddress.ip_network(a) for a in addresses), subscriber,
                   expires, seen)


A, B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def test_a_new_session_is_indexed_by_its_keys_and_holds_its_addresses() -> None:
    book = SessionBook()
    change = book.start([_s("dnsmasq", "100.64.0.5", A, "100.64.0.5", seen=1)])
    assert change.touched == {("mac", A)}
    [session] = book.matching([("mac", A)])
    assert book.held(session) == (ipaddress.ip_network("100.64.0.5"),)


def test_the_newer_session_of_an_address_holds_it_and_the_older_is_touched() -> None:
    book = SessionBook()
    book.start([_s("radius", "nas/1", A, "100.64.0.5", seen=1)])
    change = book.start([_s("dnsmasq", "100.64.0.5", B, "100.64.0.5", seen=2)])
    assert change.touched == {("mac", A), ("mac", B)}, "the old holder loses the address: decided again"
    [old] = book.matching([("mac", A)])
    assert book.held(old) == ()
    assert book.holder(ipaddress.ip_network("100.64.0.5")).match.mac == B


def test_when_the_holder_ends_the_newest_remaining_session_holds_the_address() -> None:
    book = SessionBook()
    book.start([_s("radius", "nas/1", A, "100.64.0.5", seen=1)])
    book.start([_s("dnsmasq", "100.64.0.5", B, "100.64.0.5", seen=2)])
    change = book.stop([("dnsmasq", "100.64.0.5")])
    assert ("mac", A) in change.touched
    assert book.holder(ipaddress.ip_network("100.64.0.5")).match.mac == A


def test_an_update_equal_to_what_is_held_changes_nothing() -> None:
    book = SessionBook()
    book.start([_s("dnsmasq", "100.64.0.5", A, "100.64.0.5", seen=1)])
    assert not book.start([_s("dnsmasq", "100.64.0.5", A, "100.64.0.5", seen=9)])


def test_replace_ends_what_the_source_no_longer_has_unless_incomplete() -> None:
    book = SessionBook()
    book.start([_s("dnsmasq", "100.64.0.5", A, "100.64.0.5"), _s("dnsmasq", "100.64.0.6", B, "100.64.0.6"),
                _s("kea", "100.64.1.1", B, "100.64.1.1")])
    partial = book.replace("dnsmasq", [_s("dnsmasq", "100.64.0.5", A, "100.64.0.5")], complete=False)
    assert not partial and len(book) == 3, "a partly read file ends nobody's session"
    full = book.replace("dnsmasq", [_s("dnsmasq", "100.64.0.5", A, "100.64.0.5")])
    assert [s.key for s in full.stopped] == ["100.64.0.6"]
    assert set(book.of_source("kea")) == {"100.64.1.1"}, "another source's sessions are its own"


def test_expired_sessions_end_and_next_expiry_is_the_earliest() -> None:
    book = SessionBook()
    book.start([_s("dnsmasq", "a", A, "100.64.0.5", expires=100), _s("dnsmasq", "b", B, "100.64.0.6", expires=50),
                _s("radius", "c", B, "100.64.0.7")])
    assert book.next_expiry() == 50
    assert [s.key for s in book.expire(60).stopped] == ["b"]
    assert book.next_expiry() == 100


def test_a_session_naming_an_account_matches_by_id() -> None:
    book = SessionBook()
    book.start([_s("event", "100.64.0.5", "", "100.64.0.5", subscriber="C-1")])
    assert [s.key for s in book.matching([("id", "C-1")])] == ["100.64.0.5"]
    assert book.counts() == {"event": 1}

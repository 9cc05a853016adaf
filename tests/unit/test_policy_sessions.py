"""The policy with sessions: a restriction covers what the subscriber's sessions hold now."""

from __future__ import annotations

import ipaddress

from enforcer.match import Match
from enforcer.model import Mode
from enforcer.policy import PolicyInputs
from enforcer.sessions.book import SessionBook
from enforcer.sessions.session import Session
from enforcer.subscribers import Subscriber, parse_address

NOW = 1_795_000_000.0


def _lease(key: str, match: Match, *addresses: str, seen: float = 0.0, subscriber: str = "") -> Session:
    return Session("dnsmasq", key, match, tuple(ipaddress.ip_network(a) for a in addresses), subscriber, seen=seen)


def _inputs(*entries: Subscriber, sessions: list[Session]) -> PolicyInputs:
    inputs = PolicyInputs({s.id: s for s in entries}, {}, {})
    inputs.sessions = SessionBook(sessions)
    return inputs


def test_a_listed_subscribers_session_addresses_join_its_own() -> None:
    inputs = _inputs(Subscriber("C-1", (parse_address("100.64.1.1"),), match=Match(username="c1@isp")),
                     sessions=[_lease("s", Match(username="c1@isp"), "100.64.0.5", "2001:db8:5::/56")])
    decision = inputs.decide("C-1", NOW)
    assert [str(a) for a in decision.subscriber.addresses] == ["100.64.1.1/32", "100.64.0.5/32", "2001:db8:5::/56"]
    assert "session addresses: 100.64.0.5/32, 2001:db8:5::/56 from dnsmasq session s" in decision.cause


def test_a_free_subscriber_gets_nothing_from_sessions() -> None:
    inputs = _inputs(sessions=[_lease("s", Match(mac="02:00:00:00:00:01"), "100.64.0.5")])
    assert inputs.decide("C-1", NOW).mode is Mode.FREE
    assert inputs.subscribers_of([("mac", "02:00:00:00:00:01")]) == set()


def test_the_most_specific_key_decides_whose_session_it_is() -> None:
    by_mac = Subscriber("C-1", (), match=Match(mac="02:00:00:00:00:01"))
    by_user = Subscriber("C-2", (), match=Match(username="c2@isp"))
    session = _lease("s", Match(username="c2@isp", mac="02:00:00:00:00:01"), "100.64.0.5")
    inputs = _inputs(by_mac, by_user, sessions=[session])
    assert inputs.session_owner(session) == "C-2"
    assert inputs.decide("C-2", NOW).subscriber.addresses == (parse_address("100.64.0.5"),)
    assert inputs.decide("C-1", NOW).subscriber.addresses == ()
    assert inputs.subscribers_of(session.pairs()) == {"C-1", "C-2"}, "both are decided again after a change"


def test_an_account_id_names_the_subscriber_directly() -> None:
    session = _lease("s", Match(), "100.64.0.5", subscriber="C-1")
    inputs = _inputs(Subscriber("C-1", (), match=Match(mac="02:00:00:00:00:09")), sessions=[session])
    assert inputs.session_owner(session) == "C-1"
    assert inputs.decide("C-1", NOW).subscriber.addresses == (parse_address("100.64.0.5"),)


def test_an_address_a_newer_session_took_is_not_the_old_holders() -> None:
    old = _lease("radius/1", Match(mac="02:00:00:00:00:01"), "100.64.0.5", seen=1)
    new = _lease("100.64.0.5", Match(mac="02:00:00:00:00:02"), "100.64.0.5", seen=2)
    inputs = _inputs(Subscriber("C-1", (), match=Match(mac="02:00:00:00:00:01")), sessions=[old, new])
    decision = inputs.decide("C-1", NOW)
    assert decision.restricted and decision.subscriber.addresses == ()


def test_the_fields_the_policy_builds_directly_are_all_there() -> None:
    """``_with_sessions`` and ``Session.stamped`` build these without ``dataclasses.replace``
    (for speed): a new field must be added there too."""
    from dataclasses import fields

    from enforcer.policy import Decision
    assert [f.name for f in fields(Subscriber)] == ["id", "addresses", "mode", "reason", "exempt_until",
                                                    "exempt_category", "match"]
    assert [f.name for f in fields(Decision)] == ["subscriber_id", "mode", "cause", "subscriber", "until", "pending"]
    assert [f.name for f in fields(Session)] == ["source", "key", "match", "addresses", "subscriber", "expires",
                                                 "seen", "detail"]

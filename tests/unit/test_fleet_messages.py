"""The fleet's envelope is read as strictly as a webhook: anything else is a ``MessageError``
naming the field, never a half-applied input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.events import PAYMENT, RESTRICTED, SESSION_STARTED, Event
from enforcer.fleet.messages import KINDS, Message, MessageError, decode, event_body, event_of
from enforcer.subscribers import parse_list

SUBSCRIBER = parse_list("subscribers:\n  - {id: C-1, addresses: [100.64.0.10], reason: overdue}\n", "l.yaml")[0]


def envelope(kind: str, body: dict[str, Any], **over: Any) -> bytes:
    return json.dumps({"v": 1, "kind": kind, "gateway": "gw-a", "at": 1_800_000_000.0, "body": body, **over}).encode()


def test_an_event_round_trips_with_its_actor_and_gateway() -> None:
    event = Event("op-1", RESTRICTED, 1_800_000_000.0, "C-1", SUBSCRIBER, actor="root", note="owes")
    message = decode(Message("event", "gw-a", 1_800_000_001.0, event_body(event)).encode())
    got = event_of(message)
    assert got.actor == "root" and got.via == "gw-a" and got.subscriber == SUBSCRIBER and got.note == "owes"


@pytest.mark.parametrize(("data", "names"), [
    (b"\xff", "not JSON"),
    (b"[]", "not a JSON object"),
    (envelope("event", {}, v=2), "v: 2"),
    (envelope("teleport", {}), "kind: 'teleport'"),
    (envelope("exempt", {}, gateway=""), "gateway"),
    (envelope("exempt", {}, at=-1), "at: -1"),
    (envelope("exempt", {}, at=True), "at: True"),
    (envelope("exempt", []), "body: expected an object"),
    (envelope("exempt", {"actor": "r", "subscriber": "C-1", "category": "vulnerable", "note": ""}),
     "body.until: missing"),
    (envelope("exempt", {"actor": "r", "subscriber": "C-1", "category": "spa", "until": 2e9, "note": ""}),
     "body.category"),
    (envelope("exempt", {"actor": "r", "subscriber": "", "category": "other", "until": 2e9, "note": ""}),
     "body.subscriber"),
    (envelope("promise", {"subscriber": "C-1", "address": "not-an-ip"}), "body.address"),
    (envelope("list_approve", {"actor": "r", "note": "", "digest": 5}), "body.digest"),
    (envelope("exempt", {"actor": "r", "subscriber": "C-1", "category": "other", "until": 1e20, "note": ""}),
     "body.until"),
    (envelope("event", {"id": "e1", "type": "outage.opened", "timestamp": 1, "subscriber_id": "C-1",
                        "until": 1e20}), "body.until"),
    (b'{"v":1,"kind":"event","gateway":"a","at":1,"body":{"id":"e1","type":"payment.received","timestamp":NaN,'
     b'"subscriber_id":"C-1"}}', "not JSON: NaN"),
    (envelope("event", {"id": "e1", "type": PAYMENT, "timestamp": -5, "subscriber_id": "C-1"}), "body.timestamp"),
    (envelope("operator", {"id": "x", "actor": "r", "subscriber": "C-1", "restrict": "yes", "note": "",
                           "mode": None, "addresses": None}), "body.restrict"),
    (envelope("operator", {"id": "evt-1", "actor": "r", "subscriber": "C-1", "restrict": True, "note": "",
                           "mode": None, "addresses": None}), "not an operator action"),
    (envelope("sessions", {"source": "gw-a/dnsmasq", "started": "x", "stopped": []}), "body.started"),
    (envelope("session_event", {"id": "e1", "type": PAYMENT, "timestamp": 1, "subscriber_id": "C-1",
                                "source": "gw-a/cli"}), "a session_event"),
    (envelope("event", {"id": "e1", "type": RESTRICTED, "timestamp": 1, "subscriber_id": "C-1", "subscriber": None}),
     "carries the subscriber's entry"),
    (envelope("event", {"id": "e1", "type": PAYMENT, "timestamp": 1, "subscriber_id": "C 1 ; drop"}),
     "body.subscriber_id"),
    (envelope("event", {"id": "e1", "type": "payment.maybe", "timestamp": 1, "subscriber_id": "C-1"}), "type"),
    (envelope("event", {"id": "e1", "type": PAYMENT, "timestamp": 1, "subscriber_id": "C-1",
                        "subscriber": SUBSCRIBER.to_json()}), "carries no entry"),
    (envelope("event", {"id": "e1", "type": SESSION_STARTED, "timestamp": 1, "subscriber_id": "C-1"}),
     "needs its addresses"),
    (envelope("event", {"id": "e1", "type": RESTRICTED, "timestamp": 1, "subscriber_id": "C-1",
                        "subscriber": {**SUBSCRIBER.to_json(), "addresses": ["0.0.0.0/0"]}}), "body.subscriber"),
])
def test_a_bad_message_is_refused_by_name(data: bytes, names: str) -> None:
    with pytest.raises(MessageError, match=names.replace("(", r"\(").replace("*", r"\*")):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), st.dictionaries(st.sampled_from(
    ["actor", "subscriber", "category", "until", "note", "address", "digest", "id", "type", "timestamp",
     "subscriber_id", "addresses", "match"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
              st.lists(st.text(max_size=8), max_size=2), st.dictionaries(st.text(max_size=4), st.text(max_size=4)))))
def test_arbitrary_bodies_only_ever_raise_message_error(kind: str, body: dict[str, Any]) -> None:
    try:
        message = decode(envelope(kind, body))
    except MessageError:
        return
    assert message.kind == kind   # what passes is a well-formed input of its kind
    if kind == "event":
        event_of(message)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_message_error(data: bytes) -> None:
    try:
        decode(data)
    except MessageError:
        pass

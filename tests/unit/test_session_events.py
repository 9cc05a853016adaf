"""``session.started`` / ``session.stopped`` bodies: read as strictly as billing's events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from enforcer.events import EventError, parse_event
from enforcer.match import Match


def _event(kind: str, data: Any) -> Any:
    return parse_event("s-1", json.dumps({"type": kind, "timestamp": 1_795_000_000, "data": data}))


def test_keys_in_data_or_in_match_and_normalised() -> None:
    flat = _event("session.started", {"mac": "02-00-00-00-10-01", "username": "c1@isp", "addresses": ["100.64.0.9"]})
    nested = _event("session.started", {"match": {"mac": "0200.0000.1001", "username": "c1@isp"},
                                        "addresses": "100.64.0.9"})
    assert flat.match == nested.match == Match(username="c1@isp", mac="02:00:00:00:10:01")
    assert flat.addresses == nested.addresses and flat.subscriber_id == ""


def test_a_stop_may_omit_addresses_and_may_name_the_account() -> None:
    event = _event("session.stopped", {"subscriber": "C-1"})
    assert (event.subscriber_id, event.addresses, event.match) == ("C-1", (), Match())


@pytest.mark.parametrize(("data", "message"), [
    ({"mac": "02:00:00:00:10:01"}, "data.addresses: a started session needs at least one address"),
    ({"addresses": ["100.64.0.9"]}, "data names nobody"),
    ({"mac": "zz", "addresses": ["100.64.0.9"]}, "data.match: mac 'zz' is not a MAC address"),
    ({"mac": "02:00:00:00:10:01", "match": {"mac": "02:00:00:00:10:02"}, "addresses": ["100.64.0.9"]},
     "data.mac is given both in data and in data.match"),
    ({"mac": "02:00:00:00:10:01", "addresses": ["100.0.0.0/8"]}, "broader than /16"),
    ({"mac": "02:00:00:00:10:01", "addresses": [7]}, "data.addresses: 7 is not an address"),
    ({"mac": "02:00:00:00:10:01", "addresses": {"a": 1}}, "data.addresses must be a list"),
    ({"mac": "02:00:00:00:10:01", "addresses": ["127.0.0.1"]}, "data.addresses: '127.0.0.1'"),
    ({"mac": "02:00:00:00:10:01", "addresses": ["100.64.0.9"], "vlan": 7}, "data.vlan is not a session field"),
    ({"subscriber": "bad id!", "addresses": ["100.64.0.9"]}, "data.subscriber"),
    ({"match": "username=c1@isp", "addresses": ["100.64.0.9"]}, "data.match must be an object"),
    ("nope", "data must be an object"),
])
def test_each_bad_body_is_refused_naming_the_field(data: Any, message: str) -> None:
    with pytest.raises(EventError) as info:
        _event("session.started", data)
    assert message in str(info.value)

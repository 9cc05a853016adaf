"""The control socket's messages: what the daemon sends is what the portal reads, field for field,
and every malformed field is refused by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from enforcer import control, control_protocol
from enforcer.control_protocol import (
    NOT_OFFERED,
    Acknowledged,
    Lookup,
    Promised,
    PromiseOffer,
    ProtocolError,
    Refusal,
    not_a_recent_caller,
)
from enforcer.model import Mode

# The daemon's answers on the wire, byte for byte (the format clients rely on).
RESTRICTED = ('{"address": "100.64.0.10", "restricted": true, "mode": "notice", "reason": "overdue", '
              '"subscriber": "C-1", "reference": "WG-7K2M-Q9XD", "ack_until": 1800007200.0, '
              '"promise": {"eligible": true, "why": "eligible", "term_seconds": 259200.0}}')
FREE = ('{"address": "2001:db8::10", "restricted": false, "mode": "free", "reason": "", "subscriber": null, '
        '"reference": "", "ack_until": null, "promise": {"eligible": false, "why": "not_restricted", '
        '"term_seconds": null}}')
WALLED = ('{"address": "100.64.0.20", "restricted": true, "mode": "walled-garden", "reason": "fraud", '
          '"subscriber": "C-2", "reference": "WG-AAAA-BBBB", "ack_until": null, '
          '"promise": {"eligible": false, "why": "reason_not_eligible", "term_seconds": null}}')
ACKNOWLEDGED = '{"acknowledged": true, "until": 1800007200.0}'
NOTHING_TO_ACKNOWLEDGE = '{"acknowledged": false, "mode": "free"}'
PROMISED = '{"promised": true, "until": 1800259200.0, "mode": "free"}'
NOT_A_CALLER = ('{"error": "this address has not connected to the portal recently; reload the page", '
                '"eligible": false, "why": "not_a_recent_caller"}')
LIMIT = '{"error": "a promise to pay is not available for this connection", "eligible": false, "why": "limit_reached"}'
WALLED_IN = '{"error": "this connection is in the walled garden; it cannot be acknowledged away"}'

# What the portal's client makes of them, field for field.
PARSED: list[tuple[type[Any], str, Any]] = [
    (Lookup, RESTRICTED, Lookup("100.64.0.10", True, "notice", "overdue", "WG-7K2M-Q9XD", "C-1", 1800007200.0,
                                PromiseOffer(True, "eligible", 259200.0))),
    (Lookup, FREE, Lookup("2001:db8::10", False, "free", "", "", "", None, PromiseOffer(False, "not_restricted"))),
    (Lookup, WALLED, Lookup("100.64.0.20", True, "walled-garden", "fraud", "WG-AAAA-BBBB", "C-2",
                            promise=PromiseOffer(False, "reason_not_eligible"))),
    (Acknowledged, ACKNOWLEDGED, Acknowledged(True, 1800007200.0)),
    (Acknowledged, NOTHING_TO_ACKNOWLEDGE, Acknowledged(False, mode="free")),
    (Promised, PROMISED, Promised(True, 1800259200.0, mode="free")),
    (Refusal, NOT_A_CALLER, not_a_recent_caller()),
    (Refusal, LIMIT, Refusal("a promise to pay is not available for this connection", False, "limit_reached")),
    (Refusal, WALLED_IN, Refusal("this connection is in the walled garden; it cannot be acknowledged away")),
]


@pytest.mark.parametrize("kind,text,expected", PARSED)
def test_the_wire_format_is_what_the_daemon_sent_and_the_portal_read(kind: type[Any], text: str,
                                                                     expected: Any) -> None:
    assert kind.from_json(json.loads(text)) == expected
    assert json.dumps(expected.to_json()) == text   # byte for byte, key order included


@pytest.mark.parametrize("kind,text,expected", PARSED)
def test_round_trips(kind: type[Any], text: str, expected: Any) -> None:
    assert kind.from_json(json.loads(json.dumps(expected.to_json()))) == expected


def test_a_mode_given_as_a_mode_is_sent_and_compared_as_its_value() -> None:
    lookup = Lookup("100.64.0.10", True, Mode.NOTICE, "overdue", "WG-1")
    assert lookup.mode == "notice" and type(lookup.mode) is str and lookup.in_notice
    assert json.dumps(Acknowledged(False, mode=Mode.FREE).to_json()) == NOTHING_TO_ACKNOWLEDGE
    assert Promised(True, 1.0, mode=Mode.FREE).to_json()["mode"] == "free"


def test_missing_optional_fields_read_as_none() -> None:
    bare = {"address": "100.64.0.10", "restricted": True, "mode": "throttle"}
    assert Lookup.from_json(bare) == Lookup("100.64.0.10", True, "throttle", "", "", "", None, NOT_OFFERED)
    assert Lookup.from_json(dict(bare, reason=None, promise=None)).promise is NOT_OFFERED
    # Without a term the page could not say what the button does: not eligible, the why kept.
    assert PromiseOffer.from_json({"eligible": True, "why": "eligible"}) == PromiseOffer(False, "eligible")
    assert Refusal.from_json({"error": "no"}) == Refusal("no")


def valid_lookup() -> dict[str, Any]:
    return json.loads(RESTRICTED)


def with_field(key: str, value: Any) -> dict[str, Any]:
    body = valid_lookup()
    if "." in key:
        outer, inner = key.split(".")
        body[outer] = dict(body[outer], **{inner: value})
    else:
        body[key] = value
    return body


def without(key: str) -> dict[str, Any]:
    body = valid_lookup()
    del body[key]
    return body


@pytest.mark.parametrize("body,field", [
    ([], "lookup"),
    ("restricted", "lookup"),
    (without("address"), "address"),
    (with_field("address", 10), "address"),
    (with_field("address", "not-an-ip"), "address"),
    (without("restricted"), "restricted"),
    (with_field("restricted", "yes"), "restricted"),
    (with_field("restricted", 1), "restricted"),
    (without("mode"), "mode"),
    (with_field("mode", "banned"), "mode"),
    (with_field("mode", ["notice"]), "mode"),
    (with_field("mode", "free"), "mode"),               # free and restricted at once
    (with_field("reason", 3), "reason"),
    (with_field("subscriber", {"id": "C-1"}), "subscriber"),
    (with_field("reference", False), "reference"),
    (with_field("ack_until", "soon"), "ack_until"),
    (with_field("ack_until", True), "ack_until"),
    (with_field("ack_until", float("nan")), "ack_until"),
    (with_field("promise", "yes"), "promise"),
    (with_field("promise.eligible", "true"), "promise.eligible"),
    (with_field("promise.why", 7), "promise.why"),
    (with_field("promise.term_seconds", "3 days"), "promise.term_seconds"),
    (with_field("promise.term_seconds", -5), "promise.term_seconds"),
    (with_field("promise.term_seconds", 0), "promise.term_seconds"),
])
def test_a_malformed_lookup_is_refused_naming_the_field(body: Any, field: str) -> None:
    with pytest.raises(ProtocolError, match=rf"^{field}: ") as caught:
        Lookup.from_json(body)
    assert caught.value.field == field and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("kind,body,field", [
    (Acknowledged, None, "acknowledgement"),
    (Acknowledged, {}, "acknowledged"),
    (Acknowledged, {"acknowledged": "true", "until": 1.0}, "acknowledged"),
    (Acknowledged, {"acknowledged": True}, "until"),
    (Acknowledged, {"acknowledged": True, "until": "later"}, "until"),
    (Acknowledged, {"acknowledged": False}, "mode"),
    (Acknowledged, {"acknowledged": False, "mode": "paid"}, "mode"),
    (Promised, ["promised"], "promise answer"),
    (Promised, {"until": 1.0, "mode": "free"}, "promised"),
    (Promised, {"promised": False, "until": 1.0, "mode": "free"}, "promised"),
    (Promised, {"promised": True, "mode": "free"}, "until"),
    (Promised, {"promised": True, "until": None, "mode": "free"}, "until"),
    (Promised, {"promised": True, "until": 1.0}, "mode"),
    (Refusal, "no", "refusal"),
    (Refusal, {}, "error"),
    (Refusal, {"error": 404}, "error"),
    (Refusal, {"error": "no", "eligible": "false"}, "eligible"),
    (Refusal, {"error": "no", "why": ["limit"]}, "why"),
])
def test_a_malformed_answer_is_refused_naming_the_field(kind: type[Any], body: Any, field: str) -> None:
    with pytest.raises(ProtocolError, match=rf"^{field}: ") as caught:
        kind.from_json(body)
    assert caught.value.field == field


def test_a_refused_promise_is_not_sent_as_a_promised() -> None:
    with pytest.raises(ValueError, match="Refusal"):
        Promised(False, why="limit_reached").to_json()


def test_the_paths_are_the_ones_the_clients_use() -> None:
    assert control_protocol.PATHS == ("/v1/lookup", "/v1/status", "/v1/explain", "/v1/audit", "/v1/fleet",
                                      "/v1/acknowledge",
                                      "/v1/promise", "/v1/restrict", "/v1/lift", "/v1/approve", "/v1/reject",
                                      "/v1/exempt", "/v1/unexempt", "/v1/session/start", "/v1/session/stop")
    assert [control_protocol.action_name(p) for p in control_protocol.PORTAL_ACTIONS] == ["acknowledge", "promise"]
    from captive_portal import enforcer_client
    assert enforcer_client.LOOKUP_URL.endswith(control_protocol.LOOKUP)
    assert enforcer_client.Lookup is Lookup and enforcer_client.Promised is Promised


def test_the_cli_client_refuses_a_path_the_socket_does_not_serve(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="/v1/stauts"):
        control.request(str(tmp_path / "never-connected.sock"), "GET", "/v1/stauts")
    with pytest.raises(control.ControlError, match="cannot reach the daemon"):   # a known path gets that far
        control.request(str(tmp_path / "never-connected.sock"), "GET", "/v1/explain?q=C-1")

"""Billing events (docs/reference.md, Billing webhooks): the body of a verified webhook, parsed and validated.

A malformed event is refused with a message naming the field, never half-applied. Whatever
the bytes, ``parse_event`` returns an ``Event`` or raises ``EventError`` (a signed body from a
buggy billing system must get a 400 it can act on, not a 500): the body must be UTF-8 JSON
without duplicate keys, NaN/Infinity or unpaired surrogates, nested at most ``MAX_DEPTH``
deep, and every time must lie between 1970 and 9999 (what ``datetime`` and the state
database can hold).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import ip_network
from typing import Any

from .match import MATCH_KEYS, Match, parse_match
from .model import Network
from .subscribers import ListIssue, Subscriber, id_problem, parse_address, validate_entry

PAYMENT = "payment.received"
RESTRICTED = "subscriber.restricted"
RELEASED = "subscriber.released"
READDRESSED = "subscriber.addresses_changed"
#: Billing (or the fault-ticket system) opens and closes dispute/outage exemptions.
EXEMPTION_OPENED = {"dispute.opened": "dispute", "outage.opened": "outage"}
EXEMPTION_CLOSED = {"dispute.closed": "dispute", "outage.closed": "outage"}
#: A BNG or DHCP integration reports where a subscriber is (docs/reference.md, Sessions).
SESSION_STARTED = "session.started"
SESSION_STOPPED = "session.stopped"
SESSION_TYPES = (SESSION_STARTED, SESSION_STOPPED)
TYPES = (PAYMENT, RESTRICTED, RELEASED, READDRESSED, *EXEMPTION_OPENED, *EXEMPTION_CLOSED, *SESSION_TYPES)


#: Times outside [1970-01-01, 10000-01-01) are refused: nothing billing sends lies there, and
#: ``datetime`` cannot hold the upper end (OverflowError downstream instead of a 400).
EARLIEST, LATEST = 0.0, 253402300800.0
#: Deepest nesting a body may have; an event is three levels deep. A deeper body is refused
#: before ``json`` recurses into it (100k-deep arrays raise RecursionError).
MAX_DEPTH = 32


class EventError(ValueError):
    """The body is not a valid event; the message says which field and why."""


@dataclass(frozen=True)
class Event:
    id: str                 # the webhook-id: the idempotency key
    type: str
    timestamp: float        # when billing says it happened (unix seconds)
    subscriber_id: str
    subscriber: Subscriber | None = None   # for subscriber.restricted
    actor: str = ""                         # an operator (CLI), or "" for billing
    note: str = ""                          # the operator's reason, or billing's note on an exemption
    until: float | None = None              # when an opened exemption ends (None: the configured default)
    match: Match = field(default_factory=Match)   # session events: who the session belongs to
    addresses: tuple[Network, ...] = ()     # session events: its addresses (stopped: none means all)
    via: str = ""                           # in a fleet: the gateway that accepted it ("" alone)


def _shown(value: Any) -> str:
    """``repr`` cut to a length that fits an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_range(value: Any, seconds: float) -> float:
    if not (math.isfinite(seconds) and EARLIEST <= seconds < LATEST):
        raise EventError(f"timestamp {_shown(value)} lies outside 1970-01-01..9999-12-31")
    return seconds


def parse_timestamp(value: Any) -> float:
    """RFC 3339 (``2026-11-23T10:00:00Z``) or unix seconds, between 1970 and 9999."""
    if isinstance(value, bool):
        raise EventError("timestamp must be an RFC 3339 time or unix seconds")
    if isinstance(value, (int, float)):
        try:
            return _in_range(value, float(value))
        except OverflowError:  # an integer beyond float's range
            raise EventError(f"timestamp {_shown(value)} lies outside 1970-01-01..9999-12-31") from None
    if not isinstance(value, str):
        raise EventError("timestamp must be an RFC 3339 time such as 2026-11-23T10:00:00Z")
    shown = value if len(value) <= 40 else value[:40] + "..."  # quoted with !r below
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise EventError(f"timestamp {shown!r} is not an RFC 3339 time such as 2026-11-23T10:00:00Z") from None
    if parsed.tzinfo is None:
        raise EventError(f"timestamp {shown!r} has no time zone (add Z or +01:00)")
    try:  # 0001-01-01T00:00+01:00 lies before datetime.min in UTC
        return _in_range(shown, parsed.astimezone(UTC).timestamp())
    except (OverflowError, ValueError):
        raise EventError(f"timestamp {shown!r} lies outside 1970-01-01..9999-12-31") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise EventError(f"key {key!r} appears twice in one object")
        data[key] = value
    return data


def _no_constant(name: str) -> Any:
    raise EventError(f"{name} is not a JSON number")


def _depth(text: str) -> int:
    """How deep brackets nest outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def load_json(body: bytes | str) -> Any:
    """Decode a webhook body: strict UTF-8 JSON, or EventError saying what is wrong and where."""
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventError(f"body is not UTF-8: byte {exc.start} ({body[exc.start:exc.start + 1]!r})") from None
    else:
        text = body
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise EventError(f"body is nested more than {MAX_DEPTH} levels deep")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ValueError as exc:  # EventError is one too
        if isinstance(exc, EventError):
            raise
        raise EventError(f"body is not JSON: {exc}") from None
    except RecursionError:  # _depth should have caught it; never a 500
        raise EventError(f"body is nested more than {MAX_DEPTH} levels deep") from None
    try:  # "\ud800" escapes decode to strings that cannot be stored or sent on
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EventError(f"body holds an unpaired surrogate ({exc.object[exc.start:exc.end]!r})") from None
    return data


def parse_event(event_id: str, body: bytes | str) -> Event:
    data = load_json(body)
    if not isinstance(data, dict):
        raise EventError("body must be a JSON object with type, timestamp and data")
    kind = data.get("type")
    if kind not in TYPES:
        raise EventError(f"type {_shown(kind)} is not one of {', '.join(TYPES)}")
    if "timestamp" not in data:
        raise EventError("timestamp is missing")
    timestamp = parse_timestamp(data["timestamp"])
    payload = data.get("data")
    if kind in SESSION_TYPES:
        return _session_event(event_id, kind, timestamp, payload)
    if not isinstance(payload, dict):
        raise EventError("data must be an object with at least 'subscriber'")
    sid = payload.get("subscriber")
    if not isinstance(sid, str) or not sid:
        raise EventError("data.subscriber must be the subscriber id (a string)")
    subscriber = None
    if kind in (RESTRICTED, READDRESSED):
        issues: list[ListIssue] = []
        entry = {"id": sid, **{k: payload[k] for k in ("addresses", "mode", "reason") if k in payload}}
        subscriber = validate_entry(entry, "data", issues)
        if subscriber is None:
            raise EventError("; ".join(i.message for i in issues))
    else:
        problem = id_problem(sid)
        if problem:
            raise EventError(f"data.subscriber: {problem}")
    note, until = "", None
    if kind in EXEMPTION_OPENED or kind in EXEMPTION_CLOSED:
        note = payload.get("note") or ""
        if not isinstance(note, str) or len(note) > 500:
            raise EventError("data.note must be a string of at most 500 characters")
        if kind in EXEMPTION_OPENED and payload.get("until") not in (None, ""):
            try:
                until = parse_timestamp(payload["until"])
            except EventError as exc:
                raise EventError(f"data.until: {exc}") from None
            if until <= timestamp:
                raise EventError("data.until lies before the event's timestamp")
    return Event(event_id, kind, timestamp, sid, subscriber, note=note, until=until)


def session_fields(payload: Any, need_address: bool) -> tuple[str, Match, tuple[Network, ...]]:
    """``subscriber``, the match keys (``data.match`` or the keys themselves in ``data``) and
    ``addresses`` of a session event or CLI request; EventError names the field."""
    if not isinstance(payload, dict):
        raise EventError("data must be an object with match keys (username, mac, circuit_id, remote_id) "
                         "or subscriber, and addresses")
    allowed = {"subscriber", "match", "addresses", *MATCH_KEYS}
    unknown = sorted(str(k) for k in payload if k not in allowed)
    if unknown:
        raise EventError(f"data.{unknown[0]} is not a session field; expected {', '.join(sorted(allowed))}")
    sid = payload.get("subscriber") or ""
    if sid:
        problem = id_problem(sid)
        if problem:
            raise EventError(f"data.subscriber: {problem}")
    given = payload.get("match")
    if given is not None and not isinstance(given, dict):
        raise EventError("data.match must be an object of username, mac, circuit_id, remote_id")
    keys = dict(given or {})
    for key in MATCH_KEYS:
        if key in payload:
            if key in keys:
                raise EventError(f"data.{key} is given both in data and in data.match")
            keys[key] = payload[key]
    match = Match()
    if keys:
        try:
            match = parse_match(keys)
        except ValueError as exc:
            raise EventError(f"data.match: {exc}") from None
    if not match and not sid:
        raise EventError("data names nobody: give match keys (username, mac, circuit_id, remote_id) or subscriber")
    raw = payload.get("addresses")
    if isinstance(raw, str):
        raw = raw.split()
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise EventError("data.addresses must be a list of addresses or prefixes")
    addresses: list[Network] = []
    for item in raw:
        if not isinstance(item, str):
            raise EventError(f"data.addresses: {_shown(item)} is not an address")
        try:
            network = parse_address(item)
        except ValueError as exc:
            raise EventError(f"data.addresses: {item[:60]!r}: {exc}") from None
        if network not in addresses:
            addresses.append(network)
    if need_address and not addresses:
        raise EventError("data.addresses: a started session needs at least one address")
    return str(sid), match, tuple(addresses)


def _session_event(event_id: str, kind: str, timestamp: float, payload: Any) -> Event:
    sid, match, addresses = session_fields(payload, kind == SESSION_STARTED)
    return Event(event_id, kind, timestamp, sid, match=match, addresses=addresses)


def event_to_wire(event: Event) -> dict[str, Any]:
    """A verified event as JSON (the webhook worker hands it to the daemon so; the fleet's stream
    carries it so), without ``actor``/``via``, which only the daemon sets."""
    return {"id": event.id, "type": event.type, "timestamp": event.timestamp, "subscriber_id": event.subscriber_id,
            "subscriber": event.subscriber.to_json() if event.subscriber else None, "note": event.note,
            "until": event.until, "match": event.match.to_json(), "addresses": [str(a) for a in event.addresses]}


def event_from_wire(data: dict[str, Any]) -> Event:
    subscriber = Subscriber.from_json(data["subscriber"]) if data.get("subscriber") else None
    return Event(data["id"], data["type"], float(data["timestamp"]), data["subscriber_id"], subscriber,
                 note=data.get("note") or "", until=data.get("until"), match=Match.from_json(data.get("match") or {}),
                 addresses=tuple(ip_network(a) for a in data.get("addresses") or ()))

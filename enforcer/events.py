"""Billing events (SPEC §4): the body of a verified webhook, parsed and validated.

A malformed event is refused with a message naming the field, never half-applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .subscribers import ListIssue, Subscriber, id_problem, validate_entry

PAYMENT = "payment.received"
RESTRICTED = "subscriber.restricted"
RELEASED = "subscriber.released"
READDRESSED = "subscriber.addresses_changed"
#: Billing (or the fault-ticket system) opens and closes dispute/outage exemptions.
EXEMPTION_OPENED = {"dispute.opened": "dispute", "outage.opened": "outage"}
EXEMPTION_CLOSED = {"dispute.closed": "dispute", "outage.closed": "outage"}
TYPES = (PAYMENT, RESTRICTED, RELEASED, READDRESSED, *EXEMPTION_OPENED, *EXEMPTION_CLOSED)


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


def parse_timestamp(value: Any) -> float:
    """RFC 3339 (``2026-11-23T10:00:00Z``) or unix seconds."""
    if isinstance(value, bool):
        raise EventError("timestamp must be an RFC 3339 time or unix seconds")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise EventError("timestamp must be an RFC 3339 time such as 2026-11-23T10:00:00Z")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise EventError(f"timestamp {value!r} is not an RFC 3339 time such as 2026-11-23T10:00:00Z") from None
    if parsed.tzinfo is None:
        raise EventError(f"timestamp {value!r} has no time zone (add Z or +01:00)")
    return parsed.astimezone(timezone.utc).timestamp()


def parse_event(event_id: str, body: bytes | str) -> Event:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EventError("body must be a JSON object with type, timestamp and data")
    kind = data.get("type")
    if kind not in TYPES:
        raise EventError(f"type {kind!r} is not one of {', '.join(TYPES)}")
    if "timestamp" not in data:
        raise EventError("timestamp is missing")
    timestamp = parse_timestamp(data["timestamp"])
    payload = data.get("data")
    if not isinstance(payload, dict):
        raise EventError("data must be an object with at least 'subscriber'")
    sid = payload.get("subscriber")
    if not isinstance(sid, str) or not sid:
        raise EventError("data.subscriber must be the subscriber id (a string)")
    subscriber = None
    if kind in (RESTRICTED, READDRESSED):
        issues: list[ListIssue] = []
        entry = {"id": sid, "addresses": payload.get("addresses"),
                 "mode": payload.get("mode"), "reason": payload.get("reason")}
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

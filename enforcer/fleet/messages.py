"""What travels on the fleet's stream: one input per message, in a small JSON envelope.

``{"v": 1, "kind": ..., "gateway": <who accepted it>, "at": <when, unix seconds>, "body": {...}}``.
Anyone with publish rights on the subject could put bytes there, so a message is read as
strictly as a webhook: a wrong or missing field is a ``MessageError`` naming it, and such a
message changes nothing anywhere (it is counted and skipped, never half-applied).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from typing import Any

from ..events import (
    READDRESSED,
    RESTRICTED,
    SESSION_STARTED,
    SESSION_TYPES,
    TYPES,
    Event,
    EventError,
    event_from_wire,
    event_to_wire,
    parse_timestamp,
)
from ..exemptions import CATEGORIES
from ..subscribers import ListIssue, id_problem, validate_entry

VERSION = 1
EVENT = "event"
#: kind -> {field: types it may have}; every field is required (None where it may be null).
BODIES: dict[str, dict[str, tuple[type, ...]]] = {
    EVENT: {},   # checked by ``event_of``
    "operator": {"id": (str,), "actor": (str,), "subscriber": (str,), "restrict": (bool,), "note": (str,),
                 "mode": (str, type(None)), "addresses": (list, type(None))},
    "exempt": {"actor": (str,), "subscriber": (str,), "category": (str,), "until": (int, float), "note": (str,)},
    "unexempt": {"actor": (str,), "subscriber": (str,), "category": (str, type(None)), "note": (str,)},
    "promise": {"subscriber": (str,), "address": (str,)},
    "acknowledge": {"subscriber": (str,), "address": (str,)},
    "list_approve": {"actor": (str,), "note": (str,), "digest": (str,)},
    "list_reject": {"actor": (str,), "note": (str,), "digest": (str,)},
    "sessions": {"source": (str,), "started": (list,), "stopped": (list,)},   # checked by fleet.sessions
    "session_event": {"source": (str,)},                                      # and by ``event_of``
}
KINDS = tuple(BODIES)


class MessageError(ValueError):
    """A message that is not a valid fleet input; the text names the field."""


@dataclass(frozen=True)
class Message:
    kind: str
    gateway: str
    at: float
    body: dict[str, Any]
    event: Event | None = field(default=None, compare=False)   # of an event/session_event, once read

    def encode(self) -> bytes:
        return json.dumps({"v": VERSION, "kind": self.kind, "gateway": self.gateway, "at": self.at,
                           "body": self.body}, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    try:
        raw = json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MessageError("not a JSON object")
    if raw.get("v") != VERSION:
        raise MessageError(f"v: {raw.get('v')!r} is not version {VERSION} (a newer gateway wrote it?)")
    kind, gateway, at, body = raw.get("kind"), raw.get("gateway"), raw.get("at"), raw.get("body")
    if kind not in BODIES:
        raise MessageError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(gateway, str) or not gateway:
        raise MessageError("gateway: expected the accepting gateway's name")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at <= 0:
        raise MessageError(f"at: {at!r} is not a unix time")
    if not isinstance(body, dict):
        raise MessageError("body: expected an object")
    for name, types in BODIES[kind].items():
        if name not in body:
            raise MessageError(f"body.{name}: missing")
        value = body[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) \
                or (value == "" and name != "note"):
            raise MessageError(f"body.{name}: {value!r} is not valid")
    message = Message(kind, gateway, float(at), body)
    event = _check(message)
    return replace(message, event=event) if event is not None else message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _instant(value: Any, where: str) -> None:
    """A unix time the rest of the program can show and compare (1970..9999), as for webhooks."""
    try:
        parse_timestamp(value if isinstance(value, (int, float)) and not isinstance(value, bool) else None)
    except EventError as exc:
        raise MessageError(f"{where}: {exc}") from None


def _check(message: Message) -> Event | None:
    """What the field types alone do not say; the event of an event message."""
    body = message.body
    if message.kind in (EVENT, "session_event"):
        event = event_of(message)
        if message.kind == "session_event" and (event.type not in SESSION_TYPES or "/" not in body["source"]):
            raise MessageError("body: a session_event is a session.started/stopped of a gateway's source")
        return event
    elif message.kind in ("exempt", "unexempt") and body["category"] is not None and body["category"] not in CATEGORIES:
        raise MessageError(f"body.category: {body['category']!r} is not one of {', '.join(CATEGORIES)}")
    elif message.kind in ("promise", "acknowledge"):
        try:
            ip_address(body["address"])
        except ValueError:
            raise MessageError(f"body.address: {body['address']!r} is not an IP address") from None
    if message.kind == "operator":
        if id_problem(body["subscriber"]) or not body["id"].startswith("op-"):
            raise MessageError(f"body.subscriber/id: {body['subscriber']!r}/{body['id']!r} is not an operator action")
        if body["addresses"] is not None and not all(isinstance(a, str) for a in body["addresses"]):
            raise MessageError("body.addresses: expected a list of addresses")
    if message.kind == "exempt":
        _instant(body["until"], "body.until")
    return None


def _check_event(event: Event) -> None:
    """What ``events.parse_event`` (or the control socket) guarantees of an event of its type."""
    if event.type in SESSION_TYPES:
        if event.subscriber_id and id_problem(event.subscriber_id):
            raise MessageError(f"body.subscriber_id: {id_problem(event.subscriber_id)}")
        if not (event.subscriber_id or event.match):
            raise MessageError("body: a session event names a subscriber or match keys")
        if event.type == SESSION_STARTED and not event.addresses:
            raise MessageError("body.addresses: a session start needs its addresses")
        return
    problem = id_problem(event.subscriber_id)
    if problem:
        raise MessageError(f"body.subscriber_id: {problem}")
    if event.type in (RESTRICTED, READDRESSED):
        if event.subscriber is None or event.subscriber.id != event.subscriber_id:
            raise MessageError(f"body.subscriber: a {event.type} event carries the subscriber's entry")
        issues: list[ListIssue] = []
        if validate_entry(event.subscriber.to_json(), "fleet message", issues) is None:
            raise MessageError("body.subscriber: " + "; ".join(i.message for i in issues))
    elif event.subscriber is not None:
        raise MessageError(f"body.subscriber: a {event.type} event carries no entry")


def event_body(event: Event) -> dict[str, Any]:
    return {**event_to_wire(event), "actor": event.actor}


def event_of(message: Message) -> Event:
    """The event in an ``event`` message, validated as strictly as the list and the webhook."""
    if message.event is not None:
        return message.event
    body = message.body
    try:
        event = event_from_wire(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"body: not an event ({type(exc).__name__}: {exc})") from None
    if not isinstance(event.id, str) or not event.id or event.type not in TYPES:
        raise MessageError(f"body: id {event.id!r} / type {event.type!r} is not a billing event")
    if not isinstance(event.subscriber_id, str):
        raise MessageError("body.subscriber_id: expected a string")
    actor = body.get("actor", "")
    if not isinstance(actor, str) or not isinstance(event.note, str) or len(event.note) > 500:
        raise MessageError("body.actor/note: expected strings (a note of at most 500 characters)")
    _instant(event.timestamp, "body.timestamp")
    if event.until is not None:
        _instant(event.until, "body.until")
    _check_event(event)
    return Event(event.id, event.type, event.timestamp, event.subscriber_id, event.subscriber, actor=actor,
                 note=event.note, until=event.until, match=event.match, addresses=event.addresses,
                 via=message.gateway)

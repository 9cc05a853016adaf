"""Which of billing's events are stale: billing's clock compared only with billing's clock.

Billing retries webhooks, and retries arrive in any order. An event is *stale*, and answered
"ignored" without acting, when billing has already told us something newer about the same
thing, by billing's own timestamps (never by ours: see ``receipt_clock``). Each subscriber has a
few independent streams, and an event is compared only within its stream:

- ``override``: ``subscriber.restricted`` / ``subscriber.released``; a late retry of an older
  one must not undo a newer one;
- ``payment``: a payment is never stale, and it makes every restriction billing stamped at or
  before it stale: payments are often booked after the next export, and a customer who paid
  must not be walled again by a restriction that billing issued before it knew (a tie goes to
  the payment, since billing's timestamps have one-second resolution);
- ``readdress``: address changes among themselves;
- ``exemption:<category>``: dispute/outage openings and closings, per category.

Operator actions are not billing's and are never stale: a person acting now is the newest word.
"""

from __future__ import annotations

from collections.abc import Iterable

from .events import EXEMPTION_CLOSED, EXEMPTION_OPENED, PAYMENT, READDRESSED, RELEASED, RESTRICTED, Event

OVERRIDE = "override"
PAYMENT_STREAM = "payment"
READDRESS = "readdress"


def stream(event: Event) -> str | None:
    """The stream an event is ordered in, or None (operator actions, unknown types)."""
    if event.actor:
        return None
    if event.type in (RESTRICTED, RELEASED):
        return OVERRIDE
    if event.type == PAYMENT:
        return PAYMENT_STREAM
    if event.type == READDRESSED:
        return READDRESS
    category = EXEMPTION_OPENED.get(event.type) or EXEMPTION_CLOSED.get(event.type)
    return f"exemption:{category}" if category else None


class BillingOrder:
    """The newest billing timestamp seen per (subscriber, stream)."""

    def __init__(self, rows: Iterable[tuple[str, str, float]] = ()) -> None:
        self.newest: dict[str, dict[str, float]] = {}
        for sid, name, ts in rows:
            self.newest.setdefault(sid, {})[name] = ts

    def stale(self, event: Event) -> str:
        """Why ``event`` is older than what billing already said, or '' when it is not."""
        name = stream(event)
        if name is None or name == PAYMENT_STREAM:
            return ""
        seen = self.newest.get(event.subscriber_id, {})
        newest = seen.get(name)
        if newest is not None and event.timestamp < newest:
            return f"older than the last {name} event for {event.subscriber_id}; not applied"
        paid = seen.get(PAYMENT_STREAM)
        if event.type == RESTRICTED and paid is not None and event.timestamp <= paid:
            return (f"billing stamped this restriction no later than the payment it already sent for "
                    f"{event.subscriber_id}; not applied")
        return ""

    def record(self, event: Event) -> None:
        """Remember an event being applied (``rows`` gives what to persist)."""
        name = stream(event)
        if name is not None:
            seen = self.newest.setdefault(event.subscriber_id, {})
            seen[name] = max(seen.get(name, event.timestamp), event.timestamp)

    def rows(self, sids: Iterable[str]) -> list[tuple[str, str, float]]:
        """(subscriber, stream, timestamp) rows to persist for these subscribers."""
        return [(sid, name, ts) for sid in dict.fromkeys(sids) for name, ts in self.newest.get(sid, {}).items()]

    def snapshot(self, sid: str) -> dict[str, float] | None:
        seen = self.newest.get(sid)
        return dict(seen) if seen is not None else None

    def restore(self, sid: str, saved: dict[str, float] | None) -> None:
        if saved is None:
            self.newest.pop(sid, None)
        else:
            self.newest[sid] = saved

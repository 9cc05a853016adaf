"""What one event changes in the policy inputs: pure, so the whole rule set can be tested
without a daemon, a kernel or a clock (callers pass the receipt instant ``at``).

A billing webhook and an operator's ``restrict``/``lift`` are the same kind of change (an
override of the list), told apart by ``Origin`` rather than by the text of their cause.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import policy
from .events import EXEMPTION_CLOSED, EXEMPTION_OPENED, PAYMENT, READDRESSED, RELEASED, RESTRICTED, Event
from .exemptions import Exemption
from .policy import Origin, Override, PolicyInputs


@dataclass(frozen=True)
class EventRules:
    """The configured lengths an event needs: the payment grace and an exemption's default term."""

    payment_grace: float
    exemption_default: float


def cause_of(event: Event) -> str:
    """The cause a person reads in ``explain`` and the audit log."""
    via = f" via {event.via}" if event.via else ""
    if event.actor:
        return f"operator {event.actor}{via}: {event.note or 'no reason given'}"
    return f"event {event.id} ({event.type}){via}"


def apply_event(inputs: PolicyInputs, event: Event, at: float, now: float, rules: EventRules) -> bool:
    """Record ``event`` (received at ``at``) in ``inputs``; True when it kept an active promise."""
    sid, cause = event.subscriber_id, cause_of(event)
    origin = Origin.OPERATOR if event.actor else Origin.BILLING
    kept = False
    if event.type == PAYMENT:
        promise = inputs.promise(sid)
        kept = promise is not None and promise.active(now)
        policy.record_payment(inputs, sid, at, rules.payment_grace, cause, at)
    elif event.type == RESTRICTED:
        policy.record_override(inputs, sid, Override(True, at, cause, event.subscriber, origin))
    elif event.type == RELEASED:
        policy.record_override(inputs, sid, Override(False, at, cause, None, origin))
    elif event.type == READDRESSED:
        assert event.subscriber is not None   # parse_event requires addresses for this type
        inputs.readdressed[sid] = policy.Readdress(event.subscriber.addresses, at, cause)
    elif event.type in EXEMPTION_OPENED:
        until = event.until or at + rules.exemption_default
        policy.record_exemption(inputs, sid, Exemption(EXEMPTION_OPENED[event.type], until, event.note,
                                                       f"event {event.id}", at))
    elif event.type in EXEMPTION_CLOSED:
        policy.clear_exemption(inputs, sid, EXEMPTION_CLOSED[event.type])
    return kept

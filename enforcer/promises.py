"""Promise to pay: the customer's own way out, with the rules that keep it honest.

A restricted customer can press "I promise to pay" on the portal page and get their service
back for a short term (say 3 days) while the money travels. Rules: at most ``max_count``
promises per ``period``; none if the last one lapsed unpaid; only for configured reasons
(overdue, yes; fraud or abuse, no); never for an operator's own restriction. Billing hears
of every promise through an outgoing signed webhook so it can book it. Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import Mode

ACTIVE, KEPT, LAPSED, PAID_LATE = "active", "kept", "lapsed", "paid_late"


@dataclass(frozen=True)
class PromiseRules:
    enabled: bool = False
    term: float = 3 * 86400.0
    max_count: int = 1
    period: float = 90 * 86400.0
    reasons: tuple[str, ...] = ("overdue",)    # () = any reason
    webhook_url: str | None = None
    webhook_secret_file: str | None = None


@dataclass(frozen=True)
class Promise:
    subscriber_id: str
    made_at: float
    until: float
    outcome: str = ACTIVE        # active → kept (paid in time) | lapsed (ran out) → paid_late
    address: str = ""            # where the button was pressed (for support)

    def active(self, now: float) -> bool:
        return self.outcome == ACTIVE and now < self.until   # not made_at <= now: see receipt_clock

    def to_json(self) -> dict[str, Any]:
        return {"made_at": self.made_at, "until": self.until, "outcome": self.outcome, "address": self.address}


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    why: str                 # a short reason, shown to support (and as a category to the portal)
    term: float = 0.0


def eligibility(rules: PromiseRules, history: list[Promise], mode: Mode, reason: str,
                operator_restriction: bool, now: float) -> Eligibility:
    """May this subscriber promise to pay now? ``history``: their promises, oldest first."""
    if not rules.enabled:
        return Eligibility(False, "disabled")
    if mode is Mode.FREE:
        return Eligibility(False, "not_restricted")
    if operator_restriction:
        return Eligibility(False, "operator_restriction")
    if rules.reasons and _category(reason) not in {_category(r) for r in rules.reasons}:
        return Eligibility(False, "reason_not_eligible")
    if any(p.active(now) for p in history):
        return Eligibility(False, "promise_active")
    if history and history[-1].outcome == LAPSED:
        return Eligibility(False, "last_promise_lapsed")
    recent = [p for p in history if p.made_at > now - rules.period]
    if len(recent) >= rules.max_count:
        return Eligibility(False, "limit_reached")
    return Eligibility(True, "eligible", rules.term)


def _category(reason: str) -> str:
    """Reasons compare as the portal reads them: case, ``-`` and spaces do not matter."""
    return reason.strip().lower().replace("-", "_").replace(" ", "_")


def settle(history: list[Promise], now: float, paid: bool) -> list[Promise]:
    """Close promises: on a payment the active one is kept and a lapsed one becomes paid late
    (which makes the customer eligible again); past their term, unpaid ones lapse."""
    out = []
    for promise in history:
        if paid and promise.outcome in (ACTIVE, LAPSED):
            outcome = KEPT if promise.outcome == ACTIVE else PAID_LATE
            promise = Promise(promise.subscriber_id, promise.made_at, promise.until, outcome, promise.address)
        elif promise.outcome == ACTIVE and promise.until <= now:
            promise = Promise(promise.subscriber_id, promise.made_at, promise.until, LAPSED, promise.address)
        out.append(promise)
    return out

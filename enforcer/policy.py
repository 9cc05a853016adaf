"""Who should be restricted, and why: a pure function of the inputs and the time.

Inputs are the last good list from billing, per-subscriber overrides (billing events, later
operator actions), and payment graces. The rules, in order:

1. an override is the newest word about a subscriber and wins; it lasts until a newer event,
   or until the list itself changes what it says about that subscriber;
2. a payment lifts at once and, for the grace period, keeps the subscriber free even if the
   list still names them (payments are often booked after the next export);
3. otherwise the list decides; a subscriber absent from it is free.

No I/O and no clock here: callers pass ``now``, so every rule is testable with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterable, Mapping

from .subscribers import Mode, Network, Subscriber

if TYPE_CHECKING:
    from .config import Guard


@dataclass(frozen=True)
class Override:
    """An explicit instruction about one subscriber, newer than the list."""

    restrict: bool
    at: float                       # when it was said (event timestamp, unix seconds)
    cause: str                      # "event <id>", later "operator <user>"
    subscriber: Subscriber | None = None   # addresses/mode when ``restrict``


@dataclass(frozen=True)
class Grace:
    """A payment: free from ``paid_at`` until ``until`` whatever the list says."""

    paid_at: float
    until: float
    cause: str


@dataclass(frozen=True)
class Readdress:
    """Billing says the subscriber's addresses changed: enforce on the new ones from now on."""

    addresses: tuple[Network, ...]
    at: float
    cause: str


@dataclass(frozen=True)
class Decision:
    subscriber_id: str
    mode: Mode
    cause: str
    subscriber: Subscriber | None = None   # set when restricted: what to enforce
    until: float | None = None             # when this decision changes by itself

    @property
    def restricted(self) -> bool:
        return self.mode is not Mode.FREE


def decide(subscriber_id: str, listed: Subscriber | None, override: Override | None,
           grace: Grace | None, now: float, readdress: Readdress | None = None) -> Decision:
    """The mode one subscriber should be in at ``now``."""
    decision = _decide(subscriber_id, listed, override, grace, now)
    if readdress is not None and decision.subscriber is not None:
        moved = replace(decision.subscriber, addresses=readdress.addresses)
        return replace(decision, subscriber=moved, cause=f"{decision.cause}; addresses from {readdress.cause}")
    return decision


def _decide(subscriber_id: str, listed: Subscriber | None, override: Override | None,
            grace: Grace | None, now: float) -> Decision:
    active_grace = grace if grace is not None and grace.paid_at <= now < grace.until else None
    if override is not None and (grace is None or override.at >= grace.paid_at):
        if not override.restrict:
            return Decision(subscriber_id, Mode.FREE, override.cause)
        assert override.subscriber is not None
        return Decision(subscriber_id, override.subscriber.mode, override.cause, override.subscriber)
    if active_grace is not None:
        return Decision(subscriber_id, Mode.FREE, f"payment grace ({active_grace.cause})",
                        until=active_grace.until if listed is not None else None)
    if listed is not None:
        return Decision(subscriber_id, listed.mode, "on the restricted list", listed)
    return Decision(subscriber_id, Mode.FREE, "not on the restricted list")


@dataclass
class PolicyInputs:
    """Everything ``decide`` reads, kept together so the daemon and tests share one shape."""

    listed: dict[str, Subscriber]
    overrides: dict[str, Override]
    graces: dict[str, Grace]
    readdressed: dict[str, Readdress] = field(default_factory=dict)

    def known_ids(self) -> set[str]:
        return set(self.listed) | set(self.overrides) | set(self.graces)

    def decide(self, subscriber_id: str, now: float) -> Decision:
        return decide(subscriber_id, self.listed.get(subscriber_id), self.overrides.get(subscriber_id),
                      self.graces.get(subscriber_id), now, self.readdressed.get(subscriber_id))

    def decide_all(self, now: float) -> dict[str, Decision]:
        return {sid: self.decide(sid, now) for sid in self.known_ids()}

    def next_change(self, now: float) -> float | None:
        """The earliest future instant at which some decision changes without new input."""
        times = [g.until for g in self.graces.values() if g.until > now]
        return min(times) if times else None


def list_changes(old: Mapping[str, Subscriber], new: Mapping[str, Subscriber]) -> set[str]:
    """Ids whose entry the new list adds, removes or alters."""
    changed = {sid for sid in old.keys() ^ new.keys()}
    changed.update(sid for sid in old.keys() & new.keys() if old[sid] != new[sid])
    return changed


def apply_list(inputs: PolicyInputs, new: Mapping[str, Subscriber]) -> set[str]:
    """Install a new list; overrides about subscribers whose entry changed are superseded.

    Returns the ids whose inputs changed (for re-evaluation).
    """
    changed = list_changes(inputs.listed, new)
    for sid in changed:
        inputs.overrides.pop(sid, None)
        inputs.readdressed.pop(sid, None)  # the list's own addresses are the newer word
    inputs.listed = dict(new)
    return changed


def expire(inputs: PolicyInputs, now: float) -> set[str]:
    """Drop graces that ended; returns the ids to re-evaluate."""
    ended = {sid for sid, g in inputs.graces.items() if g.until <= now}
    for sid in ended:
        grace = inputs.graces.pop(sid)
        override = inputs.overrides.get(sid)
        if override is not None and override.at < grace.paid_at:
            del inputs.overrides[sid]  # the payment already superseded it
    return ended


def record_payment(inputs: PolicyInputs, subscriber_id: str, paid_at: float, grace_seconds: float,
                   cause: str, received_at: float | None = None) -> None:
    """A payment supersedes older overrides and opens (or extends) the grace period.

    The grace runs from when we learnt of the payment: a webhook retried for hours must
    still lift the subscriber rather than arrive with its grace already spent.
    """
    override = inputs.overrides.get(subscriber_id)
    if override is not None and override.at <= paid_at:
        del inputs.overrides[subscriber_id]
    previous = inputs.graces.get(subscriber_id)
    until = max(paid_at, received_at if received_at is not None else paid_at) + grace_seconds
    if previous is not None and previous.until > until:
        until = previous.until
    inputs.graces[subscriber_id] = Grace(paid_at, until, cause)


def record_override(inputs: PolicyInputs, subscriber_id: str, override: Override) -> None:
    inputs.overrides[subscriber_id] = override


def restricted_ids(decisions: Iterable[Decision]) -> set[str]:
    return {d.subscriber_id for d in decisions if d.restricted}


def preview_list(inputs: PolicyInputs, new: Mapping[str, Subscriber], now: float) -> tuple[int, int]:
    """How many subscribers a new list would newly restrict and newly free, without applying it."""
    restricting = lifting = 0
    for sid in list_changes(inputs.listed, new):
        before = inputs.decide(sid, now).restricted
        after = decide(sid, new.get(sid), None, inputs.graces.get(sid), now).restricted
        restricting += after and not before
        lifting += before and not after
    return restricting, lifting


def guard_reason(restricting: int, lifting: int, restricted_now: int, guard: "Guard") -> str:
    """Why a list change must wait for an operator, or '' if it may go ahead."""
    reasons = []
    if restricting > guard.max_restrict and restricting > guard.max_restrict_share * restricted_now:
        reasons.append(f"it would restrict {restricting} subscribers at once (limits: {guard.max_restrict} and "
                       f"{guard.max_restrict_share:.0%} of the {restricted_now} restricted now)")
    if lifting > guard.max_lift and lifting > guard.max_lift_share * restricted_now:
        reasons.append(f"it would lift {lifting} subscribers at once (limits: {guard.max_lift} and "
                       f"{guard.max_lift_share:.0%} of the {restricted_now} restricted now)")
    return "; ".join(reasons)

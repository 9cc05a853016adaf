"""The mass-change guard: when a new list restricts or lifts so many subscribers at once that an
operator must approve it first (docs/reference.md, Configuration: ``subscribers.guard``).

Its own module because both the config reader (which builds a ``Guard`` from
``subscribers.guard``) and the list intake (which asks ``guard_reason``) need it, and neither
may import the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Guard:
    """Hold a new list that would restrict or lift too many subscribers at once.

    A change is held when it exceeds *both* the count and the share of those restricted now,
    so small deployments are not held for ten changes and large ones not for 101. The first
    list on an empty gateway that restricts more than ``max_restrict`` is held too: approve it
    once with ``walled-garden approve``.
    """

    max_restrict: int = 100
    max_restrict_share: float = 0.25
    max_lift: int = 100
    max_lift_share: float = 0.25


def guard_reason(restricting: int, lifting: int, restricted_now: int, guard: Guard) -> str:
    """Why a list change must wait for an operator, or '' if it may go ahead."""
    reasons = []
    if restricting > guard.max_restrict and restricting > guard.max_restrict_share * restricted_now:
        reasons.append(f"it would restrict {restricting} subscribers at once, prefixes weighed by the space they "
                       f"cover (limits: {guard.max_restrict} and "
                       f"{guard.max_restrict_share:.0%} of the {restricted_now} restricted now)")
    if lifting > guard.max_lift and lifting > guard.max_lift_share * restricted_now:
        reasons.append(f"it would lift {lifting} subscribers at once (limits: {guard.max_lift} and "
                       f"{guard.max_lift_share:.0%} of the {restricted_now} restricted now)")
    return "; ".join(reasons)

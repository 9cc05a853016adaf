"""What the kernel enforces, as the rest of the daemon sees it: counts per mode, restrictions
waiting for a window, and the rows of the ``enforced`` table (status, audit, restarts).

Kept incrementally (O(changed) per write) because a webhook batch touches a few subscribers
out of 100k; only a full sync recounts, and even then it writes only the rows that changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .audit import audit_rows
from .model import Mode, Network
from .policy import Decision
from .store import EnforcedWrite, Store


def held(decision: Decision) -> tuple[Network, ...]:
    """The networks a decision puts in the kernel (none when free)."""
    if decision.restricted and decision.subscriber is not None:
        return decision.subscriber.addresses
    return ()


def enforced_row(decision: Decision) -> tuple[str, list[str], str]:
    """A restricted decision as an ``enforced`` table row: (mode, addresses, reason)."""
    assert decision.subscriber is not None
    return decision.mode.value, decision.subscriber.address_texts(), decision.subscriber.reason


class EnforcedRecord:
    """Counts per mode and the set waiting for a window, kept with each write."""

    def __init__(self) -> None:
        self.mode_counts: dict[Mode, int] = {}
        self.waiting: set[str] = set()   # restrictions held until the enforcement window opens

    def recount(self, decisions: Mapping[str, Decision]) -> None:
        self.mode_counts = {}
        for decision in decisions.values():
            if decision.restricted:
                self.mode_counts[decision.mode] = self.mode_counts.get(decision.mode, 0) + 1
        self.waiting = {sid for sid, d in decisions.items() if d.pending is not None}

    def full(self, store: Store, decisions: Mapping[str, Decision], previous: Mapping[str, Decision],
             now: float) -> EnforcedWrite:
        """After a full sync: recount, and the rows that changed (a 1 % churn must not rewrite 100k)."""
        self.recount(decisions)
        if previous:
            changed = {sid: d for sid, d in decisions.items() if previous.get(sid) != d}
            gone = {sid for sid, d in previous.items() if d.restricted and not (sid in decisions and
                                                                             decisions[sid].restricted)}
        else:
            changed = dict(decisions)
            gone = set(store.enforced()) - set(decisions)
        return self._write(changed, gone, previous, now, "")

    def partial(self, decisions: Mapping[str, Decision], previous: Mapping[str, Decision], now: float,
                note: str) -> EnforcedWrite:
        """After a diff: adjust the counts by what these decisions replaced."""
        for sid, decision in decisions.items():
            old = previous.get(sid)
            if old is not None and old.restricted:
                self.mode_counts[old.mode] -= 1
            if decision.restricted:
                self.mode_counts[decision.mode] = self.mode_counts.get(decision.mode, 0) + 1
        self.waiting.difference_update(decisions)
        self.waiting.update(sid for sid, d in decisions.items() if d.pending is not None)
        return self._write(decisions, set(), previous, now, note)

    @staticmethod
    def _write(changed: Mapping[str, Decision], gone: Iterable[str], previous: Mapping[str, Decision],
               now: float, note: str) -> EnforcedWrite:
        rows = {sid: enforced_row(d) for sid, d in changed.items() if d.restricted and d.subscriber}
        removed = set(gone) | {sid for sid, d in changed.items() if not d.restricted}
        return EnforcedWrite(rows, removed, audit_rows(dict(previous), dict(changed), now, note))

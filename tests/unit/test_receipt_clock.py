"""``ReceiptClock.stamp`` with an instant from another gateway of the fleet."""

from __future__ import annotations

from enforcer.receipt_clock import TICK, ReceiptClock


def test_an_instant_from_another_gateway_counts_at_most_as_now() -> None:
    """A fleet message's ``at``: earlier is kept (catching up), later counts as now (a fast clock elsewhere)."""
    clock = ReceiptClock(lambda: 1000.0, monotonic=lambda: 0.0)
    assert clock.stamp(900.0) == 900.0
    assert clock.stamp(5000.0) == 1000.0
    assert clock.stamp(950.0) == 1000.0 + TICK   # never backwards

"""When the gateway received an input: one ordering for everything, whatever the clocks do.

Inputs about a subscriber (billing events, operator actions, promises, exemptions) are weighed
against each other by *when this gateway received them*, never by billing's timestamps: billing
may run a minute ahead or behind (the signature tolerance is five minutes), and comparing its
clock with ours is what once let a restriction stamped "later" beat the payment that followed
it. Receipt instants come from ``ReceiptClock.stamp``: wall-clock seconds (they are shown to
people and persisted) that never repeat and never go backwards, even when the gateway's clock
is stepped back; the floor is the newest instant already stored, so a restart after a step back
keeps the order too.

A step *forward* cannot be undone by ordering: every grace or promise would end early by the
size of the step (a router that boots with a stale clock and then syncs NTP would re-restrict
paid subscribers). ``ReceiptClock.step`` compares the wall clock with the monotonic clock and
reports such a step, so the daemon can push the ends of durations that run from receipt
(payment graces, promises) forward by the same amount. Backward steps need nothing: an end
in the future stays in the future (freedom lasts longer, never shorter).

The anchor (a wall and a monotonic reading taken together) is kept with the state, with this
boot's id: a restart on the same boot (the monotonic clock runs on) then sees a step that
happened while the daemon was idle or down, which a fresh anchor would miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Receipt instants are at least this far apart, so no two inputs ever share one.
TICK = 1e-6
#: A disagreement between wall and monotonic clock above this is a step, not drift.
STEP_THRESHOLD = 2.0


class ReceiptClock:
    def __init__(self, clock: Callable[[], float] = time.time, floor: float = 0.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self.last = floor
        self._anchor = (clock(), monotonic())

    def stamp(self, at: float | None = None) -> float:
        """A receipt instant for one input: now, but after every instant handed out before.

        ``at``: when the gateway of the fleet that accepted it received it. A gateway catching up
        then starts a payment's grace when the payment came, not when it heard of it (an old
        grace must not free someone the list restricted since); an ``at`` ahead of this clock
        (the other gateway's clock runs fast) counts as now, so it cannot push this floor ahead."""
        now = self.clock()
        self.last = max(now if at is None else min(at, now), self.last + TICK)
        return self.last

    @property
    def floor(self) -> float:
        """The newest receipt instant handed out or stored: every later ``stamp`` sorts after it.

        Reading it stamps nothing and raises nothing. For an input that stands for one received
        at some unknown earlier time (a payment grace given by the rebuild after a lost state):
        ordered before every input to come, without pushing theirs to now, as a ``stamp`` would
        (a fleet's stream replayed after it would count each old input as received now)."""
        return self.last

    def step(self) -> float:
        """Seconds the wall clock jumped forward since the last call (0 when it did not)."""
        wall, mono, jump = self._jump()
        self._anchor = (wall, mono)
        return jump

    def unstepped(self) -> float:
        """The wall clock as it would read had it not jumped forward since the last ``step``
        (a step not yet taken up): what an operation already under way decides at, the ends it
        weighs not yet moved by the step. Without such a jump, the wall clock itself."""
        wall, _, jump = self._jump()
        return wall - jump

    def _jump(self) -> tuple[float, float, float]:
        """(wall, monotonic, forward jump since the anchor or 0) read now."""
        wall, mono = self.clock(), self.monotonic()
        then_wall, then_mono = self._anchor
        jump = (wall - then_wall) - (mono - then_mono)
        return wall, mono, jump if jump > STEP_THRESHOLD else 0.0

    def resume(self, wall: float, mono: float) -> None:
        """Continue from an anchor saved earlier on this boot (the next ``step`` reports any
        jump since it)."""
        self._anchor = (wall, mono)

    @property
    def anchor(self) -> tuple[float, float]:
        """(wall, monotonic) of the last check: saved with the state, for ``resume``."""
        return self._anchor

    def stepped_back(self) -> float:
        """How far the wall clock is behind the newest receipt instant (for status and logs)."""
        return max(self.last - self.clock(), 0.0)


def boot_id() -> str:
    """This boot's id (the monotonic clock is comparable only within one boot), or ''."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""

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

In a fleet (SPEC §11) an input carries ``at``, when the gateway that accepted it received it,
and every gateway applies the stream in its order. Each stream input is stamped
``max(min(at, now), newest stream instant + TICK)``: its own instant, kept when a gateway
applies it hours later (catching up after being down, or rebuilt after a lost state), so an old
payment's grace is old there too; an ``at`` ahead of this clock counts as now. The floor is kept
among the stream's inputs, also while catching up, rather than stamping ``min(at, now)`` alone:
two inputs accepted on two gateways whose clocks differ (or on one whose clock was stepped back)
can carry instants in the other order than the stream's, and every gateway following live floors
them into the stream's order; a gateway catching up without the floor would weigh them the
other way round (a payment before the restriction it followed) and decide otherwise.

What must not floor a stream input is an instant taken *here*, for an input of this gateway's
own (``stamp()`` without ``at``): it is now, and a gateway catching up would otherwise stamp
every input replayed after it now+TICK (each old payment a fresh grace while the other gateways
wall the subscriber; each old promise restarted, its webhook-id changed). So there are two
floors. A local stamp follows every instant handed out or stored (the step-back guarantee, as
on a lone gateway); a stream input follows the stream's inputs and the saved state, and is
put after the local instants only when it is not older than the first of them (then it
follows them all: instants never repeat); older, it keeps its instant and the local input,
received now, stays the newer word. In a fleet no input should take a local instant at
all: every door publishes to the stream, and code that records nothing takes none (a lease
file re-read that changes nothing, the lease expiry duty); the second floor is what keeps one
that slips in from moving everyone else's. On a lone gateway nothing carries ``at`` and the
clock is a single floor, as before.

A notice acknowledgement and a list verdict from the stream take no receipt instant (nothing is
weighed against them), but what they last runs from the same ``min(at, now)``: applied hours
later, an acknowledgement has ended there as it has everywhere else, and a verdict is as old.
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
        self.last = floor          # the newest instant handed out or stored
        self.streamed = floor      # the newest given to an input that carried ``at``, or stored
        self._local: float | None = None   # the first local instant after ``streamed``, if any
        self._anchor = (clock(), monotonic())

    def stamp(self, at: float | None = None) -> float:
        """A receipt instant for one input. Take it only for an input that records it: a stamp
        moves the floors.

        Without ``at`` (received here): now, but after every instant handed out or stored.

        ``at``: when the gateway of the fleet that accepted it received it. A gateway catching up
        then starts a payment's grace when the payment came, not when it heard of it (an old
        grace must not free someone the list restricted since); an ``at`` ahead of this clock
        (the other gateway's clock runs fast) counts as now, so it cannot push a floor ahead.
        Never before a stream input or saved instant already handed out; before the local
        instants taken since, when older than all of them (see the module docstring)."""
        now = self.clock()
        if at is None:
            self.last = max(now, self.last + TICK)
            if self._local is None:
                self._local = self.last
            return self.last
        instant = max(min(at, now), self.streamed + TICK)
        if self._local is not None and instant >= self._local:
            instant = max(instant, self.last + TICK)   # after every local one: no instant twice
        self.streamed = instant
        if instant > self.last:
            self.last, self._local = instant, None
        return instant

    @property
    def floor(self) -> float:
        """Every later ``stamp`` sorts after it: the newest instant of the stream's inputs and
        the saved state (on a lone gateway, the saved state's).

        Reading it stamps nothing and raises nothing. For an input that stands for one received
        at some unknown earlier time (a payment grace given by the rebuild after a lost state):
        ordered before every input to come, without pushing theirs to now, as a ``stamp`` would
        (a fleet's stream replayed after it would count each old input as received now)."""
        return self.streamed

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

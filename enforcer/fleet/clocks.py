"""How far each gateway's clock is from the fleet's NATS: the hazard of a skewed clock, made visible.

Why: every input carries the accepting gateway's instant ``at``, and each gateway ends graces by
its own clock, so a gateway whose clock runs ahead of the accepting one's by more than a payment
grace ends that grace as soon as it applies it. This does not correct clocks; it shows them, since
NATS stamps every message it stores with one clock (the stream leader's):

- an input's ``at`` minus its stored stamp is the accepting gateway's offset less the publish
  latency (milliseconds), whenever it is applied: a catch-up reads the origin's clock of then;
- this gateway's clock when an input reaches it live, minus the stored stamp, is its own offset
  plus the delivery latency. "Live" cannot be judged by this gateway's clock (the one in doubt),
  so the applier judges it by what NATS and the event loop say (``Applier._live``).

Latency only ever pushes the first measure down and the second up, so each estimate is the least
delayed sample of the last one to two minutes: a slow publish or a stalled loop does not read as a
skew while inputs flow (a lone sample in a quiet fleet stands until the next). Inputs replayed in
a catch-up, applied in stream order, each replace the estimate: the newest of the history stands.

What it cannot tell: offsets against NATS, not true time (a NATS with a wrong clock shows every
gateway off alike: harmless between gateways, yet a sign to check NATS); in a NATS cluster the
stream's leader stamps, so a leader moving to a node whose clock differs shifts every estimate
alike; another gateway is measured only when it accepts inputs, this one only while inputs
arrive live; it is precise to seconds, not milliseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..metrics import Metrics

log = logging.getLogger("walled_garden.enforcer")
#: Samples are kept per window of this length; an estimate is the best of this one and the last.
WINDOW = 60.0
#: An offset beyond this is warned about (the alert WalledGardenFleetClockSkew uses the same).
WARN = 30.0
#: At most one warning per origin this often while its offset stays beyond ``WARN``.
WARN_EVERY = 600.0
#: Origins tracked at most (the heartbeat read also drops gateways no longer in the fleet): the
#: name in a message is whatever its publisher wrote, and must not grow the metrics without end.
MAX_ORIGINS = 256


@dataclass
class _Estimate:
    """One origin's samples, as ``sign * offset`` so that the least delayed is the largest."""

    sign: float
    start: float           # when the current window began (monotonic)
    best: float            # the current window's least delayed sample
    previous: float | None = None   # the window before it, when it directly preceded
    last: float = 0.0      # when the last sample came (monotonic)
    warned: float | None = None     # when its skew was last warned about (monotonic)

    def add(self, value: float, now: float) -> None:
        value *= self.sign
        if now - self.start >= WINDOW:
            self.previous = self.best if now - self.start < 2 * WINDOW else None
            self.start, self.best = now, value
        else:
            self.best = max(self.best, value)
        self.last = now

    @property
    def offset(self) -> float:
        best = self.best if self.previous is None else max(self.best, self.previous)
        return self.sign * best


class ClockOffsets:
    """Each origin gateway's clock offset against NATS, for the metric, ``status`` and the log."""

    def __init__(self, gateway: str, metrics: Metrics, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.gateway, self.metrics, self.monotonic = gateway, metrics, monotonic
        self.estimates: dict[str, _Estimate] = {}

    def accepted(self, origin: str, at: float, stored: float, replayed: bool = False) -> None:
        """An input ``origin`` accepted at ``at`` (its clock), stored at ``stored`` (NATS's).
        ``replayed``: stored before this gateway connected (a catch-up, in stream order): it
        replaces the estimate instead of joining the minute's samples, so the newest of a
        history that spans a clock fixed since is what stays. This gateway's own inputs are
        left to ``live`` (the two measures are biased oppositely)."""
        if origin != self.gateway:
            self._add(origin, at - stored, 1.0, replayed)

    def live(self, now: float, stored: float) -> None:
        """An input stored at ``stored`` reached this gateway live, at ``now`` by its clock."""
        self._add(self.gateway, now - stored, -1.0)

    def _add(self, origin: str, offset: float, sign: float, alone: bool = False) -> None:
        now = self.monotonic()
        estimate = self.estimates.get(origin)
        if estimate is None and len(self.estimates) >= MAX_ORIGINS:   # the least recently measured goes
            others = [name for name in self.estimates if name != self.gateway]   # (never this gateway)
            if others:
                self._drop(min(others, key=lambda name: self.estimates[name].last))
        if estimate is None or alone:
            warned = estimate.warned if estimate is not None else None
            estimate = self.estimates[origin] = _Estimate(sign, now, sign * offset, last=now, warned=warned)
        else:
            estimate.add(offset, now)
        value = estimate.offset
        self.metrics.fleet_clock_offset.labels(origin).set(value)
        self._warn(origin, estimate, value, now)

    def _warn(self, origin: str, estimate: _Estimate, value: float, now: float) -> None:
        if abs(value) <= WARN:
            if estimate.warned is not None:
                log.info("event=fleet_clock_offset_ok origin=%s offset=%+.1fs", origin, value)
                estimate.warned = None
            return
        if estimate.warned is not None and now - estimate.warned < WARN_EVERY:
            return
        estimate.warned = now
        whose = "this gateway's" if origin == self.gateway else f"gateway {origin}'s"
        log.warning("event=fleet_clock_skew origin=%s offset=%+.1fs (%s clock is %.0f s %s the fleet's NATS: a "
                    "gateway whose clock runs ahead of the one that accepted a payment by more than its grace ends "
                    "that grace at once; synchronise every gateway's clock, see docs/operations.md)",
                    origin, value, whose, abs(value), "ahead of" if value > 0 else "behind")

    def retain(self, gateways: Iterable[str]) -> None:
        """Forget origins that are not in the fleet any more (no heartbeat key); this gateway stays."""
        keep = {*gateways, self.gateway}
        for origin in [name for name in self.estimates if name not in keep]:
            self._drop(origin)

    def _drop(self, origin: str) -> None:
        del self.estimates[origin]
        try:
            self.metrics.fleet_clock_offset.remove(origin)
        except KeyError:
            pass

    def view(self) -> dict[str, dict[str, Any]]:
        """``{origin: {offset_seconds, measured_seconds_ago}}`` for ``status``, by name."""
        now = self.monotonic()
        return {origin: {"offset_seconds": round(estimate.offset, 1),
                         "measured_seconds_ago": round(max(now - estimate.last, 0.0))}
                for origin, estimate in sorted(self.estimates.items())}

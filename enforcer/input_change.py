"""One subscriber's inputs changed by a person or the portal (an exemption, a promise to pay):
decided, applied, saved and audited as one step, or not at all.

Shared by ``operator_actions`` and ``portal_actions``; billing's events take the batched path
(``event_intake``) instead. Not durable means not done: if the state cannot be saved, the
kernel change is undone and the caller is told to retry.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable

from .audit import state as audit_state
from .dataplane.backend import DataplaneError
from .engine import Engine
from .model import Mode
from .outcome import Outcome, Refusal, Refused, Result
from .policy import Decision
from .reconciler import AddressConflict
from .store import EnforcedWrite, StoreError

log = logging.getLogger("walled_garden.enforcer")


async def change_inputs(engine: Engine, sid: str, change: Callable[[float], object], note: str,
                        at: float | None = None) -> Result:
    """Apply ``change(receipt instant)`` to ``sid``'s inputs: decide, commit, persist, audit, flush.
    ``change`` may raise to refuse (under the lock, nothing changed yet); what it returns is ignored.
    ``at``: the receipt instant another gateway of the fleet gave the change (default: now)."""
    async with engine.lock:
        now = engine.now()
        saved = engine.save(sid)
        change(engine.receipts.stamp(at))   # the change is ordered by its receipt (receipt_clock)
        previous = engine.decisions.get(sid)
        decision = engine.inputs.decide(sid, now, previous)
        writes: list[EnforcedWrite] = []
        try:
            result = await engine.apply({sid: decision}, note, deferred=writes)
        except (DataplaneError, AddressConflict) as exc:
            engine.undo(sid, saved)
            kind = Refused.UNAVAILABLE if isinstance(exc, DataplaneError) else Refused.CONFLICT
            return Refusal(kind, str(exc))
        if audit_state(previous) == audit_state(decision):   # no mode change: record the action itself
            writes.append(EnforcedWrite(audit=[(now, sid, audit_state(decision), audit_state(decision), note)]))
        try:
            await asyncio.to_thread(engine.store.record_state, writes, engine.inputs, [sid])
        except (StoreError, sqlite3.Error) as exc:   # not durable, so not done: back as it was
            log.error("event=change_not_saved subscriber=%s error=%s kernel_change=undone", sid, str(exc))
            engine.undo(sid, saved)
            try:
                await engine.apply({sid: previous or Decision(sid, Mode.FREE, "not enforced")}, deferred=[])
            except (DataplaneError, AddressConflict):
                engine.reconciler.needs_full = True
                engine.changed.set()
            return Refusal(Refused.UNAVAILABLE, f"state could not be saved, retry later: {exc}")
        engine.metrics.exemptions.set(sum(len(e) for e in engine.inputs.exemptions.values()))
        engine.changed.set()
    await engine.flusher.flush(result.changed, note)
    return Outcome({"subscriber": sid, "mode": decision.mode.value, "cause": decision.cause,
                    "until": decision.until, "pending": decision.pending.value if decision.pending else None})

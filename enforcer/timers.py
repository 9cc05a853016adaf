"""Time passing: graces, promises and exemptions end at their instant, restrictions start
when the enforcement window opens, the escalation ladder climbs, and the kernel table is
repaired after a failed sync.

One loop sleeps until the next instant anything changes (``PolicyInputs.next_change``),
woken early by ``Engine.changed``; components add their own periodic duties to the engine
(``Engine.duties``), each saying when it wants to run again.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from . import policy
from .dataplane.backend import DataplaneError
from .engine import Engine
from .metrics import Metrics
from .store import StoreError

log = logging.getLogger("walled_garden.enforcer")

#: Seconds between attempts to repair the kernel table after a failed sync.
RESYNC_SECONDS = 2.0
#: How often processed webhook ids older than their retention are dropped.
PRUNE_SECONDS = 3600.0
#: How often decisions held back by an address conflict are tried again.
CONFLICT_RETRY_SECONDS = 60.0
#: How often the escalation ladder is checked (O(list); steps are days apart anyway).
ESCALATION_SECONDS = 300.0


class Timers:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self._escalated = 0.0
        self._expired_to: float | None = None   # list entries' exemption ends up to here are enforced
        self._pruned = time.monotonic()
        metrics.exemptions.set(sum(len(e) for e in engine.inputs.exemptions.values()))

    def _wait(self) -> float:
        engine = self.engine
        now = engine.clock()
        due = engine.inputs.next_change(now, waiting=bool(engine.record.waiting))
        if engine.inputs.rules.escalation:
            check = self._escalated + ESCALATION_SECONDS
            due = min(due, check) if due else check
        if engine.reconciler.needs_full or engine.clock_unsaved:   # a repair, or moved graces to save
            return RESYNC_SECONDS
        if engine.inputs.ended_unexpired(now):     # e.g. found ended at a start: expire and save it now
            return 0.0
        wait = min(due - now if due else PRUNE_SECONDS, PRUNE_SECONDS)
        if engine.conflicts:
            wait = min(wait, CONFLICT_RETRY_SECONDS)
        return min([wait, *(due for duty in engine.duties if (due := duty.due()) is not None)])

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            wait = self._wait()
            self.engine.changed.clear()
            stopper = asyncio.ensure_future(stop.wait())
            changed = asyncio.ensure_future(self.engine.changed.wait())
            await asyncio.wait({stopper, changed}, timeout=max(wait, 0.0), return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            changed.cancel()
            if stop.is_set():
                return
            try:
                await self.tick()
            except DataplaneError:
                pass  # logged and counted; retried on the next round
            await self.run_duties()

    async def run_duties(self) -> None:
        for duty in list(self.engine.duties):
            if duty.due() is not None:
                await duty.run()

    async def tick(self) -> None:
        engine = self.engine
        async with engine.lock:
            if time.monotonic() - self._pruned > PRUNE_SECONDS:
                self._prune()
            now = engine.now()     # first: saves what is pending (sync_all leaves that to us)
            if engine.reconciler.needs_full:   # a repair: a replace puts back the acknowledgements too
                await engine.sync_all(read_kernel=True)
                return
            lapsing = sum(1 for h in engine.inputs.promises.values()
                          if h and h[-1].outcome == "active" and h[-1].until <= now)
            since = self._expired_to if self._expired_to is not None and self._expired_to <= now else None
            expired = policy.expire(engine.inputs, now, since)
            self.metrics.promises.labels("lapsed").inc(lapsing)
            waiting = engine.record.waiting
            opened = set(waiting) if waiting and engine.inputs.rules.windows.is_open(now) else set()
            escalating: set[str] = set()
            if engine.inputs.rules.escalation and now >= self._escalated + ESCALATION_SECONDS:
                self._escalated = now
                escalating = policy.escalation_due(engine.inputs, now, engine.decisions)
            todo = expired | opened | escalating | set(engine.conflicts)
            if not todo:
                self._expired_to = now
                return
            if expired:
                try:
                    await asyncio.to_thread(engine.store.save_subscribers, engine.inputs, expired)
                except (StoreError, sqlite3.Error) as exc:   # what ended is gone from memory: enforce it
                    # Enforced anyway, and saved again by the next round (``Engine.save_later``):
                    # a restart before that ends them again from their saved ends, but only
                    # while the clock has not stepped back past them, so the save must follow.
                    engine.save_later(expired)
                    log.error("event=expiry_not_saved count=%d error=%s enforced=yes retry=next_round",
                              len(expired), exc)
            result = await engine.apply_resolving(engine.decide(todo, now), "policy timer")
            self._expired_to = now     # only once applied: a failed round finds them again
            self.metrics.exemptions.set(sum(len(e) for e in engine.inputs.exemptions.values()))
        log.info("event=policy_timer expired=%d window_opened=%d escalated=%d changed_networks=%d", len(expired),
                 len(opened), len(escalating), len(result.changed))
        await engine.flusher.flush(result.changed, "policy timer")

    def _prune(self) -> None:
        engine = self.engine
        self._pruned = time.monotonic()
        pruned = engine.store.prune_events()
        if pruned:
            log.info("event=webhook_ids_pruned count=%d", pruned)
        aged = engine.store.prune_audit(engine.clock() - engine.config.policy.audit_retention)
        if aged:
            log.info("event=audit_rows_pruned count=%d", aged)

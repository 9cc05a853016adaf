"""The restricted list coming in: the mass-change guard, saving, and applying what changed.

A list is in force only once it is saved (a list that cannot be saved is reported and
retried by the timer, nothing of it enforced), and only if the guard lets it through: a
list that would restrict or lift more than the configured share at once is held until an
operator approves or rejects it (an export gone wrong must not wall in half the town).
The first list after the state was lost also rebuilds enforcement from the kernel.

In a fleet every gateway reads the list itself (the same source gives the same list) and an
operator's approval or rejection travels through the fleet's stream (``relay``) with the held
list's content digest: it applies on every gateway holding that list, or reading it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import policy
from .dataplane.backend import DataplaneError
from .dataplane.layout import mode_map, mode_prefix
from .engine import PENDING_LIST, Engine
from .guard import guard_reason
from .metrics import Metrics
from .outcome import Outcome, Refusal, Refused, Result
from .reconciler import AddressConflict
from .relay import Relay
from .sources import ListUpdate, SourceFailure, redact_url
from .store import StoreError
from .subscribers import Subscriber, key_text

log = logging.getLogger("walled_garden.enforcer")
#: Seconds between attempts to save a list whose saving failed.
RETRY_SECONDS = 2.0
#: Longest a first list's save waits for the start to finish (``ListIntake.started``).
START_WAIT = 5.0
#: Who a held list's approval or rejection is filed under in the audit log.
AUDIT_SUBJECT = "(list)"
#: Fleet verdicts remembered (saved) for lists this gateway has not read yet, for so many days.
VERDICTS = "list_verdicts"
VERDICT_DAYS = 1
KEPT_VERDICTS = 16
#: Addresses a rebuild after a lost state lifted that ``status`` and the log name (the count is whole).
REBUILT_KEYS_SHOWN = 20


def list_digest(subscribers: list[Subscriber]) -> str:
    """The same list read by two gateways has the same digest, whatever the file's order."""
    entries = sorted(json.dumps(s.to_json(), sort_keys=True) for s in subscribers)
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _meta(update: ListUpdate, entries: int, now: float) -> dict[str, Any]:
    """The list in force's record (``status``: ``list_in_force``), saved with it."""
    return {"origin": update.origin, "loaded_at": now, "entries": entries, "fingerprint": update.fingerprint,
            "digest": update.digest}


def _undo(inputs: policy.PolicyInputs, changes: set[str]) -> list[policy.Snapshot]:
    """What ``policy.apply_list`` may take from the inputs of ``changes`` (their overrides and
    readdresses), to put back when the list cannot be saved (a snapshot of each of 100k
    subscribers with nothing to put back cost ~1 s of a first list)."""
    return [inputs.snapshot(sid) for sid in changes if sid in inputs.overrides or sid in inputs.readdressed]


@dataclass
class HeldChange:
    """A list the mass-change guard stopped; applied only by ``walled-garden approve``."""

    update: ListUpdate
    restricting: int
    lifting: int
    since: float
    why: str
    digest: str = ""   # ``list_digest``: what a fleet's approval names


class ListIntake:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.held: HeldChange | None = None
        self.unsaved: ListUpdate | None = None   # a list whose saving failed, retried by the timer
        self.unsaved_approval = ""
        self.session_owners: set[str] = set()   # owners of sessions the last list moved (``_save``)
        #: Set once a list handed over is in the kernel (a first list: before its save) or done with.
        self.enforced = asyncio.Event()
        #: Clear while the service starts (``Service.start``): a first list's save waits for it,
        #: at most ``START_WAIT`` s, so the start's last steps are not slowed by the save's thread
        #: (their turns of the interpreter lock, ~0.3 s behind a 100k save, measured).
        self.started = asyncio.Event()
        self.started.set()
        meta = engine.store.get_meta("list")
        self.list_status: dict[str, Any] = meta if isinstance(meta, dict) else {}
        self.source_error: dict[str, Any] | None = None
        self.relay: Relay | None = None   # the fleet's stream, when the gateway is one of a fleet
        # digest -> (approved, by, when): the fleet decided before this gateway read that list; saved,
        # so a restart in between does not hold here a list the others enforce
        saved = engine.store.get_meta(VERDICTS)
        self.verdicts: dict[str, tuple[bool, str, float]] = {
            d: (bool(v[0]), str(v[1]), float(v[2])) for d, v in (saved.items() if isinstance(saved, dict) else ())
            if isinstance(v, list) and len(v) == 3}
        engine.duties.append(self)   # the retry of an unsaved list (``due``/``run``)
        engine.reports.update(source=self._source_report, held_changes=self._held_report)
        metrics.list_entries.set(len(engine.inputs.listed))
        loaded = float(self.list_status.get("loaded_at") or 0.0)
        if loaded:  # the list in force was read and accepted then, before this start
            metrics.source_success.set(loaded)
        metrics.list_age.set_function(lambda: metrics.age(self.list_status.get("loaded_at"), engine.clock()))
        metrics.held_subscribers.labels("restrict").set_function(lambda: self.held.restricting if self.held else 0)
        metrics.held_subscribers.labels("lift").set_function(lambda: self.held.lifting if self.held else 0)

    async def on_list(self, update: ListUpdate, approved_by: str = "") -> None:
        new = {s.id: s for s in update.subscribers}
        try:
            async with self.engine.lock:
                self.engine.now()      # an operation's start: a clock step is taken up, pending saves run
                await self._take(update, new, approved_by)
        finally:
            self.enforced.set()

    async def _take(self, update: ListUpdate, new: dict[str, Subscriber], approved_by: str) -> None:
        """``on_list`` under the engine's lock."""
        engine = self.engine
        if engine.rebuilding is not None:
            approved_by = self._rebuild(new, update.digest, approved_by)
        if not approved_by:
            restricting, lifting = policy.preview_list(engine.inputs, new, engine.clock())
            restricted_now = sum(policy.weight(d.subscriber) for d in engine.decisions.values() if d.restricted)
            weighed = self._weigh(update, restricting, lifting, restricted_now)
            if weighed is None:   # read and judged (held for an operator, or rejected): the source works
                self.metrics.source_success.set(engine.clock())
                return
            approved_by = weighed
        if approved_by:
            log.warning("event=list_approved by=%s origin=%s entries=%d", approved_by, update.origin, len(new))
        if engine.rebuild_unsaved:   # another list than the one being saved, let through by the guard
            engine.rebuilding, engine.rebuild_unsaved = None, False
        self.held = None
        self.metrics.held_changes.set(0)
        if self._first() and await self._enforce_first(update, new, approved_by):
            return
        changed = await self._save(update, new, approved_by)
        if changed is None:
            return
        try:
            await self._apply(changed | self.session_owners, update.origin)
        except DataplaneError:
            engine.changed.set()  # the repair loop retries

    def _weigh(self, update: ListUpdate, restricting: int, lifting: int, restricted_now: int) -> str | None:
        """The mass-change guard's word on a list: "" (go ahead), who approved it (the fleet,
        before this gateway read it), or None: held for an operator, or rejected (nothing applied)."""
        engine = self.engine
        why = guard_reason(restricting, lifting, restricted_now, engine.config.subscribers.guard)
        if not why:
            return ""
        digest = list_digest(update.subscribers)
        verdict = self._take_verdict(digest)
        if verdict is not None:   # the fleet decided before this gateway read it
            self._audit(HeldChange(update, restricting, lifting, engine.clock(), why, digest),
                        "approved" if verdict[0] else "rejected", verdict[1])
            if verdict[0]:
                return verdict[1]
            log.warning("event=list_rejected_by_operator by=%s origin=%s (rejected in the fleet before this "
                        "gateway read it)", verdict[1], update.origin)
            return None
        self.held = HeldChange(update, restricting, lifting, engine.clock(), why, digest)
        self.source_error = None
        self.metrics.held_changes.set(1)
        log.warning("event=list_held origin=%s entries=%d restricting=%d lifting=%d why=%r "
                    "(walled-garden approve | reject)", update.origin, len(update.subscribers), restricting,
                    lifting, why)
        return None

    async def _save(self, update: ListUpdate, new: dict[str, Subscriber], approved_by: str) -> set[str] | None:
        """Put the list in the inputs and save it; None (inputs as they were) when it cannot be saved."""
        inputs, clock = self.engine.inputs, self.engine.clock
        old, since = inputs.listed, dict(inputs.listed_since)
        changes = policy.list_changes(old, new)
        saved = _undo(inputs, changes)
        owners = policy.session_owners(inputs, changes, old)   # whose sessions these entries' keys match now
        changed = policy.apply_list(inputs, new, clock())
        # A match key moving between entries moves sessions between subscribers whose own
        # entries did not change: they are decided again too (not superseded: not ``changed``).
        self.session_owners = (owners | policy.session_owners(inputs, changes, old)) - changed
        meta = _meta(update, len(new), clock())
        try:
            await asyncio.to_thread(self.engine.store.save_list, old, new, meta, inputs.listed_since, changed)
        except (StoreError, sqlite3.Error, OSError) as exc:   # not durable, so not in force; retried
            inputs.listed, inputs.listed_since = old, since
            for snapshot in saved:
                inputs.restore(snapshot)
            self.report_failure(SourceFailure(update.origin, "state", f"the list could not be saved: {exc}"))
            self.unsaved, self.unsaved_approval = update, approved_by
            self.engine.changed.set()
            return None
        self.unsaved = None
        self.list_status, self.source_error = meta, None
        self.metrics.list_entries.set(len(new))
        self.metrics.source_success.set(meta["loaded_at"])   # only once saved: one that is not is retried
        log.info("event=list_accepted origin=%s entries=%d changed=%d", update.origin, len(new), len(changed))
        return changed

    def _first(self) -> bool:
        """No list in force and none saved: the first list of this gateway (or after a lost state)."""
        return not self.engine.inputs.listed and not self.list_status and self.unsaved is None

    async def _enforce_first(self, update: ListUpdate, new: dict[str, Subscriber], approved_by: str) -> bool:
        """The first list: enforced first, then saved (caller holds the lock); False, with nothing
        changed, when the marker below cannot be written (the list is then saved first).

        ``enforced`` is set as soon as the kernel holds it: the start tells systemd it is ready
        without waiting for the save of 100k entries and their enforcement rows (~2 s). Safe:
        - no input is applied meanwhile (the lock is held until the save commits), so no answer
          is sent before what it answers is durable, and no later change is overwritten;
        - a marker (``PENDING_LIST``) is committed before the kernel is touched: a daemon killed
          before the save finds it and keeps the kernel's table as it is until the list (its file
          is still there) is read again (``Engine.restore``), never freeing who it restricted;
        - a save that fails withdraws the list from the kernel and memory (it is not in force
          unless durable), reports it and retries it as any unsaved list."""
        engine = self.engine
        inputs, clock = engine.inputs, engine.clock
        meta = _meta(update, len(new), clock())
        try:
            engine.store.set_meta(PENDING_LIST, {"origin": update.origin, "loaded_at": meta["loaded_at"],
                                                 "digest": update.digest})
        except (StoreError, sqlite3.Error) as exc:
            log.warning("event=list_marker_not_saved error=%r (the list is saved before it is enforced)", str(exc))
            return False
        old, since = inputs.listed, dict(inputs.listed_since)
        changes = policy.list_changes(old, new)
        saved = _undo(inputs, changes)
        owners = policy.session_owners(inputs, changes, old)
        changed = policy.apply_list(inputs, new, clock())
        self.session_owners = (owners | policy.session_owners(inputs, changes, old)) - changed
        self.list_status, self.source_error = meta, None
        self.metrics.list_entries.set(len(new))
        deferred: list[Callable[[], None]] = []
        failed: Exception | None = None
        try:
            await self._apply(changed | self.session_owners, update.origin, deferred)
        except DataplaneError:
            engine.changed.set()  # the repair loop retries
        except Exception as exc:  # noqa: BLE001 (a bug of ours: raised once the list is saved, as when saved first)
            failed = exc
        self.enforced.set()
        log.info("event=list_accepted origin=%s entries=%d changed=%d (the first list: enforced, saving now)",
                 update.origin, len(new), len(changed))
        if not self.started.is_set():   # still holding the lock: no input is applied meanwhile
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.started.wait(), START_WAIT)
        try:
            await asyncio.to_thread(self._write_first, old, new, meta, dict(inputs.listed_since), changed, deferred)
        except (StoreError, sqlite3.Error, OSError) as exc:   # not durable, so not in force; retried
            inputs.listed, inputs.listed_since = old, since
            for snapshot in saved:
                inputs.restore(snapshot)
            self.list_status = {}
            self.metrics.list_entries.set(len(old))
            self.report_failure(SourceFailure(update.origin, "state", f"the list could not be saved: {exc}"))
            self.unsaved, self.unsaved_approval = update, approved_by
            try:
                await engine.sync_all()
            except DataplaneError:
                pass   # the repair loop retries
            else:   # withdrawn from the kernel: a start must not take the table for the list being saved
                with contextlib.suppress(StoreError, sqlite3.Error):
                    engine.store.set_meta(PENDING_LIST, None)
            engine.changed.set()
            return True
        self.unsaved = None
        self.metrics.source_success.set(meta["loaded_at"])
        log.info("event=list_saved origin=%s entries=%d", update.origin, len(new))
        if failed is not None:
            raise failed
        return True

    def _write_first(self, old: dict[str, Subscriber], new: dict[str, Subscriber], meta: dict[str, Any],
                     since: dict[str, float], changed: set[str], deferred: list[Callable[[], None]]) -> None:
        """On a worker thread: the list (with its meta, in force from this commit on), then the
        enforcement record of its sync, then the marker cleared (each its own commit: the loop's
        small writes are not held behind the whole)."""
        store = self.engine.store
        store.save_list(old, new, meta, since, changed)
        for record in deferred:
            record()
        try:
            store.set_meta(PENDING_LIST, None)
        except (StoreError, sqlite3.Error) as exc:   # harmless: a marker older than the saved list is ignored
            log.warning("event=list_marker_not_cleared error=%r", str(exc))

    async def _apply(self, changed: set[str], origin: str, deferred: list[Callable[[], None]] | None = None) -> None:
        """Re-decide only the subscribers whose entry changed, as an element diff (caller holds
        the lock): a whole pass over 100k decisions took ~2 s of a 1 % churn's ~3.5 s, under the
        lock every webhook waits for. A first list, a needed full sync, a new prefix length or
        an address claimed twice still go through ``sync_all``, which resolves conflicts."""
        engine = self.engine
        if engine.reconciler.needs_full or len(changed) * 2 > max(len(engine.decisions), 1):
            await engine.sync_all(deferred=deferred)
            return
        if not changed:
            return
        try:
            result = await engine.apply(engine.decide(sorted(changed), engine.now(inside_operation=True)))
        except AddressConflict as exc:
            log.warning("event=list_conflict origin=%s detail=%r (applying the list in a full pass)", origin, str(exc))
            await engine.sync_all(deferred=deferred)
            return
        if result.kind == "partial":   # a full sync (new prefix length) has flushed already
            engine.spawn(engine.flusher.flush(result.changed, "list"))
        gc.freeze()   # the new list's objects live on; see Engine.sync_all

    def _rebuild(self, new: dict[str, Subscriber], digest: str = "", approved_by: str = "") -> str:
        """The first list after the state was lost (caller holds the lock): a listed subscriber
        whom the kernel held free was free for a reason the lost state knew (a payment, a
        promise, an exemption), so they get a payment grace from now rather than being walled
        again; a kernel restriction the list does not name is lifted, and reported
        (``Engine.rebuilt``: log, ``status``). That one was an event's or an operator's, for a
        subscriber id only the lost state knew: kept, nothing could ever lift it (a payment
        names the subscriber, not the address), so a customer who paid would stay walled. Nor
        is the lift held for an operator by the mass-change guard: until the rebuild every
        webhook is answered 503 (nothing can be judged without the state), so a hold would keep
        paying customers walled until someone acts; in a fleet the stream, replayed to this
        gateway once the rebuild is done, restores the events' restrictions it still holds.
        Returns who approved the list.

        When the state was not lost but a first list was being saved (``Engine.rebuild_unsaved``),
        the kernel holds that list: the state knows every input, so nobody gets a grace. The same
        list (its content digest in the marker) is in force at once; another one, written
        meanwhile, is weighed by the mass-change guard like any list ("" returned), the kernel
        kept as it is until it goes through or an operator approves it (``approved_by``)."""
        engine = self.engine
        assert engine.rebuilding is not None
        if engine.rebuild_unsaved:
            pending = engine.store.get_meta(PENDING_LIST) or {}
            if approved_by or not pending.get("digest") or not digest or pending.get("digest") == digest:
                engine.rebuilding, engine.rebuild_unsaved = None, False
                log.warning("event=unsaved_list_read_again listed=%d (the kernel kept the list being saved when the "
                            "daemon stopped)", len(new))
                return approved_by or "the list being saved when the daemon stopped"
            log.warning("event=unsaved_list_changed listed=%d (not the list being saved when the daemon stopped: "
                        "weighed by the mass-change guard; the kernel is kept as it is meanwhile)", len(new))
            return ""
        # The graces below run from now, but are ordered as received before every input still to
        # come (``ReceiptClock.floor``): a stamp would raise the receipt floor to now, and the
        # fleet's stream, replayed after this, would then count each old input as received now
        # (a payment of last week given a fresh grace here while every other gateway walls them).
        # Ordered before, any input the replay or billing brings about a subscriber kept free
        # here is newer than this guess (a restriction the stream still holds restores it).
        now, before = engine.clock(), engine.receipts.floor
        listed = {(mode_map(version, plen), key) for entry in new.values() for version, plen, key in entry.keys}
        lifted = sorted(key_text((*mode_prefix(container), key)) for container, key in engine.rebuilding - listed)
        kept_free = []
        for sid, subscriber in new.items():
            keys = {(mode_map(version, plen), key) for version, plen, key in subscriber.keys}
            if not keys & engine.rebuilding:
                policy.record_payment(engine.inputs, sid, before, engine.config.policy.payment_grace,
                                      "rebuilt after the state was lost: free in the kernel then", now)
                kept_free.append(sid)
        engine.rebuilding = None
        engine.store.save_subscribers(engine.inputs, kept_free)
        engine.rebuilt = {"at": now, "listed": len(new), "kept_free": len(kept_free), "lifted": len(lifted),
                          "lifted_keys": lifted[:REBUILT_KEYS_SHOWN]}
        log.warning("event=state_rebuilt listed=%d kept_free=%d lifted_unlisted=%d lifted_keys=%s (restrictions no "
                    "list entry names: their subscriber ids went with the state; re-send them from billing)",
                    len(new), len(kept_free), len(lifted), ",".join(lifted[:REBUILT_KEYS_SHOWN]))
        return approved_by or "the rebuild from the kernel after the state was lost"

    def applied_digest(self) -> str | None:
        """The content digest of the list in force (``sources.content_digest``): a source that
        reads the same content again does not parse it and tells ``on_source_unchanged``. None
        while reading it again still has work to do: a held or unsaved list would be replaced by
        it, and a rebuild after the state was lost needs it parsed."""
        if self.held is not None or self.unsaved is not None or self.engine.rebuilding is not None:
            return None
        return self.list_status.get("digest") or None

    def due(self) -> float | None:
        """A timer duty: a list whose saving failed is tried again every ``RETRY_SECONDS``."""
        return RETRY_SECONDS if self.unsaved is not None else None

    async def run(self) -> None:
        if self.unsaved is not None:
            await self.on_list(self.unsaved, approved_by=self.unsaved_approval)

    async def on_source_unchanged(self, origin: str) -> None:
        """The source answered 'not modified': the list in force is still current; unless the
        list it answered last could not be saved (a URL's ETag is kept once the body is handed
        over): that list is not in force, and the failure stays reported until its save works."""
        if self.unsaved is not None:
            return
        self.metrics.source_success.set(self.engine.clock())
        self.source_error = None

    async def on_source_failure(self, failure: SourceFailure) -> None:
        self.report_failure(failure)

    def report_failure(self, failure: SourceFailure) -> None:
        self.metrics.source_failures.labels(failure.reason).inc()
        self.source_error = {"origin": failure.origin, "reason": failure.reason, "message": failure.message,
                             "at": self.engine.clock()}
        log.error("event=list_rejected origin=%s reason=%s detail=%r (nothing changed)", failure.origin,
                  failure.reason, failure.message)

    # -- the operator's answer to a held change -------------------------------------------
    async def approve(self, actor: str, note: str) -> Result:
        return await self._verdict(True, actor, note)

    async def reject(self, actor: str, note: str) -> Result:
        return await self._verdict(False, actor, note)

    async def _verdict(self, approve: bool, actor: str, note: str) -> Result:
        held = self.held
        if held is None:
            return Refusal(Refused.CONFLICT, "no change is held")
        if self.relay is not None:
            return await self.relay.send("list_approve" if approve else "list_reject",
                                         {"actor": actor, "note": note, "digest": held.digest})
        return await (self.apply_approve if approve else self.apply_reject)(actor, note, held.digest)

    def _elsewhere(self, approve: bool, by: str, digest: str, at: float | None = None) -> Result | None:
        """A fleet's verdict on a list this gateway does not hold: kept for when it reads it.

        Kept as given at ``at`` (when the gateway that took it received it; an ``at`` ahead of
        this clock counts as now): a gateway applying it hours later (catching up) keeps it for
        what is left of ``VERDICT_DAYS``, as the others do, not for a day from its catch-up."""
        if self.held is not None and self.held.digest == digest:
            return None
        now = self.engine.clock()
        self.verdicts[digest] = (approve, by, now if at is None else min(at, now))
        while len(self.verdicts) > KEPT_VERDICTS:
            del self.verdicts[next(iter(self.verdicts))]
        self._save_verdicts()
        return Outcome({"approved" if approve else "rejected": True, "digest": digest,
                        "note": "this gateway does not hold that list; the verdict applies when it reads it"})

    def _take_verdict(self, digest: str) -> tuple[bool, str, float] | None:
        """The fleet's verdict on this list, if it gave one within ``VERDICT_DAYS`` (used once)."""
        verdict = self.verdicts.pop(digest, None)
        if verdict is not None:
            self._save_verdicts()
        if verdict is None or self.engine.clock() - verdict[2] > VERDICT_DAYS * 86400:
            return None
        return verdict

    def _save_verdicts(self) -> None:
        try:
            self.engine.store.set_meta(VERDICTS, {d: list(v) for d, v in self.verdicts.items()})
        except (StoreError, sqlite3.Error) as exc:
            log.warning("event=list_verdicts_not_saved error=%r (kept in memory)", str(exc))

    async def apply_approve(self, actor: str, note: str, digest: str, via: str = "",
                            at: float | None = None) -> Result:
        """``at``: in a fleet, when the accepting gateway received the verdict (``_elsewhere``)."""
        by = f"{actor}{' via ' + via if via else ''} ({note or 'no reason given'})"
        elsewhere = self._elsewhere(True, by, digest, at)
        held = self.held
        if elsewhere is not None or held is None:
            return elsewhere or Refusal(Refused.CONFLICT, "no change is held")
        await self.on_list(held.update, approved_by=by)
        self._audit(held, "approved", by)
        return Outcome({"approved": True, "restricting": held.restricting, "lifting": held.lifting,
                        "origin": held.update.origin})

    async def apply_reject(self, actor: str, note: str, digest: str, via: str = "",
                           at: float | None = None) -> Result:
        elsewhere = self._elsewhere(False, f"{actor}{' via ' + via if via else ''}", digest, at)
        if elsewhere is not None:
            return elsewhere
        async with self.engine.lock:
            held, self.held = self.held, None
            self.metrics.held_changes.set(0)
        if held is None:
            return Refusal(Refused.CONFLICT, "no change is held")
        self._audit(held, "rejected", f"{actor}{' via ' + via if via else ''} ({note or 'no reason given'})")
        log.warning("event=list_rejected_by_operator by=%s reason=%r origin=%s restricting=%d lifting=%d",
                    actor, note, held.update.origin, held.restricting, held.lifting)
        return Outcome({"rejected": True, "origin": held.update.origin,
                        "note": "the list in force stays; a new export is evaluated again"})

    def _audit(self, held: HeldChange, verdict: str, by: str) -> None:
        """A held list's fate in the audit log, under the subscriber ``(list)``."""
        try:
            self.engine.store.append_audit([(self.engine.clock(), AUDIT_SUBJECT, "held", verdict,
                                             f"list from {held.update.origin} ({len(held.update.subscribers)} entries, "
                                             f"restricting {held.restricting}, lifting {held.lifting}, "
                                             f"digest {held.digest[:12]}) {verdict} by {by}")])
        except (StoreError, sqlite3.Error) as exc:
            log.error("event=audit_not_saved subscriber=%s error=%r", AUDIT_SUBJECT, str(exc))

    # -- status ----------------------------------------------------------------------------
    def _source_report(self) -> dict[str, Any]:
        loaded = self.list_status.get("loaded_at")
        return {"configured": redact_url(self.engine.config.subscribers.source), "list_in_force": self.list_status,
                "list_age_seconds": round(self.engine.clock() - loaded, 1) if loaded else None,
                "last_error": self.source_error}

    def _held_report(self) -> list[dict[str, Any]]:
        held = self.held
        if held is None:
            return []
        return [{"origin": held.update.origin, "entries": len(held.update.subscribers),
                 "restricting": held.restricting, "lifting": held.lifting, "since": held.since, "why": held.why,
                 "digest": held.digest}]

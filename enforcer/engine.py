"""The engine: what the kernel enforces, and the one way it changes.

Every component (list intake, billing events, timers, operator and portal actions) changes
enforcement the same way: under ``lock``, it updates the policy inputs, asks the policy for
decisions and hands them to ``apply`` (a few subscribers, as an element diff) or
``sync_all`` (everyone, after a start, a reload or a failure). Kernel calls run on one
dedicated thread, so a 100k-element load never stalls the event loop, and in order.

The engine does not speak HTTP and does not know its callers: components read its state
(``decisions``, ``inputs``, ``reconciler``) and register what they need from it (status
sections in ``reports``, duties run by the timer in ``duties``, ``on_replaced`` callbacks
after a table replace).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from . import policy
from .address_space import AddressSpace
from .billing_order import BillingOrder
from .claims import ClaimsIndex, Conflicts, held_back, uncontested
from .config import Config
from .config.reload import reloadable
from .dataplane.backend import Dataplane, DataplaneError
from .dataplane.layout import MODE_PREFIX, with_mode_view
from .enforced import EnforcedRecord, held
from .flushing import Flusher
from .gc_pause import gc_paused
from .metrics import Metrics
from .model import Network
from .policy import Decision
from .receipt_clock import ReceiptClock
from .reconciler import AddressConflict, NeedsFullSync, Reconciler, SyncResult, acknowledgeable
from .sessions.session import Session, SessionId
from .store import EnforcedWrite, Store, StoreError
from .subscribers import Key, key_network, network_key
from .table_layout import base_layout

log = logging.getLogger("walled_garden.enforcer")
#: The meta key of the saved clock anchor (``receipt_clock``).
CLOCK_ANCHOR = "clock_anchor"
#: The meta key saying a first list is enforced and its save may not have finished
#: (``ListIntake._enforce_first``; ``restore`` keeps the kernel's table until the list is read).
PENDING_LIST = "list_pending"
#: The ``meta`` key of the notice acknowledgements in force: subscriber -> until (unix time).
ACKNOWLEDGED = "notice_acknowledged"
T = TypeVar("T")


def held_keys(decision: Decision) -> tuple[Key, ...]:
    """``held`` as the kernel's keys (no networks built)."""
    if decision.restricted and decision.subscriber is not None:
        return decision.subscriber.keys
    return ()


def unchanged(decisions: Mapping[str, Decision], previous: Mapping[str, Decision]) -> bool:
    """Every decision is the very one enforced before (``decide_all`` keeps those), or a free
    one where nothing was: the enforcement record would not change, so a restart that finds
    the kernel as it left it counts, and neither compares 100k decisions again nor writes."""
    if not previous:   # ``EnforcedRecord.full`` reads the table itself then
        return False
    kept = 0
    for sid, decision in decisions.items():
        before = previous.get(sid)
        if before is decision:
            kept += 1
        elif before is not None or decision.restricted or decision.pending is not None:
            return False
    return kept == len(previous)


def policy_rules(config: Config) -> policy.Rules:
    return policy.Rules(windows=config.policy.windows, escalation=config.policy.escalation)


class Duty(Protocol):
    """A component's periodic work, run by the timer loop after its own round."""

    def due(self) -> float | None:
        """Seconds until it wants to run (None: nothing to do)."""

    async def run(self) -> None: ...


@dataclass(frozen=True)
class Undo:
    """What a change of one subscriber's inputs replaced, to put back if it cannot be applied."""

    inputs: policy.Snapshot
    billing: dict[str, float] | None


class Engine:
    def __init__(self, config: Config, dataplane: Dataplane, store: Store, flusher: Flusher, metrics: Metrics,
                 clock: Callable[[], float], monotonic: Callable[[], float], boot: str = "") -> None:
        """``boot``: this boot's id (``receipt_clock.boot_id``); a clock anchor saved on the same
        boot is resumed, so a step while the daemon was idle or down is seen too."""
        self.config, self.clock, self.store, self.flusher, self.metrics = config, clock, store, flusher, metrics
        # The inputs and what the kernel enforced before this start, read together: an unchanged
        # subscriber's two are one object (``Store.load_state``).
        self.inputs, before = store.load_state()
        gc.freeze()   # ~1M long-lived objects just read: kept out of every collection (see ``sync_all``)
        self.inputs.rules = policy_rules(config)
        # Inputs are ordered by receipt (receipt_clock), billing's events by billing's clock
        # among themselves (billing_order); never one clock against the other.
        self.receipts = ReceiptClock(clock, floor=self.inputs.newest_instant(), monotonic=monotonic)
        self.boot = boot
        saved = store.get_meta(CLOCK_ANCHOR)
        if boot and isinstance(saved, dict) and saved.get("boot") == boot:
            try:
                self.receipts.resume(float(saved["wall"]), float(saved["mono"]))
            except (KeyError, TypeError, ValueError):
                log.error("event=clock_anchor_unreadable anchor=%r (a step while the daemon was down is not seen)",
                          saved)
        self._anchor_unsaved = True   # saved with the first decision, and again after each step
        self.billing_order = BillingOrder(store.billing_order())
        self.reconciler = Reconciler(dataplane, base_layout(config))
        self.space = AddressSpace.from_config(config)   # where subscribers' addresses may lie
        self.lock = asyncio.Lock()
        self.decisions: dict[str, Decision] = before   # what the kernel enforces
        self.record = EnforcedRecord()
        self.claims = ClaimsIndex()   # who holds which addresses in the kernel (rebuilt by sync_all)
        self.conflicts = Conflicts()   # decisions not enforced: an address is another's
        # Listed subscribers the kernel holds free (a payment grace, an exemption, a promise):
        # their list addresses are theirs all the same, so an event or operator command may not
        # claim one for someone else (``EventIntake``): the paid customer would be walled by it.
        self.free_listed = ClaimsIndex()
        self.acknowledged: dict[str, float] = {}   # notice acknowledgements in the kernel, until when
        self.rebuilding: set[tuple[str, str]] | None = None   # kernel keys kept until the list (restore)
        self.rebuild_unsaved = False   # ... because a first list was being saved, not because the state was lost
        self.rebuilt: dict[str, Any] | None = None   # what the rebuild after a lost state did (``ListIntake._rebuild``)
        self.last_sync: dict[str, Any] = {}
        self.table_repairs = 0
        self.changed = asyncio.Event()   # wakes the timer: something may now end at another time
        self.reports: dict[str, Callable[[], Any]] = {}   # status sections, by key
        self.duties: list[Duty] = []   # components' periodic work, run by the timer
        self.on_replaced: list[Callable[[], Awaitable[None]]] = []   # after any new table (run_replaced)
        self._moved_unsaved: set[str] = set()   # graces/promises moved by a clock step (or ended), not yet saved
        self._sessions_unsaved: dict[SessionId, Session] = {}   # sessions moved by it, not yet saved
        self._kernel_thread = ThreadPoolExecutor(1, thread_name_prefix="nft")
        self._background: set[asyncio.Task[Any]] = set()

    # -- time and the kernel thread -------------------------------------------------------
    def now(self, inside_operation: bool = False) -> float:
        """The instant to decide at (caller holds the lock). A forward step of the wall clock
        first moves the ends of graces and promises by as much: a jump never ends anyone's
        freedom early (``receipt_clock``); then what is pending (moved ends, ``save_later``) is
        saved as memory holds it for those subscribers.

        Both only at the start of an operation, before it changes anything. Inside one
        (``sync_all``, a list's diff: ``inside_operation``) memory may hold a change the
        operation still undoes from a snapshot taken before: a step moved into memory there
        would be undone with it (a grace ending early by the step), and a save would persist
        the half-done change. So inside, the instant is the wall clock as it reads without a
        step not yet taken up (``ReceiptClock.unstepped``); the next operation's start takes
        the step up and saves."""
        if inside_operation:
            return self.receipts.unstepped()
        jump = self.receipts.step()
        if jump:
            now = self.clock()
            moved = policy.clock_stepped(self.inputs, jump, now)
            sessions = self.inputs.sessions.clock_stepped(jump, now)
            log.warning("event=clock_stepped_forward seconds=%.1f graces_and_promises_moved=%d sessions_moved=%d",
                        jump, len(moved), len(sessions))
            self._moved_unsaved |= moved
            self._sessions_unsaved.update((s.id, s) for s in sessions)
            self._anchor_unsaved = True
            self.changed.set()   # the next session expiry moved too
        if self._moved_unsaved or self._sessions_unsaved or self._anchor_unsaved:
            # The moved ends and the anchor they were moved by, in one commit: if it fails, the
            # saved anchor is the one before the step, and a restart moves the saved ends again.
            wall, mono = self.receipts.anchor
            current = [s for sid, s in self._sessions_unsaved.items() if self.inputs.sessions.sessions.get(sid) is s]
            try:
                self.store.save_clock(self.inputs, self._moved_unsaved, {"boot": self.boot, "wall": wall, "mono": mono},
                                      current)
                self._moved_unsaved, self._sessions_unsaved, self._anchor_unsaved = set(), {}, False
            except (StoreError, sqlite3.Error) as exc:
                log.error("event=moved_graces_not_saved count=%d sessions=%d error=%r (kept in memory; saved with "
                          "the next input or timer round)", len(self._moved_unsaved), len(current), str(exc))
        return self.clock()

    @property
    def clock_unsaved(self) -> bool:
        """Graces, promises or sessions moved by a clock step, or ends the timer could not save
        (``save_later``), live only in memory (the timer retries)."""
        return bool(self._moved_unsaved or self._sessions_unsaved)

    def save_later(self, ids: Iterable[str]) -> None:
        """These subscribers' inputs changed in memory with time (an exemption, grace or promise
        ended) but their save failed: saved by the next ``now`` (the next input, or the timer's
        round within RESYNC_SECONDS). A restart before that reads the old end and ends it again,
        unless the wall clock has stepped back before it: then only this save keeps what ended
        ended, so it is retried until memory and disk agree."""
        self._moved_unsaved.update(ids)

    async def kernel(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._kernel_thread, fn, *args)

    def spawn(self, coro: Awaitable[Any], name: str = "flush") -> None:
        """Run ``coro`` in the background (a flush after a commit, a batch's answers): a failure
        is logged with its traceback and counted in ``task_failures{task=name}`` at once."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(lambda done: self._finished(done, name))

    def _finished(self, task: asyncio.Future[Any], name: str) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        self.metrics.task_failures.labels(name).inc()
        log.error("event=task_failed task=%s error=%r", name, str(task.exception()), exc_info=task.exception())

    # -- one subscriber's inputs -----------------------------------------------------------
    def save(self, sid: str) -> Undo:
        return Undo(self.inputs.snapshot(sid), self.billing_order.snapshot(sid))

    def undo(self, sid: str, saved: Undo) -> None:
        self.inputs.restore(saved.inputs)
        self.billing_order.restore(sid, saved.billing)

    def decide(self, sids: Any, now: float) -> dict[str, Decision]:
        return {sid: self.inputs.decide(sid, now, self.decisions.get(sid)) for sid in sids}

    # -- the write paths -------------------------------------------------------------------
    async def sync_all(self, read_kernel: bool = False, deferred: list[Callable[[], None]] | None = None
                       ) -> SyncResult:
        """Make the whole table match the policy now (caller holds the lock).

        With ``deferred``, the enforcement record (100k rows and their audit, ~1.5 s for a first
        list) is not written here: counted now, its write appended there for the caller to run
        later, still holding the lock (``ListIntake._enforce_first``)."""
        if self.rebuilding is not None:
            raise DataplaneError("the state was lost: the kernel table is kept as it is until the list arrives")
        now = self.now(inside_operation=True)    # maybe inside an operation that may still undo (``now``)
        with gc_paused():   # 100k decisions that live on: no collection walks them half-built
            decisions = self.inputs.decide_all(now, self.decisions)
        started = time.perf_counter()
        try:
            # who held a contested address before (at a start: the saved decisions) keeps it
            result = await self.kernel(self.reconciler.sync_all, decisions, read_kernel, self.decisions,
                                       self._ack_seconds(self.acknowledged))
        except DataplaneError as exc:
            self.metrics.sync_failures.inc()
            log.error("event=sync_failed kind=full error=%r", str(exc))
            raise
        self._synced(result, time.perf_counter() - started)
        owned = self.reconciler.owned
        self.claims.rebuild_keys({sid: held_keys(d) for sid, d in owned.items()})
        # Only whom the sync left out or trimmed (the conflicts: none at all, usually) are wanted
        # still: one enforced as decided is no conflict, and 125k networks built took ~1 s.
        wanted = {sid: (d.mode.value, held(d)) for sid, d in decisions.items()
                  if d.restricted and owned.get(sid) is not d}
        self.conflicts.after_sync(wanted, owned.keys() - wanted.keys(), self.claims, self.clock())
        for sid in self.conflicts.keys() & decisions.keys():   # what the kernel holds for them, not their wish
            decisions[sid] = self.reconciler.owned.get(sid) or held_back(sid)
        previous, self.decisions = self.decisions, decisions
        self._note_free_listed(decisions, whole=True)
        self.forget_acknowledgements(list(self.acknowledged))
        if deferred is not None:
            self.record.recount(decisions)
            self._counted()
            deferred.append(functools.partial(self._record_full_logged, decisions, previous))
        elif unchanged(decisions, previous):
            self.record.recount(decisions)
            self._counted()
        else:   # 100k rows compared and written: off the loop
            await asyncio.to_thread(self._record_full_logged, decisions, previous)
        self.spawn(self.flusher.flush(result.changed, "sync"))
        # The list, decisions and mirror are ~1M long-lived objects: without this every
        # generation-2 collection walks them all (0.5-1.5 s with 100k subscribers, measured),
        # a pause that stalls every webhook in flight. Frozen objects are still freed by
        # reference counting when a later list replaces them.
        gc.freeze()
        await self.run_replaced(result)
        return result

    async def apply(self, decisions: dict[str, Decision], cause: str = "",
                    deferred: list[EnforcedWrite] | None = None) -> SyncResult:
        """Apply a few subscribers' decisions as a diff (caller holds the lock); ``cause`` is
        recorded in the audit rows. Raises ``AddressConflict`` (nothing applied) when one
        claims an address another subscriber holds. With ``deferred`` the state rows are
        appended there for the caller to commit with its own (one SQLite commit per batch)."""
        started = time.perf_counter()
        undo = self._claim(decisions)
        try:
            # the few acknowledged ones among them, if any (usually none: the call as ever)
            acks = self._ack_seconds(decisions.keys() & self.acknowledged.keys())
            result = await (self.kernel(self.reconciler.update, decisions, acks) if acks
                            else self.kernel(self.reconciler.update, decisions))
        except NeedsFullSync:
            return await self.sync_all()
        except (DataplaneError, AddressConflict) as exc:
            for sid, held in reversed(undo):
                self.claims.claim(sid, held)
            if isinstance(exc, DataplaneError):
                self.metrics.sync_failures.inc()
                log.error("event=sync_failed kind=partial error=%r", str(exc))
            raise
        self._synced(result, time.perf_counter() - started)
        previous = {sid: self.decisions[sid] for sid in decisions if sid in self.decisions}
        self.decisions.update(decisions)
        self._note_free_listed(decisions)
        self.forget_acknowledgements(decisions.keys() & self.acknowledged.keys())
        write = self.record.partial(decisions, previous, self.clock(), cause)
        self._counted()
        if deferred is None:
            self.store.record_state([write])
        else:
            deferred.append(write)
        return result

    # -- notice acknowledgements ----------------------------------------------------------
    def _ack_seconds(self, sids: Iterable[str]) -> dict[str, int]:
        """The seconds each of these acknowledged subscribers' acknowledgement has left (0: over,
        though its element may linger a second: the kernel was given whole seconds, rounded
        up), for the reconciler to move it with their addresses (``_move_acknowledgements``)."""
        now = self.clock()
        return {sid: max(math.ceil(until - now), 0) for sid in sids
                if (until := self.acknowledged.get(sid)) is not None}

    def forget_acknowledgements(self, sids: Collection[str]) -> None:
        """Of these subscribers, forget the acknowledgements that are over or whose subscriber is
        no longer in notice or throttle mode (their elements left the kernel with the change
        that enforced it, ``Reconciler._move_acknowledgements``, or with a replace), and save
        the rest (``ACKNOWLEDGED``): the portal, ``/api/captive`` and a restart agree with the
        kernel. A subscriber back in notice later sees the notice again, as after a replace
        (``PortalActions._reacknowledge``)."""
        now = self.clock()
        gone = [sid for sid in sids if sid in self.acknowledged
                and (self.acknowledged[sid] <= now or not acknowledgeable(self.decisions.get(sid)))]
        if not gone:
            return
        for sid in gone:
            del self.acknowledged[sid]
        log.info("event=notice_acknowledgements_ended subscribers=%s", ",".join(sorted(gone)[:20]))
        self.save_acknowledged()

    def save_acknowledged(self) -> None:
        """``acknowledged`` (those still running) to meta, for a restart; a failure is logged: the
        kernel is right either way, and a restart drops what the mode no longer allows."""
        now = self.clock()
        try:
            self.store.set_meta(ACKNOWLEDGED, {s: u for s, u in self.acknowledged.items() if u > now})
        except (StoreError, sqlite3.Error) as exc:
            log.error("event=acknowledgements_not_saved error=%s", str(exc))

    def _note_free_listed(self, decisions: Mapping[str, Decision], whole: bool = False) -> None:
        """Keep ``free_listed`` to the listed subscribers these decisions leave free (held back
        by a clash included: the list gives them the address; its holder keeps what it holds,
        ``EventIntake`` asks only about new claims)."""
        if not whole:
            for sid, decision in decisions.items():
                self.note_free_listed(sid, decision)
            return
        listed, moved = self.inputs.listed, self.inputs.readdressed
        # one pass over the decisions: a few ms at 100k, once per full sync; list entries never
        # overlap (the list is refused otherwise), so they go in bulk
        self.free_listed.rebuild_keys({sid: entry.keys for sid, d in decisions.items()
                                       if not d.restricted and sid not in moved
                                       and (entry := listed.get(sid)) is not None and entry.keys})
        for sid in moved.keys() & listed.keys():
            if sid in decisions:
                self.note_free_listed(sid, decisions[sid])

    def note_free_listed(self, sid: str, decision: Decision) -> tuple[Network, ...]:
        """``sid``'s place in ``free_listed`` for ``decision``: its list addresses (billing's
        newer ones after a ``subscriber.addresses_changed``) while listed and free, else none.
        Returns what it had, for an undo (``free_listed.claim(sid, returned)``)."""
        entry = self.inputs.listed.get(sid)
        keys: tuple[Key, ...] = ()
        if entry is not None and not decision.restricted:
            moved = self.inputs.readdressed.get(sid)
            keys = tuple(network_key(n) for n in moved.addresses) if moved is not None else entry.keys
        if not keys and sid not in self.free_listed.held:
            return ()
        networks = [key_network(k) for k in keys]
        if networks and self.free_listed.conflict(sid, networks) is not None:
            networks = []   # another listed one's already (billing moved one onto another): the index stays sound
        return self.free_listed.claim(sid, networks)

    async def apply_resolving(self, decisions: dict[str, Decision], why: str, cause: str = "",
                              deferred: list[EnforcedWrite] | None = None) -> SyncResult:
        """``apply`` for changes that must not wait on one subscriber (timers, sessions): a
        subscriber whose decision claims an address another holds gets the rest of its change
        (``_without_contested``), the contested address reported in ``conflicts`` and retried
        each timer round, while everyone else's change applies. One reassigned address must
        never stop graces, promises and windows for all, nor the subscriber's other addresses."""
        try:
            result = await self.apply(decisions, cause, deferred)
        except AddressConflict:
            pass
        else:
            for sid in decisions:
                self.conflicts.pop(sid, None)
            return result
        # Usually one lasting clash with someone outside the batch (a held-back address, retried
        # each round): trimmed first, the whole batch still goes in one commit (one at a time,
        # 1,500 ended graces took one kernel and one SQLite commit each).
        rests = {sid: rest for sid, decision in decisions.items()
                 if (rest := self._without_contested(sid, decision, decisions.keys())) is not None}
        if rests:
            try:
                result = await self.apply({**decisions, **rests}, cause, deferred)
            except AddressConflict:
                pass   # a chain inside the batch as well: one at a time below
            else:
                for sid, decision in decisions.items():
                    if sid not in rests:
                        self.conflicts.pop(sid, None)
                        continue
                    found = self.claims.conflict(sid, held(decision))
                    detail = (f"{found.network} is already enforced for subscriber {found.holder}" if found
                              else "held back " + rests[sid].cause.rpartition("; held back ")[2])
                    if sid not in self.conflicts:
                        log.warning("event=address_conflict subscriber=%s cause=%s detail=%r (the rest of the "
                                    "change applied; retried each timer round)", sid, why, detail)
                    self.conflicts.note(sid, detail, decision.mode.value, self.clock())
                return result
        # One at a time: those that gain no address first (they only let go), then the others;
        # a claim that met an address still held is tried again while a round enforces someone
        # more (a chain: A takes B's address while B takes C's), the rest wait in ``conflicts``.
        # A round that enforces nobody whole trims (once each) those refused, which may let go of
        # what a later one claims (C-1 moves onto a contested address, C-2 takes C-1's old one):
        # another round then. Each round applies someone or trims someone new, so it ends.
        merged = SyncResult("partial", 0, [])
        pending = dict(sorted(decisions.items(), key=lambda item: self._gains(*item)))
        trimmed: set[str] = set()
        while pending:
            refused: dict[str, str] = {}
            for sid, decision in pending.items():
                try:
                    one = await self.apply({sid: decision}, cause, deferred)
                except AddressConflict as exc:
                    refused[sid] = str(exc)
                    continue
                self.conflicts.pop(sid, None)
                merged.add(one)
            progress = len(refused) < len(pending)
            if not progress:
                for sid in refused.keys() - trimmed:
                    rest = self._without_contested(sid, decisions[sid])
                    if rest is None:
                        continue
                    try:
                        one = await self.apply({sid: rest}, cause, deferred)
                    except AddressConflict:
                        continue
                    trimmed.add(sid)
                    merged.add(one)
                    progress = True
            if not progress:
                for sid, detail in refused.items():
                    if sid not in self.conflicts:
                        log.warning("event=address_conflict subscriber=%s cause=%s detail=%r (%s; retried each "
                                    "timer round)", sid, why, detail,
                                    "the rest of the change applied" if sid in trimmed else "kept as enforced")
                    self.conflicts.note(sid, detail, decisions[sid].mode.value, self.clock())
                break
            pending = {sid: decisions[sid] for sid in refused}
        return merged

    def _without_contested(self, sid: str, decision: Decision, batch: Collection[str] = ()) -> Decision | None:
        """``decision`` without the addresses another subscriber holds, or None when none of
        its addresses is contested (the conflict is elsewhere: keep what is enforced). One
        session address that is another's must not freeze the rest of the subscriber: its
        other new addresses walled, and the old ones freed (they may be a paying customer's
        now). The holder keeps what it holds; the contested address waits in ``conflicts``."""
        subscriber = decision.subscriber
        if not decision.restricted or subscriber is None:
            return None
        kept: list[Network] = []
        contested: list[Network] = []
        for network in subscriber.addresses:
            conflict = self.claims.conflict(sid, (network,))
            if conflict is not None and conflict.holder in batch:
                return None   # its holder changes in this very batch: not known yet
            (contested if conflict is not None else kept).append(network)
        if not contested:
            return None
        return uncontested(decision, kept, contested) if kept else held_back(sid)

    def _gains(self, sid: str, decision: Decision) -> bool:
        """Does ``decision`` hold an address that ``sid``'s enforced one does not?"""
        enforced = self.decisions.get(sid)
        return not set(held_keys(decision)) <= set(held_keys(enforced) if enforced is not None else ())

    def _claim(self, decisions: Mapping[str, Decision]) -> list[tuple[str, tuple[Network, ...]]]:
        """Claim the decisions' addresses, or raise ``AddressConflict`` having claimed nothing;
        returns what the claims replaced, to put back if the kernel fails.

        Every release of the batch comes first (what a decision no longer holds), then the
        claims: an address moving from one subscriber to another in one batch (a session moved,
        a swap) must meet its old holder's claim already let go, whatever the batch's order."""
        undo: list[tuple[str, tuple[Network, ...]]] = []
        for sid, decision in decisions.items():
            before = self.claims.held.get(sid, ())
            keeps = set(held_keys(decision))
            if any(key not in keeps for key in before):
                undo.append((sid, self.claims.claim(sid, [key_network(k) for k in before if k in keeps])))
        released = {sid for sid, _ in undo}
        for sid, decision in sorted(decisions.items(), key=lambda item: item[1].restricted):
            conflict = self.claims.conflict(sid, held(decision))
            if conflict is not None:
                for done, previous in reversed(undo):
                    self.claims.claim(done, previous)
                raise AddressConflict(str(conflict))
            previous = self.claims.claim(sid, held(decision))
            if sid not in released:
                undo.append((sid, previous))
        return undo

    def _record_full(self, decisions: Mapping[str, Decision], previous: Mapping[str, Decision]) -> None:
        write = self.record.full(self.store, decisions, previous, self.clock())
        self._counted()
        self.store.record_state([write])

    def _record_full_logged(self, decisions: Mapping[str, Decision], previous: Mapping[str, Decision]) -> None:
        try:
            self._record_full(decisions, previous)
        except (StoreError, sqlite3.Error) as exc:   # the kernel is right; the record catches up next sync
            log.error("event=enforced_not_recorded kind=full error=%r (status and audit lag until the next "
                      "sync)", str(exc))

    def _synced(self, result: SyncResult, seconds: float) -> None:
        self.metrics.sync_seconds.labels(result.kind).observe(seconds)
        self.metrics.last_sync.set(self.clock())
        self.last_sync = {"kind": result.kind, "at": self.clock(), "seconds": round(seconds, 6),
                          "elements": result.elements}
        log.info("event=sync kind=%s elements=%d seconds=%.4f changed=%d", result.kind, result.elements,
                 seconds, len(result.changed))

    def _counted(self) -> None:
        self.metrics.set_modes(self.record.mode_counts)
        self.metrics.waiting.set(len(self.record.waiting))

    # -- start-up and reload ---------------------------------------------------------------
    async def restore(self) -> SyncResult | None:
        """Enforce what the state says, reconciling with whatever the kernel holds.

        With no state at all (a quarantined or deleted database) but our table in the kernel,
        the table is left enforcing exactly as it is until the list arrives: an empty state
        would otherwise free everyone the kernel restricts (``ListIntake`` rebuilds then)."""
        async with self.lock:
            # A start is an operation's start: a step since the saved anchor (the daemon was down
            # on this boot) moves the ends now, and this boot's anchor is saved at once, so a
            # restart on it, after a later step, still sees that step.
            self.now()
            unsaved = self.store.get_meta("list") is None and self.store.get_meta(PENDING_LIST) is not None
            if (unsaved or not self.inputs.known_ids()) and self.store.get_meta("list") is None:
                view = with_mode_view(await self.kernel(self.reconciler.dataplane.read))
                restricted = {(c, k) for c, items in (view.elements if view else {}).items()
                              if c.startswith(MODE_PREFIX) for k in items}
                if restricted:
                    self.rebuilding, self.rebuild_unsaved = restricted, unsaved
                    if unsaved:
                        log.warning("event=list_unsaved_kernel_enforcing restricted_keys=%d (the first list was "
                                    "being saved when the daemon stopped: the kernel table is kept as it is until "
                                    "the list is read again)", len(restricted))
                    else:
                        log.error("event=state_empty_kernel_enforcing restricted_keys=%d (the kernel table is kept "
                                  "as it is until the list arrives; then enforcement is rebuilt from both)",
                                  len(restricted))
                    return None
            result = await self.sync_all(read_kernel=True)   # a new table (a reboot): see run_replaced
        log.info("event=restored restricted=%d kind=%s", sum(self.record.mode_counts.values()), result.kind)
        return result

    async def reload(self, config: Config) -> list[str]:
        """Take a new, already validated configuration (SIGHUP) without dropping enforcement.

        Values read where they are used simply change; a different table layout is installed
        by one atomic full sync (``on_replaced`` then puts back what lives only in the kernel,
        such as notice acknowledgements). Settings bound at start-up keep their old value;
        their keys are returned as needing a restart."""
        config, restart = reloadable(self.config, config)
        layout = base_layout(config)
        async with self.lock:
            self.config, self.space = config, AddressSpace.from_config(config)
            rules = policy_rules(config)
            rules_changed, self.inputs.rules = rules != self.inputs.rules, rules
            self.changed.set()   # windows or graces may now end at other times
            replacing = layout != self.reconciler.base_layout
            if not (replacing or rules_changed):
                return restart
            self.reconciler.base_layout = layout
            try:   # windows/escalation alone: re-decide everyone (an element diff)
                await self.sync_all()
            except DataplaneError:
                return restart   # the repair loop retries, with the new layout
            if not replacing:
                return restart
        log.info("event=layout_reloaded tag=%s", self.reconciler.layout.tag if self.reconciler.layout else "")
        return restart

    async def run_replaced(self, result: SyncResult) -> None:
        """The end of every ``sync_all`` (caller holds the lock): when it replaced the table
        (``kind`` ``full``), the ``on_replaced`` callbacks put back what the new table lacks and
        only the daemon knows (notice acknowledgements, by subscriber:
        ``PortalActions._reacknowledge``), whoever caused the replace: a start, a reload, the
        repair loop, or a webhook, operator action or list that found the table needing a full
        sync (review: those lost every acknowledgement)."""
        if result.kind == "full":
            for callback in self.on_replaced:
                await callback()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self._kernel_thread.shutdown(wait=True)
        self.store.close()

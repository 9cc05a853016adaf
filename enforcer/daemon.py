"""The enforcer: inputs in, kernel changes out, one change at a time.

Every input (the list, a billing event, a grace expiring) updates the policy inputs, the
policy decides, the reconciler turns decisions into a kernel transaction, and connections of
subscribers whose enforcement changed are flushed. An asyncio lock orders changes; kernel
calls run on one dedicated thread so a 100k-element load never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import ipaddress
import logging
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, TypeVar

from . import policy
from .audit import audit_rows, state as audit_state
from .config import Config
from .conntrack import Conntrack, ConntrackError
from .dataplane.backend import Dataplane, DataplaneError
from .dataplane.layout import MODE_PREFIX, PORTAL_CT_MARK, Layout, mode_map
from .events import EXEMPTION_CLOSED, EXEMPTION_OPENED, PAYMENT, READDRESSED, RELEASED, RESTRICTED, Event
from .exemptions import Exemption
from .promises import Promise, eligibility
from .metrics import Metrics
from .policy import Decision, Override
from .batcher import Batcher
from .billing_order import BillingOrder
from .address_space import AddressSpace
from .claims import ClaimsIndex
from .receipt_clock import ReceiptClock
from .reconciler import AddressConflict, NeedsFullSync, Reconciler, SyncResult, probe, with_mode_view
from .sources import ListUpdate, SourceFailure, redact_url
from .store import EnforcedWrite, Store, StoreError
from .subscribers import Mode, Network, Subscriber, validate_entry

log = logging.getLogger("walled_garden.enforcer")
T = TypeVar("T")

#: Seconds between attempts to repair the kernel table after a failed sync.
RESYNC_SECONDS = 2.0
#: How often processed webhook ids older than their retention are dropped.
PRUNE_SECONDS = 3600.0
#: How often decisions held back by an address conflict are tried again.
CONFLICT_RETRY_SECONDS = 60.0
#: How often ``verify_table`` compares every element with the mirror. It lists every set on
#: the kernel thread, ~1 s at 100k elements (nft 1.0.6, measured), which webhooks wait behind;
#: the cheap check (sentinels, layout tag: ~1 ms) runs on every call and sees a deleted table
#: or a flushed set within seconds; only a single element deleted by hand waits for this.
TABLE_FULL_CHECK_SECONDS = 600.0
#: How often the escalation ladder is checked (O(list); steps are days apart anyway).
ESCALATION_SECONDS = 300.0


@dataclass
class HeldChange:
    """A list the mass-change guard stopped; applied only by ``walled-garden approve``."""

    update: ListUpdate
    restricting: int
    lifting: int
    since: float
    why: str


@dataclass(frozen=True)
class Undo:
    """What a change of one subscriber's inputs replaced, to put back if it cannot be applied."""

    inputs: policy.Snapshot
    billing: dict[str, float] | None


@dataclass
class Pending:
    """A verified event waiting for its batch; ``answer`` resolves after commit and flush."""

    event: Event
    received: float
    answer: asyncio.Future[tuple[int, dict[str, Any]]]


def policy_rules(config: Config) -> policy.Rules:
    return policy.Rules(windows=config.policy.windows, escalation=config.policy.escalation)


def enforced_row(decision: Decision) -> tuple[str, list[str], str]:
    """A restricted decision as an ``enforced`` table row: (mode, addresses, reason)."""
    assert decision.subscriber is not None
    return decision.mode.value, [str(a) for a in decision.subscriber.addresses], decision.subscriber.reason


def enforced_before(store: Store) -> dict[str, Decision]:
    out = {}
    for sid, row in store.enforced().items():
        try:
            mode = Mode(row["mode"])
            subscriber = Subscriber(sid, tuple(ipaddress.ip_network(a) for a in row["addresses"]), mode,
                                    row["reason"])
        except ValueError:
            continue
        out[sid] = Decision(sid, mode, "enforced before the restart", subscriber)
    return out


def held(decision: Decision) -> tuple[Network, ...]:
    """The networks a decision puts in the kernel (none when free)."""
    if decision.restricted and decision.subscriber is not None:
        return decision.subscriber.addresses
    return ()


def newest_receipt(inputs: policy.PolicyInputs) -> float:
    """The newest receipt instant stored, so receipt order survives a restart after a clock step."""
    instants = [o.at for o in inputs.overrides.values()]
    instants += [g.paid_at for g in inputs.graces.values()]
    instants += [r.at for r in inputs.readdressed.values()]
    instants += [e.set_at for by_category in inputs.exemptions.values() for e in by_category.values()]
    instants += [p.made_at for history in inputs.promises.values() for p in history]
    return max(instants, default=0.0)


def base_layout(config: Config) -> Layout:
    return Layout(table=config.gateway.table, interfaces=config.gateway.subscriber_interfaces,
                  allow=config.walled_garden.allow_networks, dns=config.walled_garden.dns,
                  portal_port=config.portal.listen.port, throttle_rate=config.policy.throttle_rate,
                  throttle_burst=config.policy.throttle_burst,
                  portal_tls_port=config.portal.tls.listen.port if config.portal.tls else None)


class Enforcer:
    def __init__(self, config: Config, dataplane: Dataplane | None = None, conntrack: Conntrack | None = None,
                 clock: Callable[[], float] = time.time, store: Store | None = None,
                 monotonic: Callable[[], float] | None = None) -> None:
        """``clock`` is the wall clock; ``monotonic`` the clock it is checked against for steps
        (default: ``time.monotonic`` with the real clock; a test's own clock is its own
        monotonic one unless it passes another, so advancing it is time passing, not a step)."""
        if dataplane is None:
            from .dataplane.kernel import KernelDataplane
            dataplane = KernelDataplane(config.gateway.table)
        self.config = config
        self.clock = clock
        self.store = store or Store(config.state_dir)
        self.inputs = self.store.load_inputs()
        self.inputs.rules = policy_rules(config)
        # Inputs are ordered by receipt (receipt_clock), billing's events by billing's clock
        # among themselves (billing_order); never one clock against the other.
        if monotonic is None:
            monotonic = time.monotonic if clock is time.time else clock
        self.receipts = ReceiptClock(clock, floor=newest_receipt(self.inputs), monotonic=monotonic)
        self.billing_order = BillingOrder(self.store.billing_order())
        self.metrics = Metrics()
        self.reconciler = Reconciler(dataplane, base_layout(config))
        self.conntrack = conntrack or Conntrack()
        if isinstance(self.conntrack, Conntrack):
            self.conntrack.observe = lambda dump, seconds: self.metrics.conntrack_seconds.labels(dump).observe(seconds)
        self.lock = asyncio.Lock()
        # What the kernel enforces, per subscriber; seeded from state so that a restart outside
        # an enforcement window keeps (and does not newly start) restrictions.
        self.decisions: dict[str, Decision] = enforced_before(self.store)
        self.waiting: set[str] = set()       # restrictions held until the enforcement window opens
        self.conflicts: dict[str, dict[str, Any]] = {}
        self.rebuilding: set[tuple[str, str]] | None = None
        self.unsaved_list: ListUpdate | None = None   # a list whose saving failed, retried by the timer
        self.unsaved_approval = ""
        self._moved_unsaved: set[str] = set()   # graces/promises moved by a clock step, not yet saved
        self._full_check = time.monotonic()
        self.table_repairs = 0        # drift found by verify_table (status)   # kernel keys kept until the list (restore)
        self.claims = ClaimsIndex()
        self.space = AddressSpace.from_config(config)   # where subscribers' addresses may lie   # who holds which addresses in the kernel (rebuilt by sync_all)   # decisions not enforced: an address is another's
        self._escalated = 0.0
        self.outbox_wake = asyncio.Event()   # a new outgoing webhook is waiting
        self.mode_counts: dict[Mode, int] = {}
        self._kernel_thread = ThreadPoolExecutor(1, thread_name_prefix="nft")
        self._changed = asyncio.Event()   # wakes the timer when graces change
        self._background: set[asyncio.Task[Any]] = set()
        self._pruned = time.monotonic()
        self._inflight: dict[str, asyncio.Future[tuple[int, dict[str, Any]]]] = {}
        self.batcher: Batcher[Pending] = Batcher(self._commit_batch)
        self.held: HeldChange | None = None
        self.acknowledged: dict[str, float] = {}   # notice acknowledgements we made (kernel keeps the truth)
        self._references: dict[str, str] = {}
        key = self.store.get_meta("reference_key")
        if not (isinstance(key, str) and len(key) == 32 and all(c in "0123456789abcdef" for c in key)):
            if key is not None:   # a damaged row: a new key changes the codes, never stops the start
                log.error("event=reference_key_unusable (a new one is made; earlier reference codes change)")
            key = None
        if key is None:
            key = secrets.token_hex(16)
            self.store.set_meta("reference_key", key)
        self._reference_key = bytes.fromhex(key)
        meta = self.store.get_meta("list")
        self.list_status: dict[str, Any] = meta if isinstance(meta, dict) else {}
        self.source_error: dict[str, Any] | None = None
        self.last_sync: dict[str, Any] = {}
        self.supervisor: Any = None  # set by the Service; status shows its tasks
        self.metrics.list_entries.set(len(self.inputs.listed))
        self.metrics.observe(self)

    # -- time -----------------------------------------------------------------------------
    def _now(self) -> float:
        """The instant to decide at (caller holds the lock).

        A forward step of the wall clock first moves the ends of graces and promises by as
        much (``receipt_clock``): a jump never ends anyone's freedom early."""
        jump = self.receipts.step()
        if jump:
            moved = policy.clock_stepped(self.inputs, jump, self.clock())
            log.warning("event=clock_stepped_forward seconds=%.1f graces_and_promises_moved=%d", jump, len(moved))
            self._moved_unsaved |= moved
        if self._moved_unsaved:   # saved with the next chance; until then they live in memory
            try:
                self.store.save_subscribers(self.inputs, self._moved_unsaved)
                self._moved_unsaved = set()
            except (StoreError, sqlite3.Error) as exc:
                log.error("event=moved_graces_not_saved count=%d error=%r (kept in memory; saved on the next "
                          "input)", len(self._moved_unsaved), str(exc))
        return self.clock()

    # -- kernel ---------------------------------------------------------------------------
    async def _kernel(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._kernel_thread, fn, *args)

    async def sync_all(self, read_kernel: bool = False) -> SyncResult:
        """Make the whole table match the policy now (caller holds the lock)."""
        if self.rebuilding is not None:
            raise DataplaneError("the state was lost: the kernel table is kept as it is until the list arrives")
        now = self._now()
        decisions = self.inputs.decide_all(now, self.decisions)
        started = time.perf_counter()
        try:
            result = await self._kernel(self.reconciler.sync_all, decisions, read_kernel)
        except DataplaneError as exc:
            self.metrics.sync_failures.inc()
            log.error("event=sync_failed kind=full error=%r", str(exc))
            raise
        self._synced(result, time.perf_counter() - started)
        self.claims.rebuild({sid: held(d) for sid, d in self.reconciler.owned.items()})
        self._note_clashes(decisions)
        for sid in self.conflicts.keys() & decisions.keys():   # what the kernel holds for them, not their wish
            decisions[sid] = self.reconciler.owned.get(sid) or Decision(sid, Mode.FREE, "an address of theirs "
                                                                        "is enforced for another subscriber")
        previous, self.decisions = self.decisions, decisions
        try:
            await asyncio.to_thread(self._record_enforced, decisions, (), True, previous)  # 100k: off the loop
        except (StoreError, sqlite3.Error) as exc:   # the kernel is right; the record catches up next sync
            log.error("event=enforced_not_recorded kind=full error=%r (status and audit lag until the next "
                      "sync)", str(exc))
        self._spawn(self._flush(result.changed, "sync"))
        # The list, decisions and mirror are ~1M long-lived objects: without this every
        # generation-2 collection walks them all (0.5-1.5 s with 100k subscribers, measured),
        # a pause that stalls every webhook in flight. Frozen objects are still freed by
        # reference counting when a later list replaces them.
        gc.freeze()
        return result

    async def _update(self, decisions: dict[str, Decision], note: str = "",
                      deferred: list[EnforcedWrite] | None = None) -> SyncResult:
        """Apply a few subscribers' decisions as a diff (caller holds the lock).

        With ``deferred`` the state-table writes are appended there for the caller to commit
        together with its own (a webhook batch: one SQLite commit instead of three)."""
        started = time.perf_counter()
        undo = self._claim(decisions)
        try:
            result = await self._kernel(self.reconciler.update, decisions)
        except NeedsFullSync:
            return await self.sync_all()
        except (DataplaneError, AddressConflict) as exc:
            for sid, previous in reversed(undo):
                self.claims.claim(sid, previous)
            if isinstance(exc, AddressConflict):
                raise
            self.metrics.sync_failures.inc()
            log.error("event=sync_failed kind=partial error=%r", str(exc))
            raise
        self._synced(result, time.perf_counter() - started)
        previous = {sid: self.decisions[sid] for sid in decisions if sid in self.decisions}
        self.decisions.update(decisions)
        write = self._record_enforced(decisions, removed=[s for s, d in decisions.items() if not d.restricted],
                                      previous=previous, note=note, persist=deferred is None)
        if deferred is not None:
            deferred.append(write)
        return result

    def _note_clashes(self, decisions: Mapping[str, Decision]) -> None:
        """After a full sync: a restriction the reconciler left out (its address is another's)
        is a conflict, reported and retried like the timer's (``_update_resolving``)."""
        owned = self.reconciler.owned
        for sid, decision in decisions.items():
            if decision.restricted and sid not in owned:
                holder = next((h for n in held(decision) for h in [self._holder(n)] if h and h != sid), "another")
                if sid not in self.conflicts:
                    log.warning("event=address_conflict subscriber=%s cause=sync held_by=%s (not enforced; "
                                "retried each timer round)", sid, holder)
                self.conflicts[sid] = {"detail": f"an address is enforced for subscriber {holder}",
                                       "since": self.conflicts.get(sid, {}).get("since", self.clock()),
                                       "wanted": decision.mode.value}
            else:
                self.conflicts.pop(sid, None)

    def _holder(self, network: Network) -> str | None:
        conflict = self.claims.conflict("", [network])
        return conflict.holder if conflict is not None else None

    def _claim(self, decisions: dict[str, Decision]) -> list[tuple[str, tuple[Network, ...]]]:
        """Claim the decisions' addresses (releases first), or raise ``AddressConflict`` having
        claimed nothing; returns what the claims replaced, to put back if the kernel fails."""
        undo: list[tuple[str, tuple[Network, ...]]] = []
        for sid, decision in sorted(decisions.items(), key=lambda item: item[1].restricted):
            conflict = self.claims.conflict(sid, held(decision))
            if conflict is not None:
                for done, previous in reversed(undo):
                    self.claims.claim(done, previous)
                raise AddressConflict(str(conflict))
            undo.append((sid, self.claims.claim(sid, held(decision))))
        return undo

    async def _update_resolving(self, decisions: dict[str, Decision], why: str) -> SyncResult:
        """``_update`` for changes nobody waits on (timers): a subscriber whose new decision
        claims an address another subscriber holds keeps what is enforced now, reported in
        ``conflicts`` (and retried each timer round), while everyone else's change applies.
        One reassigned address must never stop graces, promises and windows for all."""
        try:
            result = await self._update(decisions)
        except AddressConflict:
            result = None
        if result is not None:
            for sid in decisions:
                self.conflicts.pop(sid, None)
            return result
        merged = SyncResult("partial", 0, [])
        for sid, decision in decisions.items():
            try:
                one = await self._update({sid: decision})
            except AddressConflict as exc:
                if sid not in self.conflicts:
                    log.warning("event=address_conflict subscriber=%s cause=%s detail=%r (kept as enforced; "
                                "retried each timer round)", sid, why, str(exc))
                self.conflicts[sid] = {"detail": str(exc), "since": self.conflicts.get(sid, {}).get(
                    "since", self.clock()), "wanted": decision.mode.value}
                continue
            self.conflicts.pop(sid, None)
            merged.elements += one.elements
            merged.changed += one.changed
            merged.kind = "full" if one.kind == "full" else merged.kind
        return merged

    def _synced(self, result: SyncResult, seconds: float) -> None:
        self.metrics.sync_seconds.labels(result.kind).observe(seconds)
        self.metrics.last_sync.set(self.clock())
        self.last_sync = {"kind": result.kind, "at": self.clock(), "seconds": round(seconds, 6),
                          "elements": result.elements}
        log.info("event=sync kind=%s elements=%d seconds=%.4f changed=%d", result.kind, result.elements,
                 seconds, len(result.changed))

    def _record_enforced(self, decisions: dict[str, Decision], removed: Any, full: bool = False,
                         previous: dict[str, Decision] | None = None, note: str = "",
                         persist: bool = True) -> EnforcedWrite:
        """Keep mode counts and the ``enforced`` table current; O(changed), except on full syncs.

        Returns the table writes; ``persist=False`` leaves committing them to the caller."""
        if full or previous is None:
            self.mode_counts = {}
            for decision in self.decisions.values():
                if decision.restricted:
                    self.mode_counts[decision.mode] = self.mode_counts.get(decision.mode, 0) + 1
        else:
            for sid, decision in decisions.items():
                old = previous.get(sid)
                if old is not None and old.restricted:
                    self.mode_counts[old.mode] -= 1
                if decision.restricted:
                    self.mode_counts[decision.mode] = self.mode_counts.get(decision.mode, 0) + 1
        self.metrics.set_modes(self.mode_counts)
        if full and previous:  # write only what changed: a 1 % churn must not rewrite 100k rows
            changed = {sid: d for sid, d in decisions.items() if previous.get(sid) != d}
            gone = {sid for sid, d in previous.items() if d.restricted and not (sid in decisions and
                                                                             decisions[sid].restricted)}
        else:
            changed = decisions
            gone = set(removed) | ((set(self.store.enforced()) - set(decisions)) if full else set())
        rows = {sid: enforced_row(d) for sid, d in changed.items() if d.restricted and d.subscriber}
        gone |= {sid for sid, d in changed.items() if not d.restricted}
        write = EnforcedWrite(rows, gone, audit_rows(previous or {}, decisions, self.clock(), note))
        if persist:
            self.store.record_state([write])
        if full:
            self.waiting = {sid for sid, d in decisions.items() if d.pending is not None}
        else:
            self.waiting.difference_update(decisions)
            self.waiting.update(sid for sid, d in decisions.items() if d.pending is not None)
        self.metrics.waiting.set(len(self.waiting))
        return write

    async def _flush(self, networks: set[Network], why: str) -> int | None:
        if not networks:
            return 0
        try:
            # The portal's own connections survive: the page confirming a lift must arrive.
            deleted = await self.conntrack.flush(networks, keep_mark=PORTAL_CT_MARK)
        except (ConntrackError, OSError) as exc:
            self.metrics.conntrack_failures.inc()
            log.error("event=conntrack_flush_failed cause=%s error=%r", why, str(exc))
            return None
        self.metrics.conntrack_flushed.inc(deleted)
        log.info("event=conntrack_flushed cause=%s networks=%d entries=%d", why, len(networks), deleted)
        return deleted

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- start-up -------------------------------------------------------------------------
    async def restore(self) -> SyncResult | None:
        """Enforce what the state says, reconciling with whatever the kernel holds.

        With no state at all (a quarantined or deleted database) but our table in the kernel,
        the table is left enforcing exactly as it is until the list arrives: an empty state
        would otherwise free everyone the kernel restricts. ``_rebuild`` then rebuilds from
        the kernel and the list (see there); kernel changes wait for it (503 to billing)."""
        async with self.lock:
            if not self.inputs.known_ids() and self.store.get_meta("list") is None:
                kernel = await self._kernel(self.reconciler.dataplane.read)
                view = with_mode_view(kernel)
                restricted = {(c, k) for c, items in (view.elements if view else {}).items()
                              if c.startswith(MODE_PREFIX) for k in items}
                if restricted:
                    self.rebuilding = restricted
                    log.error("event=state_empty_kernel_enforcing restricted_keys=%d (the kernel table is kept "
                              "as it is until the list arrives; then enforcement is rebuilt from both)",
                              len(restricted))
                    return None
            result = await self.sync_all(read_kernel=True)
        log.info("event=restored restricted=%d kind=%s", sum(self.mode_counts.values()), result.kind)
        return result

    def _rebuild(self, new: dict[str, Subscriber]) -> None:
        """The first list after the state was lost (caller holds the lock): a listed subscriber
        whom the kernel held free was free for a reason the lost state knew (a payment, a
        promise, an exemption), so they get a payment grace from now rather than being walled
        again; a kernel restriction the list does not name is lifted (billing's word is gone
        with the state, and billing retries its events)."""
        assert self.rebuilding is not None
        now = self.receipts.stamp()
        kept_free = []
        for sid, subscriber in new.items():
            keys = {(mode_map(version, plen), key) for version, plen, key in subscriber.keys}
            if not keys & self.rebuilding:
                policy.record_payment(self.inputs, sid, now, self.config.policy.payment_grace,
                                      "rebuilt after the state was lost: free in the kernel then", now)
                kept_free.append(sid)
        self.rebuilding = None
        self.store.save_subscribers(self.inputs, kept_free)
        log.warning("event=state_rebuilt listed=%d kept_free=%d", len(new), len(kept_free))

    # -- the list -------------------------------------------------------------------------
    async def on_list(self, update: ListUpdate, approved_by: str = "") -> None:
        new = {s.id: s for s in update.subscribers}
        async with self.lock:
            self.metrics.source_success.set(self.clock())
            if self.rebuilding is not None:
                self._rebuild(new)
                approved_by = "the rebuild from the kernel after the state was lost"
            if not approved_by:
                restricting, lifting = policy.preview_list(self.inputs, new, self.clock())
                restricted_now = sum(policy.weight(d.subscriber) for d in self.decisions.values() if d.restricted)
                why = policy.guard_reason(restricting, lifting, restricted_now,
                                          self.config.subscribers.guard)
                if why:
                    self.held = HeldChange(update, restricting, lifting, self.clock(), why)
                    self.source_error = None
                    self.metrics.held_changes.set(1)
                    log.warning("event=list_held origin=%s entries=%d restricting=%d lifting=%d why=%r "
                                "(walled-garden approve | reject)", update.origin, len(new), restricting, lifting, why)
                    return
            if approved_by:
                log.warning("event=list_approved by=%s origin=%s entries=%d", approved_by, update.origin, len(new))
            self.held = None
            self.metrics.held_changes.set(0)
            old, since = self.inputs.listed, dict(self.inputs.listed_since)
            saved = [self.inputs.snapshot(sid) for sid in policy.list_changes(old, new)]
            changed = policy.apply_list(self.inputs, new, self.clock())
            meta = {"origin": update.origin, "loaded_at": self.clock(), "entries": len(new),
                    "fingerprint": update.fingerprint}
            try:
                await asyncio.to_thread(self.store.save_list, old, new, meta, self.inputs.listed_since, changed)
            except (StoreError, sqlite3.Error, OSError) as exc:   # not durable, so not in force; retried
                self.inputs.listed, self.inputs.listed_since = old, since
                for snapshot in saved:
                    self.inputs.restore(snapshot)
                self._report_source_failure(SourceFailure(update.origin, "state",
                                                          f"the list could not be saved: {exc}"))
                self.unsaved_list, self.unsaved_approval = update, approved_by   # the timer tries again
                self._changed.set()
                return
            self.unsaved_list = None
            self.list_status, self.source_error = meta, None
            self.metrics.list_entries.set(len(new))
            log.info("event=list_accepted origin=%s entries=%d changed=%d", update.origin, len(new), len(changed))
            try:
                await self._apply_list_changes(changed, update.origin)
            except DataplaneError:
                self._changed.set()  # the repair loop retries

    async def _apply_list_changes(self, changed: set[str], origin: str) -> None:
        """Re-decide only the subscribers whose entry changed, as an element diff (caller holds
        the lock). A whole pass over 100k decisions took ~2 s of a 1 % churn's ~3.5 s, all
        under the lock that every webhook waits for. A first list, a needed full sync, a new
        prefix length or an address claimed twice still go through ``sync_all``, which
        resolves conflicts for the whole table."""
        if self.reconciler.needs_full or len(changed) * 2 > max(len(self.decisions), 1):
            await self.sync_all()
            return
        if not changed:
            return
        now = self._now()
        decisions = {sid: self.inputs.decide(sid, now, self.decisions.get(sid)) for sid in sorted(changed)}
        try:
            result = await self._update(decisions)
        except AddressConflict as exc:
            log.warning("event=list_conflict origin=%s detail=%r (applying the list in a full pass)", origin, str(exc))
            await self.sync_all()
            return
        if result.kind == "partial":   # a full sync (new prefix length) has flushed already
            self._spawn(self._flush(set(result.changed), "list"))
        gc.freeze()   # the new list's objects live on; see sync_all

    async def on_source_unchanged(self, origin: str) -> None:
        """The source answered 'not modified': the list in force is still current."""
        self.metrics.source_success.set(self.clock())
        self.source_error = None

    async def approve(self, actor: str, note: str) -> tuple[int, dict[str, Any]]:
        held = self.held
        if held is None:
            return 409, {"error": "no change is held"}
        await self.on_list(held.update, approved_by=f"{actor} ({note or 'no reason given'})")
        return 200, {"approved": True, "restricting": held.restricting, "lifting": held.lifting,
                     "origin": held.update.origin}

    async def reject(self, actor: str, note: str) -> tuple[int, dict[str, Any]]:
        async with self.lock:
            held, self.held = self.held, None
            self.metrics.held_changes.set(0)
        if held is None:
            return 409, {"error": "no change is held"}
        log.warning("event=list_rejected_by_operator by=%s reason=%r origin=%s restricting=%d lifting=%d",
                    actor, note, held.update.origin, held.restricting, held.lifting)
        return 200, {"rejected": True, "origin": held.update.origin,
                     "note": "the list in force stays; a new export is evaluated again"}

    async def operator_change(self, actor: str, subscriber_id: str, restrict: bool, note: str,
                              mode: str | None = None, addresses: list[str] | None = None
                              ) -> tuple[int, dict[str, Any]]:
        """``walled-garden restrict|lift``: an override like a billing event, attributed to a person."""
        subscriber = None
        if restrict:
            known = self.inputs.listed.get(subscriber_id) or (self.decisions.get(subscriber_id) or
                                                              Decision(subscriber_id, Mode.FREE, "")).subscriber
            raw = {"id": subscriber_id,
                   "addresses": addresses or ([str(a) for a in known.addresses] if known else None),
                   "mode": mode or (known.mode.value if known else None),
                   "reason": known.reason if known else None}
            issues: list[Any] = []
            subscriber = validate_entry(raw, "request", issues)
            if subscriber is None:
                hint = "" if addresses or known else " (this subscriber is not on the list: give --address)"
                return 400, {"error": "; ".join(i.message for i in issues) + hint}
        event = Event(f"op-{secrets.token_hex(8)}", RESTRICTED if restrict else RELEASED, self.clock(), subscriber_id,
                      subscriber, actor=actor, note=note)
        log.warning("event=operator_action by=%s action=%s subscriber=%s reason=%r", actor,
                    "restrict" if restrict else "lift", subscriber_id, note)
        return await self.handle_event(event, time.perf_counter())

    async def on_source_failure(self, failure: SourceFailure) -> None:
        self._report_source_failure(failure)

    def _report_source_failure(self, failure: SourceFailure) -> None:
        self.metrics.source_failures.labels(failure.reason).inc()
        self.source_error = {"origin": failure.origin, "reason": failure.reason, "message": failure.message,
                             "at": self.clock()}
        log.error("event=list_rejected origin=%s reason=%s detail=%r (nothing changed)", failure.origin,
                  failure.reason, failure.message)

    # -- billing events ------------------------------------------------------------------------
    async def handle_event(self, event: Event, received: float) -> tuple[int, dict[str, Any]]:
        """Apply one verified event; answers only after the kernel commit and the flush."""
        return await asyncio.shield(self.submit_event(event, received))

    def submit_event(self, event: Event, received: float) -> asyncio.Future[tuple[int, dict[str, Any]]]:
        """Queue one verified event; the future resolves after the commit and the flush.

        A retry of an id still being processed gets the first one's future (and answer).
        No task per event: at 2,000 events/s the webhook worker's bridge only adds a callback.
        """
        inflight = self._inflight.get(event.id)
        if inflight is not None:
            self.metrics.events.labels(event.type, "duplicate").inc()
            return inflight
        pending = Pending(event, received, asyncio.get_running_loop().create_future())
        self._inflight[event.id] = pending.answer

        def done(future: asyncio.Future[Any], event_id: str = event.id) -> None:
            if self._inflight.get(event_id) is future:
                del self._inflight[event_id]

        pending.answer.add_done_callback(done)
        self.batcher.submit(pending)
        return pending.answer

    async def _commit_batch(self, batch: list["Pending"]) -> None:
        """Commit a batch; whatever goes wrong, no webhook request is left waiting."""
        try:
            await self._commit_events(batch)
        except Exception as exc:
            log.exception("event=batch_failed size=%d", len(batch))
            for item in batch:
                if not item.answer.done():
                    item.answer.set_result((503, {"error": f"internal error, retry later: {exc}",
                                                  "id": item.event.id}))

    async def _commit_events(self, batch: list["Pending"]) -> None:
        """Apply a burst of events: policy per event, one kernel transaction, one flush round."""
        answers: dict[int, tuple[int, dict[str, Any]]] = {}
        applied: list[tuple[int, str, Undo]] = []
        touched: dict[str, Decision] = {}
        claimed: list[tuple[str, tuple[Network, ...]]] = []   # what the batch's claims replaced
        result: SyncResult | None = None
        writes: list[EnforcedWrite] = []
        async with self.lock:
            now = self._now()
            known = self.store.event_answers(item.event.id for item in batch)
            for index, item in enumerate(batch):
                event, sid = item.event, item.event.subscriber_id
                prior = known.get(event.id)
                if prior is not None:
                    self.metrics.events.labels(event.type, "duplicate").inc()
                    answers[index] = prior
                    continue
                outside = self._outside(event.subscriber)
                if outside:
                    self.metrics.events.labels(event.type, "invalid").inc()
                    answers[index] = (400, {"error": outside, "id": event.id})
                    continue
                stale = self.billing_order.stale(event)
                if stale:
                    answers[index] = (200, {"id": event.id, "result": "ignored", "detail": stale})
                    self.metrics.events.labels(event.type, "stale").inc()
                    continue
                saved = self._save_inputs(sid)
                self._apply_event(event, now)
                decision = self.inputs.decide(sid, now, self.decisions.get(sid))
                conflict = self.claims.conflict(sid, held(decision))
                if conflict is not None:
                    self._restore_inputs(sid, saved)
                    self.metrics.events.labels(event.type, "conflict").inc()
                    answers[index] = (409, {"error": str(conflict), "id": event.id})
                    continue
                touched[sid] = decision
                claimed.append((sid, self.claims.claim(sid, held(decision))))
                applied.append((index, sid, saved))
            if touched:
                before = {sid: self.decisions.get(sid) or Decision(sid, Mode.FREE, "not enforced") for sid in touched}
                try:
                    result = await self._update(touched, deferred=writes)
                except (DataplaneError, AddressConflict) as exc:  # nothing of the batch was applied
                    for sid, previous in reversed(claimed):
                        self.claims.claim(sid, previous)
                    for index, sid, saved in reversed(applied):
                        self._restore_inputs(sid, saved)
                        event = batch[index].event
                        self.metrics.events.labels(event.type, "error").inc()
                        answers[index] = (503, {"error": f"kernel change failed, retry later: {exc}", "id": event.id})
                    applied = []
                    self._unjudge(answers, str(exc))
                committed = time.perf_counter()
                records = self._answers(batch, applied, touched, answers)
                if applied:   # before any answer: a restart must not undo what billing was told
                    try:
                        self.store.record_state(writes, self.inputs, touched, events=records,
                                                billing_order=self.billing_order.rows(sid for _, sid, _ in applied))
                    except (StoreError, sqlite3.Error) as exc:
                        await self._unapply(batch, applied, before, answers, exc)
                        applied, result = [], None
                for index, _, _ in applied:
                    self.metrics.event_to_enforce.observe(committed - batch[index].received)
                self._changed.set()
            elif any(status == 200 for status, _ in answers.values()):   # only "ignored" ones to remember
                try:
                    self.store.record_events(self._answers(batch, [], {}, answers), None)
                except (StoreError, sqlite3.Error) as exc:
                    log.warning("event=answers_not_saved error=%r (a retry is weighed again)", str(exc))
        self._spawn(self._finish_batch(batch, answers, applied, result))

    def _answers(self, batch: list["Pending"], applied: list[tuple[int, str, Undo]], touched: dict[str, Decision],
                 answers: dict[int, tuple[int, dict[str, Any]]]) -> list[tuple[str, int, dict[str, Any], str | None]]:
        """The 200 answers of a batch, made at its commit and saved with its state: what a retry
        of the same webhook-id gets. ``connections_flushed`` is filled in after the flush (and
        the saved copy with it; should that write fail, a replay says null)."""
        records: list[tuple[str, int, dict[str, Any], str | None]] = []
        for index, sid, _ in applied:
            event, decision = batch[index].event, touched[sid]
            answer: dict[str, Any] = {"id": event.id, "result": "applied", "subscriber": sid,
                                      "mode": decision.mode.value, "cause": decision.cause,
                                      "connections_flushed": None}
            if decision.until:
                answer["until"] = decision.until
            answers[index] = (200, answer)
            records.append((event.id, 200, answer, sid))
        records += [(batch[i].event.id, status, answer, None) for i, (status, answer) in answers.items()
                    if status == 200 and answer.get("result") == "ignored"]
        return records

    @staticmethod
    def _unjudge(answers: dict[int, tuple[int, dict[str, Any]]], why: str) -> None:
        """The batch was not applied: an event it judged stale may have been judged so by a
        sibling that is now undone, so it is answered 503 too and weighed again on its retry."""
        for index, (status, answer) in list(answers.items()):
            if status == 200 and answer.get("result") == "ignored":
                answers[index] = (503, {"error": f"the batch could not be applied, retry later: {why}",
                                        "id": answer.get("id")})

    async def _unapply(self, batch: list["Pending"], applied: list[tuple[int, str, Undo]],
                       before: dict[str, Decision], answers: dict[int, tuple[int, dict[str, Any]]],
                       exc: Exception) -> None:
        """The batch is in the kernel but could not be saved: not durable, so not done. Its
        inputs are put back and the kernel returns to what it enforced before (caller holds the
        lock); billing gets 503 and retries. Should the kernel refuse the way back, the timer's
        full sync (from the restored inputs) repairs it."""
        log.error("event=batch_not_saved size=%d error=%r (kernel change undone; billing retries)", len(applied),
                  str(exc))
        for index, sid, saved in reversed(applied):
            self._restore_inputs(sid, saved)
            event = batch[index].event
            self.metrics.events.labels(event.type, "error").inc()
            answers[index] = (503, {"error": f"state could not be saved, retry later: {exc}", "id": event.id})
        self._unjudge(answers, str(exc))
        try:
            await self._update(before, deferred=[])
        except (DataplaneError, AddressConflict):
            self.reconciler.needs_full = True
        self._changed.set()

    async def _finish_batch(self, batch: list["Pending"], answers: dict[int, tuple[int, dict[str, Any]]],
                            applied: list[tuple[int, str, Any]], result: SyncResult | None) -> None:
        """After the commit: flush connections once for the batch, record answers, reply."""
        try:
            flushed = await self._flush(set(result.changed), f"{len(applied)} event(s)") if result else 0
            for index, sid, _ in applied:
                event = batch[index].event
                _, answer = answers[index]
                answer["connections_flushed"] = flushed
                self.metrics.events.labels(event.type, "applied").inc()
                log.info("event=billing_event id=%s type=%s subscriber=%s mode=%s", event.id, event.type, sid,
                         answer["mode"])
            if applied:   # the saved answers gain the flush count, so a replay gets the very same answer
                try:
                    async with self.lock:
                        self.store.record_events([(batch[i].event.id, 200, answers[i][1], None)
                                                  for i, _, _ in applied], None)
                except (StoreError, sqlite3.Error) as exc:   # the saved answer stands: answer the same
                    log.warning("event=answers_not_updated error=%r (connections_flushed stays null)", str(exc))
                    for index, _, _ in applied:
                        answers[index][1]["connections_flushed"] = None
        except Exception as exc:  # answer every waiter whatever went wrong
            log.exception("event=batch_finish_failed")
            for index in range(len(batch)):
                answers.setdefault(index, (503, {"error": f"internal error: {exc}"}))
        for index, item in enumerate(batch):
            if not item.answer.done():
                item.answer.set_result(answers.get(index, (503, {"error": "not processed"})))

    def _outside(self, subscriber: Subscriber | None) -> str:
        """Why an event's or operator's addresses may not be enforced here (SPEC §8), or ''."""
        for network in subscriber.addresses if subscriber is not None else ():
            problem = self.space.problem(network)
            if problem:
                return problem if problem.startswith(str(network)) else f"{network} is {problem}"
        return ""

    def _apply_event(self, event: Event, now: float) -> None:
        """One event into the policy inputs, stamped with its receipt instant (``receipt_clock``)."""
        sid, at = event.subscriber_id, self.receipts.stamp()
        cause = (f"operator {event.actor}: {event.note or 'no reason given'}" if event.actor
                 else f"event {event.id} ({event.type})")
        self.billing_order.record(event)
        if event.type == PAYMENT:
            promise = self.inputs.promise(sid)
            if promise is not None and promise.active(now):
                self.metrics.promises.labels("kept").inc()
            policy.record_payment(self.inputs, sid, at, self.config.policy.payment_grace, cause, at)
        elif event.type == RESTRICTED:
            policy.record_override(self.inputs, sid, Override(True, at, cause, event.subscriber))
        elif event.type == RELEASED:
            policy.record_override(self.inputs, sid, Override(False, at, cause))
        elif event.type == READDRESSED:
            assert event.subscriber is not None
            self.inputs.readdressed[sid] = policy.Readdress(event.subscriber.addresses, at, cause)
        elif event.type in EXEMPTION_OPENED:
            until = event.until or at + self.config.policy.exemption_default
            policy.record_exemption(self.inputs, sid, Exemption(EXEMPTION_OPENED[event.type], until, event.note,
                                                                f"event {event.id}", at))
        elif event.type in EXEMPTION_CLOSED:
            policy.clear_exemption(self.inputs, sid, EXEMPTION_CLOSED[event.type])

    def _save_inputs(self, sid: str) -> "Undo":
        """One subscriber's inputs, to put back if their change cannot be applied."""
        return Undo(self.inputs.snapshot(sid), self.billing_order.snapshot(sid))

    def _restore_inputs(self, sid: str, saved: "Undo") -> None:
        self.inputs.restore(saved.inputs)
        self.billing_order.restore(sid, saved.billing)

    # -- time ---------------------------------------------------------------------------------
    async def timers(self, stop: asyncio.Event) -> None:
        """Expire graces, promises and exemptions at their instant, start restrictions that waited
        for the enforcement window, climb the escalation ladder, and repair the kernel table."""
        while not stop.is_set():
            now = self.clock()
            due = self.inputs.next_change(now, waiting=bool(self.waiting))
            if self.inputs.rules.escalation:
                check = self._escalated + ESCALATION_SECONDS
                due = min(due, check) if due else check
            wait = RESYNC_SECONDS if self.reconciler.needs_full else min(due - now if due else PRUNE_SECONDS,
                                                                         PRUNE_SECONDS)
            if self.conflicts:
                wait = min(wait, CONFLICT_RETRY_SECONDS)
            if self.unsaved_list is not None:
                wait = min(wait, RESYNC_SECONDS)
            self._changed.clear()
            stopper = asyncio.ensure_future(stop.wait())
            changed = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait({stopper, changed}, timeout=max(wait, 0.0), return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            changed.cancel()
            if stop.is_set():
                return
            try:
                await self._tick()
            except DataplaneError:
                pass  # logged and counted; retried on the next round
            if self.unsaved_list is not None:
                await self.on_list(self.unsaved_list, approved_by=self.unsaved_approval)

    async def _tick(self) -> None:
        async with self.lock:
            if time.monotonic() - self._pruned > PRUNE_SECONDS:
                self._pruned = time.monotonic()
                pruned = self.store.prune_events()
                if pruned:
                    log.info("event=webhook_ids_pruned count=%d", pruned)
                aged = self.store.prune_audit(self.clock() - self.config.policy.audit_retention)
                if aged:
                    log.info("event=audit_rows_pruned count=%d", aged)
            if self.reconciler.needs_full:
                await self.sync_all(read_kernel=True)
                return
            now = self._now()
            lapsing = sum(1 for h in self.inputs.promises.values()
                          if h and h[-1].outcome == "active" and h[-1].until <= now)
            expired = policy.expire(self.inputs, now)
            self.metrics.promises.labels("lapsed").inc(lapsing)
            opened = set(self.waiting) if self.waiting and self.inputs.rules.windows.is_open(now) else set()
            escalating: set[str] = set()
            if self.inputs.rules.escalation and now >= self._escalated + ESCALATION_SECONDS:
                self._escalated = now
                escalating = policy.escalation_due(self.inputs, now, self.decisions)
            todo = expired | opened | escalating | set(self.conflicts)
            if not todo:
                return
            if expired:
                try:
                    await asyncio.to_thread(self.store.save_subscribers, self.inputs, expired)
                except (StoreError, sqlite3.Error) as exc:   # what ended is gone from memory: enforce it
                    log.error("event=expiry_not_saved count=%d error=%r (enforced anyway; they expire again "
                              "after a restart)", len(expired), str(exc))
            decisions = {sid: self.inputs.decide(sid, now, self.decisions.get(sid)) for sid in todo}
            result = await self._update_resolving(decisions, "policy timer")
            self._count_exemptions()
        log.info("event=policy_timer expired=%d window_opened=%d escalated=%d changed_networks=%d", len(expired),
                 len(opened), len(escalating), len(result.changed))
        await self._flush(result.changed, "policy timer")

    def _count_exemptions(self) -> None:
        self.metrics.exemptions.set(sum(len(e) for e in self.inputs.exemptions.values()))

    async def set_garden_addresses(self, addresses: set[str]) -> None:
        """Addresses of ``walled_garden.allow`` hostnames, as resolved now."""
        async with self.lock:
            try:
                await self._kernel(self.reconciler.set_host_allow, addresses)
            except DataplaneError as exc:
                log.error("event=garden_hosts_not_applied error=%r", str(exc))
                self._changed.set()

    # -- exemptions, promises, audit ----------------------------------------------------------
    async def _change_inputs(self, sid: str, change: Callable[[float], None], note: str
                             ) -> tuple[int, dict[str, Any]]:
        """Apply a policy-input change for one subscriber: decide, commit, persist, audit, flush."""
        async with self.lock:
            now = self._now()
            saved = self._save_inputs(sid)
            change(self.receipts.stamp())   # the change is ordered by its receipt (receipt_clock)
            previous = self.decisions.get(sid)
            decision = self.inputs.decide(sid, now, previous)
            writes: list[EnforcedWrite] = []
            try:
                result = await self._update({sid: decision}, note, deferred=writes)
            except (DataplaneError, AddressConflict) as exc:
                self._restore_inputs(sid, saved)
                return 503 if isinstance(exc, DataplaneError) else 409, {"error": str(exc)}
            if audit_state(previous) == audit_state(decision):   # no mode change: record the action itself
                writes.append(EnforcedWrite(audit=[(now, sid, audit_state(decision), audit_state(decision), note)]))
            try:
                await asyncio.to_thread(self.store.record_state, writes, self.inputs, [sid])
            except (StoreError, sqlite3.Error) as exc:   # not durable, so not done: back as it was
                log.error("event=change_not_saved subscriber=%s error=%r (kernel change undone)", sid, str(exc))
                self._restore_inputs(sid, saved)
                try:
                    await self._update({sid: previous or Decision(sid, Mode.FREE, "not enforced")}, deferred=[])
                except (DataplaneError, AddressConflict):
                    self.reconciler.needs_full = True
                    self._changed.set()
                return 503, {"error": f"state could not be saved, retry later: {exc}"}
            self._count_exemptions()
            self._changed.set()
        await self._flush(set(result.changed), note)
        return 200, {"subscriber": sid, "mode": decision.mode.value, "cause": decision.cause,
                     "until": decision.until, "pending": decision.pending.value if decision.pending else None}

    async def exempt(self, actor: str, sid: str, category: str, until: float, note: str
                     ) -> tuple[int, dict[str, Any]]:
        """``walled-garden exempt``: keep a subscriber free until ``until`` whatever the list says."""
        if sid not in self.inputs.known_ids() and sid not in self.decisions:
            log.info("event=exemption_for_unknown subscriber=%s (kept; applies if they are listed later)", sid)
        exemption = Exemption(category, until, note, f"operator {actor}", 0.0)   # set_at: its receipt
        log.warning("event=exemption_set by=%s subscriber=%s category=%s until=%s note=%r", actor, sid, category,
                    policy.when(until), note)
        return await self._change_inputs(sid, lambda at: policy.record_exemption(self.inputs, sid,
                                                                                 replace(exemption, set_at=at)),
                                         f"exemption set by operator {actor}: {category} until "
                                         f"{policy.when(until)}: {note or 'no note'}")

    async def unexempt(self, actor: str, sid: str, category: str | None, note: str) -> tuple[int, dict[str, Any]]:
        current = self.inputs.exemptions.get(sid, {})
        if not current or (category and category not in current):
            return 404, {"error": f"{sid} has no {category + ' ' if category else ''}exemption"}
        log.warning("event=exemption_ended by=%s subscriber=%s category=%s note=%r", actor, sid, category or "all",
                    note)
        return await self._change_inputs(sid, lambda now: policy.clear_exemption(self.inputs, sid, category),
                                         f"exemption ({category or 'all'}) ended by operator {actor}: "
                                         f"{note or 'no note'}")

    def promise_eligibility(self, sid: str) -> Any:
        decision = self.decisions.get(sid)
        override = self.inputs.overrides.get(sid)
        mode = decision.mode if decision else Mode.FREE
        reason = decision.subscriber.reason if decision and decision.subscriber else ""
        ordered = bool(override and override.restrict and override.operator)
        return eligibility(self.config.policy.promise_to_pay, self.inputs.promises.get(sid, []), mode, reason,
                           ordered, self.clock())

    async def promise(self, address: str) -> tuple[int, dict[str, Any]]:
        """The portal's "I promise to pay" button: lift for the configured term, tell billing."""
        refused = await self._not_a_caller(address, "promise")
        if refused is not None:
            return refused
        found = self.lookup(address)
        sid = found["subscriber"]
        if not found["restricted"] or sid is None:
            return 409, {"error": "this connection is not restricted", "eligible": False, "why": "not_restricted"}
        verdict = self.promise_eligibility(sid)
        if not verdict.eligible:
            self.metrics.promises.labels("refused").inc()
            return 403, {"error": "a promise to pay is not available for this connection", "eligible": False,
                         "why": verdict.why}
        made: dict[str, Any] = {}

        class Refused(Exception):
            pass

        def record(now: float) -> None:
            # Again, under the lock: a second press (another address of theirs, a double click)
            # may have waited for the lock while the first one made its promise.
            again = self.promise_eligibility(sid)
            if not again.eligible:
                raise Refused(again.why)
            promise = Promise(sid, now, now + verdict.term, address=found["address"])
            policy.record_promise(self.inputs, promise)
            made.update(until=promise.until, made_at=now)
            if self.config.policy.promise_to_pay.webhook_url:
                message = made["message"] = f"wg_promise_{secrets.token_hex(12)}"
                self.store.add_outbox(message, {"type": "promise.made", "timestamp": policy.when(now), "data": {
                    "subscriber": sid, "until": policy.when(promise.until), "reference": self.reference(sid),
                    "address": found["address"]}}, now)
        try:
            status, answer = await self._change_inputs(sid, record, "promise to pay made on the portal")
        except Refused as exc:
            self.metrics.promises.labels("refused").inc()
            return 409 if str(exc) == "not_restricted" else 403, {
                "error": "a promise to pay is not available for this connection", "eligible": False, "why": str(exc)}
        if status != 200:
            if "message" in made:   # the kernel change failed and the promise was undone: billing must not hear of it
                self.store.outbox_delivered(made["message"])
            return status, answer
        self.metrics.promises.labels("made").inc()
        self.outbox_wake.set()
        log.warning("event=promise_made subscriber=%s address=%s until=%s", sid, found["address"],
                    policy.when(made["until"]))
        return 200, {"promised": True, "until": made["until"], "mode": answer["mode"]}

    def audit(self, subscriber: str | None, since: float | None, limit: int) -> list[dict[str, Any]]:
        return self.store.audit(subscriber, since, limit)

    # -- the portal's requests ------------------------------------------------------------
    async def acknowledge(self, address: str) -> tuple[int, dict[str, Any]]:
        """A notice/throttle subscriber pressed "continue": stop redirecting their HTTP for a while."""
        refused = await self._not_a_caller(address, "acknowledge")
        if refused is not None:
            return refused
        found = self.lookup(address)
        if not found["restricted"]:
            return 200, {"acknowledged": False, "mode": Mode.FREE.value}
        if found["mode"] == Mode.WALLED_GARDEN.value:
            return 409, {"error": "this connection is in the walled garden; it cannot be acknowledged away"}
        sid = found["subscriber"]
        seconds = int(self.config.portal.notice_ack_for)
        async with self.lock:
            decision = self.decisions.get(sid)
            if decision is None or decision.mode not in (Mode.NOTICE, Mode.THROTTLE):
                return 409, {"error": "the restriction changed; reload the page"}
            try:
                await self._kernel(self.reconciler.acknowledge, decision, seconds)
            except DataplaneError as exc:
                return 503, {"error": f"kernel change failed: {exc}"}
            until = self.clock() + seconds
            self.acknowledged[sid] = until
            state = audit_state(decision)
            try:   # audited like every portal action; the kernel change stands either way (it expires)
                self.store.append_audit([(self.clock(), sid, state, state, f"notice acknowledged on the portal "
                                          f"from {found['address']} until {policy.when(until)}")])
            except (StoreError, sqlite3.Error) as exc:
                log.error("event=audit_not_saved subscriber=%s error=%r", sid, str(exc))
        log.info("event=notice_acknowledged subscriber=%s address=%s until=%d", sid, found["address"], until)
        return 200, {"acknowledged": True, "until": until}

    async def _not_a_caller(self, address: str, action: str) -> tuple[int, dict[str, Any]] | None:
        """The portal may act only for an address the kernel saw connect to it recently (the
        table's ``portalcaller`` sets), so even a compromised portal process cannot promise or
        acknowledge for anyone else. ``None`` when the address may act."""
        try:
            seen = await asyncio.to_thread(self.reconciler.dataplane.reader().recent_caller, address)
        except DataplaneError as exc:
            return 503, {"error": f"cannot check the caller in the kernel: {exc}"}
        if seen:
            return None
        self.metrics.portal_refusals.labels(action).inc()
        log.warning("event=portal_action_refused action=%s address=%s why=not_a_recent_caller", action, address)
        return 403, {"error": "this address has not connected to the portal recently; reload the page",
                     "eligible": False, "why": "not_a_recent_caller"}

    async def portal_lookup(self, address: str) -> tuple[int, dict[str, Any]]:
        """``lookup`` for the portal: only of an address the kernel saw connect to the portal."""
        refused = await self._not_a_caller(address, "lookup")
        return refused if refused is not None else (200, self.lookup(address))

    def reference(self, subscriber_id: str) -> str:
        """A code for the portal page that support can resolve, which reveals nothing by itself."""
        code = self._references.get(subscriber_id)
        if code is None:
            digest = hmac.new(self._reference_key, subscriber_id.encode(), hashlib.sha256).digest()
            letters = base64.b32encode(digest).decode()[:8]
            code = self._references[subscriber_id] = f"WG-{letters[:4]}-{letters[4:]}"
        return code

    def explain(self, query: str) -> dict[str, Any]:
        """Why a subscriber (by id, address or reference code) is or is not restricted."""
        query = query.strip()
        sid: str | None = None
        address = None
        if query in self.inputs.known_ids() or query in self.decisions or query in self.inputs.exemptions:
            sid = query
        else:
            try:
                address = self.lookup(query)
                sid = address["subscriber"] or self._holder_of(query)
            except ValueError:
                wanted = query.upper()
                sid = next((s for s in self.inputs.known_ids() if self.reference(s) == wanted), None)
        if sid is None:
            why = ("no restricted subscriber holds this address" if address else
                   "not a subscriber id, address or reference code this gateway knows")
            return {"query": query, "found": False, "restricted": False, "why": why}
        now = self.clock()
        enforced = self.decisions.get(sid)
        decision = self.inputs.decide(sid, now, enforced)
        listed = self.inputs.listed.get(sid)
        override = self.inputs.overrides.get(sid)
        grace = self.inputs.graces.get(sid)
        exemptions = self.inputs.exemptions.get(sid, {})
        promises = self.inputs.promises.get(sid, [])
        return {
            "query": query, "found": True, "subscriber": sid, "reference": self.reference(sid),
            "restricted": decision.restricted, "mode": decision.mode.value, "why": decision.cause,
            "until": decision.until, "pending": decision.pending.value if decision.pending else None,
            "chain": self._chain(sid, now, decision),
            "exemptions": [e.to_json() for e in exemptions.values()],
            "promises": [p.to_json() for p in promises],
            "promise_eligibility": self.promise_eligibility(sid).why,
            "listed_since": self.inputs.listed_since.get(sid),
            "windows": self.inputs.rules.windows.describe(),
            "audit": self.store.audit(sid, limit=10),
            "addresses": [str(a) for a in decision.subscriber.addresses] if decision.subscriber else [],
            "list": listed.to_json() if listed else None,
            "override": {"restrict": override.restrict, "at": override.at, "cause": override.cause} if override else None,
            "payment_grace": {"paid_at": grace.paid_at, "until": grace.until, "cause": grace.cause} if grace else None,
            "enforced_in_kernel": (enforced.mode.value if enforced and enforced.restricted else Mode.FREE.value),
            "notice_acknowledged_until": self.acknowledged.get(sid),
        }

    def _holder_of(self, address: str) -> str | None:
        """Which known subscriber's addresses contain ``address`` (restricted or not): O(list),
        for the operator's ``explain`` of someone a promise, grace or exemption freed."""
        ip = ipaddress.ip_address(address)
        sources = [self.inputs.listed.items(),
                   ((sid, o.subscriber) for sid, o in self.inputs.overrides.items() if o.subscriber)]
        for pairs in sources:
            for sid, subscriber in pairs:
                if any(ip.version == n.version and ip in n for n in subscriber.addresses):
                    return sid
        return None

    def _chain(self, sid: str, now: float, decision: Decision) -> list[str]:
        """Every input that bears on the subscriber, in the order the policy weighs them."""
        when = policy.when
        chain = []
        listed = self.inputs.listed.get(sid)
        if listed is None:
            chain.append("list: not on the restricted list in force")
        else:
            since = self.inputs.listed_since.get(sid)
            chain.append(f"list: {listed.mode.value} (reason {listed.reason or 'none'})"
                         + (f", listed since {when(since)}" if since else ""))
            if listed.exempt_until:
                chain.append(f"list: exempt ({listed.exempt_category}) until {when(listed.exempt_until)}")
        if self.inputs.rules.escalation:
            chain.append("escalation ladder: " + ", ".join(f"{s.mode.value} after {s.after / 86400:g} d"
                                                             for s in self.inputs.rules.escalation))
        override = self.inputs.overrides.get(sid)
        if override is not None:
            chain.append(f"override: {'restrict' if override.restrict else 'lift'} at {when(override.at)} "
                         f"by {override.cause}")
        grace = self.inputs.graces.get(sid)
        if grace is not None:
            state = "in force" if grace.until > now else "ended"
            chain.append(f"payment grace {state} until {when(grace.until)} ({grace.cause})")
        for promise in self.inputs.promises.get(sid, [])[-3:]:
            chain.append(f"promise to pay {when(promise.made_at)} - {when(promise.until)}: {promise.outcome}")
        for exemption in self.inputs.exemptions.get(sid, {}).values():
            chain.append(f"{exemption.describe()} until {when(exemption.until)}")
        if decision.pending is not None:
            chain.append(f"window: {decision.pending.value} waits; windows are {self.inputs.rules.windows.describe()}")
        chain.append(f"result: {decision.mode.value}: {decision.cause}")
        return chain

    # -- queries ------------------------------------------------------------------------------
    def lookup(self, address: str) -> dict[str, Any]:
        """Is this address restricted, in which mode, and why (category only)?"""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise ValueError(f"{address!r}: a scoped address is never a subscriber's")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        layout = self.reconciler.layout
        prefixes = sorted((p for p in (layout.prefixes if layout else ()) if p[0] == ip.version),
                          key=lambda p: -p[1])
        for version, plen in prefixes:
            key = str(ipaddress.ip_network(f"{ip}/{plen}", strict=False).network_address)
            sid = self.reconciler.owner_of(mode_map(version, plen), key)
            decision = self.decisions.get(sid) if sid else None
            if decision is not None and decision.restricted and decision.subscriber is not None:
                until = self.acknowledged.get(sid)
                verdict = self.promise_eligibility(sid)
                return {"address": str(ip), "restricted": True, "mode": decision.mode.value,
                        "reason": decision.subscriber.reason, "subscriber": sid, "reference": self.reference(sid),
                        "ack_until": until if until and until > self.clock() else None,
                        "promise": {"eligible": verdict.eligible, "why": verdict.why,
                                    "term_seconds": verdict.term or None}}
        return {"address": str(ip), "restricted": False, "mode": Mode.FREE.value, "reason": "", "subscriber": None,
                "reference": "", "ack_until": None, "promise": {"eligible": False, "why": "not_restricted",
                                                                 "term_seconds": None}}

    def status(self) -> dict[str, Any]:
        counts = {m.value: self.mode_counts.get(m, 0) for m in Mode.restricting()}
        now = self.clock()
        loaded = self.list_status.get("loaded_at")
        return {
            "modes": counts,
            "last_sync": self.last_sync,
            "kernel_in_sync": not self.reconciler.needs_full,
            "source": {"configured": redact_url(self.config.subscribers.source), "list_in_force": self.list_status,
                       "list_age_seconds": round(now - loaded, 1) if loaded else None,
                       "last_error": self.source_error},
            "graces": len(self.inputs.graces),
            "overrides": len(self.inputs.overrides),
            "exemptions": sum(len(e) for e in self.inputs.exemptions.values()),
            "promises_active": sum(1 for h in self.inputs.promises.values() if h and h[-1].active(now)),
            "rebuilding_from_kernel": self.rebuilding is not None,
            "table_repairs": self.table_repairs,
            "waiting_for_window": len(self.waiting),
            "address_conflicts": dict(sorted(self.conflicts.items())[:20]),
            "address_conflicts_total": len(self.conflicts),
            "windows": self.inputs.rules.windows.describe(),
            "outbox": self.store.outbox_size(),
            "tasks": self.supervisor.status() if self.supervisor is not None else {},
            "state": {"quarantined": self.store.quarantined, "rows_quarantined": self.store.skipped_count,
                      "skipped_rows": self.store.skipped_rows[:20]},
            "held_changes": [] if self.held is None else [{
                "origin": self.held.update.origin, "entries": len(self.held.update.subscribers),
                "restricting": self.held.restricting, "lifting": self.held.lifting,
                "since": self.held.since, "why": self.held.why}],
        }

    async def close(self) -> None:
        await self.batcher.close()
        for task in list(self._background):
            task.cancel()
        self._kernel_thread.shutdown(wait=True)
        self.store.close()

    # -- operations: metrics and reload ---------------------------------------------------
    async def read_kernel_counters(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) of the table's named counters, read on the kernel thread."""
        return await asyncio.to_thread(self.reconciler.dataplane.reader().counters)   # not on the kernel thread

    async def verify_table(self) -> bool:
        """Is our table still in the kernel as we left it? Every call checks the layout tag and
        each set's sentinel (a deleted table, a ``flush ruleset`` or a ``flush set``); every
        ``TABLE_FULL_CHECK_SECONDS`` all elements are compared too (a single deleted element).
        A difference is repaired now by the timer's full sync (``Reconciler.check_kernel``)."""
        layout = self.reconciler.layout
        if layout is None or self.reconciler.needs_full:
            return True
        full = time.monotonic() - self._full_check >= TABLE_FULL_CHECK_SECONDS
        if full:   # against the mirror: on the kernel thread, where the mirror is consistent
            self._full_check = time.monotonic()
            problem = await self._kernel(self.reconciler.check_kernel, True)
        else:      # the layout only: on a reader of its own, so no webhook waits behind it
            problem = await asyncio.to_thread(probe, self.reconciler.dataplane.reader(), layout)
            if problem and (self.reconciler.layout is not layout or self.reconciler.needs_full):
                return True    # a sync replaced the table meanwhile: nothing to say about the old one
            if problem:
                self.reconciler.needs_full = True
        if not problem:
            return True
        log.error("event=table_lost table=%s check=%s detail=%r (someone removed or changed our table; "
                  "repairing now)", self.config.gateway.table, "full" if full else "quick", problem)
        self.table_repairs += 1
        self._changed.set()
        return False

    async def reload(self, config: Config) -> list[str]:
        """Take a new, already validated configuration (SIGHUP) without dropping enforcement.

        Values read where they are used (policy, guard, source settings, ``notice_ack_for``)
        simply change; a different table layout (``walled_garden``, ``gateway.subscriber_interfaces``,
        policy values the layout renders) is installed by one atomic full sync, and notice
        acknowledgements still running are put back into the new table. Settings bound at
        start-up keep their old value; their keys are returned as needing a restart.
        """
        from dataclasses import replace

        old = self.config
        bound = {"state_dir": lambda c: c.state_dir, "gateway.table": lambda c: c.gateway.table,
                 "api.socket": lambda c: c.api.socket, "api.socket_group": lambda c: c.api.socket_group,
                 "api.listen": lambda c: c.api.listen, "metrics.listen": lambda c: c.metrics.listen,
                 "portal.listen": lambda c: c.portal.listen}
        restart = [key for key, get in bound.items() if get(config) != get(old)]
        config = replace(config, state_dir=old.state_dir, gateway=replace(config.gateway, table=old.gateway.table),
                         api=replace(config.api, socket=old.api.socket, socket_group=old.api.socket_group,
                                     listen=old.api.listen),
                         metrics=replace(config.metrics, listen=old.metrics.listen),
                         portal=replace(config.portal, listen=old.portal.listen))
        layout = base_layout(config)
        async with self.lock:
            self.config = config
            self.space = AddressSpace.from_config(config)
            rules = policy_rules(config)
            rules_changed, self.inputs.rules = rules != self.inputs.rules, rules
            self._changed.set()   # windows or graces may now end at other times
            if layout == self.reconciler.base_layout:
                if rules_changed:  # windows/escalation: re-decide everyone (an element diff)
                    try:
                        await self.sync_all()
                    except DataplaneError:
                        self._changed.set()
                return restart
            self.reconciler.base_layout = layout
            try:
                result = await self.sync_all()
            except DataplaneError:
                self._changed.set()  # the repair loop retries, with the new layout
                return restart
            if result.kind == "full":
                await self._reacknowledge()
        log.info("event=layout_reloaded tag=%s", self.reconciler.layout.tag if self.reconciler.layout else "")
        return restart

    async def _reacknowledge(self) -> None:
        """After a table replace: notice acknowledgements still running go back in (caller holds the lock)."""
        now = self.clock()
        for sid, until in list(self.acknowledged.items()):
            decision = self.decisions.get(sid)
            if until <= now or decision is None or decision.mode not in (Mode.NOTICE, Mode.THROTTLE):
                del self.acknowledged[sid]
                continue
            try:
                await self._kernel(self.reconciler.acknowledge, decision, max(int(until - now), 1))
            except DataplaneError as exc:
                log.warning("event=acknowledgement_not_restored subscriber=%s error=%r", sid, str(exc))

"""Desired decisions → the smallest transaction that makes the kernel match them.

Like kube-proxy's nftables proxier: keep a mirror of what we put in each container, emit only
changed elements, and fall back to one atomic full sync at start-up and after any failure.
The full path is written for 100k subscribers: plain dicts of strings, no per-subscriber
objects, and address keys rendered once, by the list parser (``Subscriber.keys``).

Every transaction also writes a digest mark (``_apply``), so that a start whose table still
holds exactly what the saved decisions ask need not read 125k elements back (``_carries``).

The table's structure (SPEC 7: "on start, read what is in the kernel and reconcile"). The
elements are not all a table is: ``nft delete rule`` of the forward hook's jump, or ``nft add
table ... { flags dormant; }``, frees every restricted subscriber while every element, sentinel
and mark is still in place. So the structure (flags, chains with hook, priority and policy,
rules, set declarations, the layout's own static elements: ``state.Structure``) is compared
too: by the table check every few seconds (``probe``, ``check_kernel``) and at every start,
the start that trusts the digest mark included (``_structure_changed``); a difference is
repaired by one atomic replace of the table with every element, as a flushed set is.

What it is compared with. Not the text ``walled-garden render`` prints: the kernel holds a
rule as libnftables translated it, and that translation, and how ``nft list`` prints it back,
differ between nft versions (a normaliser of both texts would be a second nft). Instead the
reference is the table itself, read over netlink right after our own install
(``_note_structure``): the same kernel, the same library, nothing to normalise. It is kept in
memory (``structure``) and on the table, as the comment of the layout tag's element
(``transaction.MarkStructure``), so that a restart compares the table with what our last
install left; a table without that mark (from before this release) is replaced once at the
start. The reading is proven ours when the ruleset's generation is still our install's; when
another commit came between (the DNS forwarder's elements, usually) it is taken all the same,
logged: a structural edit made within those milliseconds would pass for ours. A backend that
knows the structure without installing (``Dataplane.expected_structure``: the ipset backend's
rules as this release renders them) is compared with that, and needs no mark.
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import logging
import math
import re
import socket
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from .claims import ClaimsIndex, uncontested
from .dataplane.backend import Dataplane, DataplaneError
from .dataplane.layout import (
    HOST_ALLOW,
    MODE_PREFIX,
    MODE_VERDICTS,
    SENTINELS,
    TAG_SET,
    Layout,
    ack_set,
    mode_map,
    mode_prefix,
    placements,
    sentinel_family,
    tag_address,
    with_mode_view,
)
from .dataplane.state import (
    Expiring,
    Structure,
    TableState,
    describe,
    digest,
    digest_mark,
    element_hash,
    mark_digest,
)
from .dataplane.transaction import (
    AddElements,
    AddExpiring,
    DeleteElements,
    MarkStructure,
    ReplaceTable,
    Transaction,
)
from .model import Mode, Network
from .policy import Decision
from .subscribers import Key, key_network

log = logging.getLogger(__name__)

Element = tuple[str, str, str | None]  # (container, key, value)
Elements = dict[str, dict[str, str | None]]


@dataclass
class SyncResult:
    kind: str                       # "full" (table replaced) or "partial" (element diff)
    elements: int                   # elements added or deleted
    #: Enforcement changed: flush their connections. Keys (version, prefix length, text), not
    #: networks: a cold start changes 125k addresses (``Flusher`` takes keys).
    changed: list[Key] = field(default_factory=list)

    def add(self, other: SyncResult) -> None:
        """Count ``other`` in (one subscriber at a time, ``Engine.apply_resolving``)."""
        self.elements += other.elements
        self.changed += other.changed
        self.kind = "full" if other.kind == "full" else self.kind


class Desired(NamedTuple):
    """What a set of decisions asks of the table (``Reconciler._desired``)."""

    elements: Elements
    owned: dict[str, Decision]          # subscriber → the decision whose elements are in ``elements``
    owners: dict[str, dict[str, str]]   # mode map → key → subscriber holding it
    used: set[tuple[int, int]]          # (IP version, prefix length) pairs the elements use
    clashes: list[tuple[str, str]]      # (subscriber left out, subscriber holding its address)


class NeedsFullSync(DataplaneError):
    """The change cannot be a diff (e.g. a new prefix length); run ``sync_all``."""


class AddressConflict(ValueError):
    """An address is already enforced for another subscriber."""


def subscriber_elements(decision: Decision) -> frozenset[Element]:
    """The elements one decision puts in the table (none when free)."""
    if not decision.restricted or decision.subscriber is None:
        return frozenset()
    return frozenset((container, key, value) for version, plen, key in decision.subscriber.keys
                     for container, value in placements(version, plen, decision.mode))


#: The modes whose HTTP redirect a notice acknowledgement lets through (``Reconciler.acknowledge``).
ACKNOWLEDGEABLE = (Mode.NOTICE, Mode.THROTTLE)


def acknowledgeable(decision: Decision | None) -> bool:
    """Does ``decision`` restrict its subscriber in a mode a notice acknowledgement applies to?"""
    return decision is not None and decision.restricted and decision.mode in ACKNOWLEDGEABLE


def _move_acknowledgements(tx: Transaction, was: Mapping[str, Decision | None], now: Mapping[str, Decision | None],
                           acknowledged: Mapping[str, int]) -> None:
    """Add to ``tx`` what keeps the notice acknowledgements (``noticeack`` elements, keyed by
    address) with their subscribers (``acknowledged``: subscriber -> seconds left, 0 when over)
    as their enforcement goes from ``was`` to ``now`` (None: free): an address a subscriber no
    longer holds in notice or throttle mode (gone, or its mode changed, or the subscriber free)
    loses its element, whoever holds it next (review: B, never acknowledged, skipped the notice
    on A's old address for up to ``portal.notice_ack_for``); one it gains in those modes gets
    one for the time left. Only these few subscribers are looked at, never the table.

    The drops are ``DropElements`` (the element may have expired meanwhile, or never been put
    in: a failed acknowledgement); an address dropped and then added (it moved between two
    acknowledged subscribers) is dropped first, so it takes its new holder's timeout."""
    drop: dict[str, list[str]] = {}
    add: dict[tuple[str, int], list[str]] = {}
    for sid, seconds in acknowledged.items():
        if sid not in now:
            continue
        before, after = was.get(sid), now[sid]
        had = set(before.subscriber.keys) if before is not None and before.restricted and \
            before.subscriber is not None else set()
        has = set(after.subscriber.keys) if after is not None and after.subscriber is not None and \
            acknowledgeable(after) else set()
        for version, plen, key in sorted(had - has):
            drop.setdefault(ack_set(version, plen), []).append(key)
        if seconds > 0 and acknowledgeable(before):
            for version, plen, key in sorted(has - had):
                add.setdefault((ack_set(version, plen), seconds), []).append(key)
    for (name, _), keys in add.items():   # the new holder's timeout, not what is left of the old one's
        drop.setdefault(name, []).extend(keys)
    for name, keys in drop.items():
        tx.drop(name, dict.fromkeys(keys))
    for (name, seconds), keys in add.items():
        tx.add(name, [(key, None) for key in keys], timeout=seconds)


def _prefixes(decisions: Iterable[Decision]) -> set[tuple[int, int]]:
    """Prefix lengths the decisions use (small batches only: ``sync_all`` folds this in)."""
    out: set[tuple[int, int]] = set()
    for decision in decisions:
        if decision.subscriber is not None and decision.restricted:
            out.update(key[:2] for key in decision.subscriber.keys)
    return out


class Reconciler:
    """Owns the mirror of our table; every kernel change goes through here."""

    def __init__(self, dataplane: Dataplane, base_layout: Layout) -> None:
        self.dataplane = dataplane
        self.base_layout = base_layout
        self.layout: Layout | None = None
        self.mirror: TableState | None = None
        self.owned: dict[str, Decision] = {}          # subscriber → the decision enforced for them
        self.owners: dict[str, dict[str, str]] = {}   # mode map → key → subscriber
        self.host_allow: dict[str, None] = {}
        self.needs_full = True
        self.digest = 0                 # of the subscriber sets' elements in the kernel (``state.digest``)
        self._marks: set[str] = set()   # the digest marks ``layouttag`` holds (one, once written)
        # The ruleset generation at which the table is known to hold the mirror (read back, or
        # trusted, and only our own transactions since); None once anyone else committed.
        self._generation: int | None = None
        self.verified = True            # False from a start that trusted the mark, to the next full check
        #: The table's structure as our last install left it (read right after it, or found equal
        #: to its mark or the backend's render at a start): what the checks compare with; None
        #: while unknown (module docstring).
        self.structure: Structure | None = None
        self._structure_tag = ""        # the layout tag ``structure`` belongs to
        #: Even while ``structure`` is the kernel table's; odd during a replace, so a check on
        #: another thread knows to set aside what it saw meanwhile (``TableHealth``).
        self.structure_epoch = 0
        self._learned: dict[str, str] = {}   # layout tag → the fingerprint our installs of it had
        self.repaired: list[str] = []   # structure changes a start found and replaced (``take_repaired``)

    # -- whole-state syncs -------------------------------------------------------------
    def sync_all(self, decisions: Mapping[str, Decision], read_kernel: bool = False,
                 enforced: Mapping[str, Decision] | None = None,
                 acknowledged: Mapping[str, int] | None = None) -> SyncResult:
        """Make the whole table match ``decisions``.

        Where two subscribers claim one address (or a prefix around another's), who holds it in
        the kernel now keeps it, then the lower id: ``enforced`` (the decisions enforced until now;
        at a start, the saved ones, while ``owned`` is still empty) says who held it, so a
        restart never hands an address to the other claimant and lifts what billing was told.

        With ``read_kernel`` (start-up, after a failure) the mirror is first rebuilt from what
        the kernel really holds, so restarting never opens a window: a matching table gets an
        element diff, anything else one atomic replace. At start-up (no mirror yet) a table
        that carries the digest of exactly these decisions' elements is not read back
        (``_carries``): the 125k elements of 100k subscribers take ~2 s to list and diff.

        ``acknowledged``: the subscribers with a notice acknowledgement running, and the seconds
        it has left; an element diff moves their acknowledgements with them in the same commit
        (``_move_acknowledgements``). A replace does not: the new table has none, and
        ``Engine.on_replaced`` puts them back by subscriber.
        """
        preferred = _Preferred(decisions, self.owned, enforced or {})
        desired, owned, owners, used, clashes = self._desired(decisions, preferred)
        for sid, holder in clashes:
            log.warning("event=address_conflict subscriber=%s held_by=%s (not enforced)", sid, holder)
        layout = self.base_layout.with_prefixes(used)
        for name in [*layout.containers(), *(mode_map(v, p) for v, p in layout.prefixes)]:
            desired.setdefault(name, {})
        target = digest(desired, _digested(layout))
        starting, kernel_read = self.layout is None, True
        listed: _Listed | None = None   # the table as listed below, for ``_carry``
        if read_kernel and self.mirror is None and self._carries(layout, target, desired):
            assert self.mirror is not None
            before = self.mirror.elements   # the trusted table, whole
            log.info("event=kernel_trusted digest=%s (the table carries the digest of the decisions' elements: "
                     "not read back; the next full table check compares every element)", next(iter(self._marks)))
        elif read_kernel or self.mirror is None or self.needs_full:
            generation, read_at = self.dataplane.generation(), time.monotonic()
            state = self.dataplane.read()
            listed = _Listed(state.expiring if state is not None else {}, read_at)
            self.mirror = with_mode_view(state)
            self._marks, self.verified = _marks(self.mirror, layout), True
            # the listing is the table at that generation only if nothing was committed meanwhile
            self._generation = generation if self.dataplane.generation() == generation else None
            before = self.mirror.elements if self.mirror else {}
        else:   # the mirror our last sync or diff left
            assert self.mirror is not None
            before = _implied(self.mirror.elements)
            kernel_read = False
        changed = _changed(before, desired)
        tx = Transaction(self.dataplane.table)
        # A set that lost its sentinel was flushed behind our back, a rule deleted or the table
        # made dormant changed its structure: only a replace restores either.
        replace = (self.mirror is None or self.mirror.layout_tag != layout.tag
                   or not self.mirror.sealed.issuperset(layout.containers()))
        if not replace and kernel_read:
            replace = self._structure_changed(layout, starting)
        elif replace and starting and kernel_read:
            self._damage_at_start(layout)
        predicted, carried = "", 0
        if replace:
            tx.replace_table(layout)
            for container, items in desired.items():
                if not container.startswith(MODE_PREFIX):   # the mode view never goes to the kernel
                    tx.add(container, items.items())
            carried = self._carry(tx, layout, listed)
            if not self.dataplane.expected_structure(layout):   # marked in the same commit when known
                predicted = self._learned.get(layout.tag, "")
                if predicted:
                    tx.mark_structure(layout.tag, predicted)
            kind = "full"
        else:
            kind = "partial"
            _diff(tx, before, desired)
            if acknowledged:
                was = {sid: self.owned.get(sid) or (enforced or {}).get(sid) for sid in acknowledged}
                _move_acknowledgements(tx, was, {sid: owned.get(sid) for sid in acknowledged}, acknowledged)
        noted = True
        if replace:
            try:
                count, noted = self._replace(tx, target, layout, predicted)
            except DataplaneError as exc:
                sets = {op.container for op in tx.operations if isinstance(op, AddExpiring)}
                if not carried or not carry_refused(str(exc), sets):
                    raise   # not theirs (no memory, a rule, a subscriber's element): the repair loop retries
                # never let what is carried keep the table from being replaced (or repaired)
                log.warning("event=timeout_elements_dropped table=%s elements=%d error=%r (the replace is tried "
                            "again without them)", self.dataplane.table, carried, str(exc))
                tx.operations = [op for op in tx.operations if not isinstance(op, AddExpiring)]
                count, noted = self._replace(tx, target, layout, predicted)
        else:
            count = self._apply(tx, target)
        self.layout, self.mirror = layout, TableState(layout.tag, _compact(desired), set(layout.containers()))
        self.owned, self.owners = owned, owners
        self.needs_full = not noted   # the new table's structure unread or unmarked: the repair loop does it
        if count >= BIG_TRANSACTION:
            _trim_heap()
        return SyncResult(kind, count, changed)

    def _carry(self, tx: Transaction, layout: Layout, listed: _Listed | None) -> int:
        """Add to ``tx``, which replaces the table, the elements the old table's timeout sets hold
        (``Layout.carried_sets``: the portal's recent callers, the DNS forwarder's learnt
        addresses; not the notice acknowledgements, which ``Engine.on_replaced`` puts back by
        subscriber), each with its timeout and the time it has left: a replace keeps what a
        restart without one keeps. Only into a set of the same name in ``layout`` (a name says
        its kind and family, so its type), at most as many as ``carried_sets`` says (the callers:
        ``CARRIED_CALLERS`` a family, though spoofed SYNs can put a million there), those with
        the most time left; returns how many.

        Read from ``listed`` when this sync just listed the whole table (those sets are in the
        listing), else by one small listing of just these sets (a start that trusted the digest
        mark, a new layout from the mirror); the time since the listing is taken off, so nothing
        lives longer than it would have but for the commit of the replace itself (rendering and
        committing 125k elements: ~1 s at 100k subscribers). A failure to read is logged and
        nothing carried: the replace goes ahead; a replace the kernel refuses because of them
        (``carry_refused``) is tried again without them (``sync_all``)."""
        sets = layout.carried_sets()
        if listed is None:
            if self.mirror is None:
                return 0   # no table to carry from
            read_at = time.monotonic()
            try:
                listed = _Listed(self.dataplane.read_timeouts(sets), read_at)
            except DataplaneError as exc:
                log.warning("event=timeout_elements_unread table=%s error=%r (the replace goes ahead: notice "
                            "acknowledgements, portal callers and DNS-learnt addresses are not carried over)",
                            self.dataplane.table, str(exc))
                return 0
        spent = math.ceil(time.monotonic() - listed.at)
        count = 0
        for name, most in sets.items():
            v6, found = sentinel_family(name) == 6, listed.expiring.get(name, {})
            alive = ((key, timeout, left - spent) for key, (timeout, left) in found.items()
                     if left > spent and (":" in key) == v6 and key not in _SENTINEL_KEYS)
            # the longest-lived ``most`` of up to a million: a heap of ``most``, not a sort of all
            items = sorted(alive, key=_longest_lived) if most is None \
                else heapq.nsmallest(most, alive, key=_longest_lived)
            tx.add_expiring(name, items)
            count += len(items)
        if count:
            log.info("event=timeout_elements_carried table=%s elements=%d", self.dataplane.table, count)
        return count

    def _replace(self, tx: Transaction, target: int, layout: Layout, predicted: str) -> tuple[int, bool]:
        """``_apply`` of a transaction that replaces the table, then the new table's structure
        noted (``_note_structure``, whose answer is returned with the count); ``structure_epoch``
        is odd meanwhile."""
        self.structure_epoch += 1
        try:
            count = self._apply(tx, target)   # a failure changed nothing: the reference stands
            return count, self._note_structure(layout, predicted)
        finally:
            self.structure_epoch += self.structure_epoch % 2

    def _note_structure(self, layout: Layout, predicted: str) -> bool:
        """Read the structure of the table we just installed: the reference of every later
        check. With nftables it is then marked on the table (``MarkStructure``), unless the
        install's own transaction marked it already (``predicted``: what our earlier installs
        of this layout had). False when that failed (the reference unknown, or the table not
        marked): the caller asks for a full sync (``needs_full``), which reads the table again
        (a table still unmarked then is replaced once more, and marked)."""
        committed = self._generation
        self.structure, self._structure_tag = None, ""
        try:
            now = self.dataplane.structure(layout)
            generation = self.dataplane.generation()
        except DataplaneError as exc:
            log.warning("event=table_structure_unread table=%s error=%r (read again at the next sync)",
                        self.dataplane.table, str(exc))
            return False
        if now is None:   # deleted at once: the repair puts it back
            return False
        self.structure, self._structure_tag = now, layout.tag
        expected = self.dataplane.expected_structure(layout)
        if expected or not now.fingerprint:
            if expected and now.fingerprint != expected:
                log.error("event=table_structure_unexpected table=%s detail=%r (our install does not read back "
                          "as rendered)", self.dataplane.table, describe(None, now, expected))
            return True
        if now.fingerprint != predicted:
            if committed is None or generation != committed:
                log.info("event=table_structure_noted table=%s fingerprint=%s proven=no (another commit came "
                         "between our install and this reading; a structural edit made meanwhile would pass for "
                         "ours)", self.dataplane.table, now.fingerprint)
            try:
                self._apply(Transaction(self.dataplane.table, [MarkStructure(layout.tag, now.fingerprint)]),
                            self.digest)
            except DataplaneError as exc:   # no reference either: the repair replaces, and marks
                log.warning("event=table_structure_unmarked table=%s error=%r", self.dataplane.table, str(exc))
                self.structure, self._structure_tag = None, ""
                return False
        self._learned[layout.tag] = now.fingerprint
        return True

    def _structure_changed(self, layout: Layout, starting: bool) -> bool:
        """Is the table's structure not the one our last install left (module docstring)? Compared
        with what the backend renders (``expected_structure``), else with the reference in memory,
        else (a start) with the table's own mark; a table without a mark is replaced too. A
        difference found at a start is logged as ``table_lost`` and kept in ``repaired`` (counted
        by ``TableHealth``); later the table check has logged it already."""
        now = self.dataplane.structure(layout)
        if now is None:
            return True   # gone since it was read: the replace creates it
        if not now.fingerprint:
            self.structure, self._structure_tag = now, layout.tag
            return False
        reference = self.structure if self.structure is not None and self._structure_tag == layout.tag else None
        wanted = self.dataplane.expected_structure(layout) or (reference.fingerprint if reference else "") \
            or now.marked
        if not wanted:
            log.warning("event=table_structure_unknown table=%s action=replacing (the table carries no structure "
                        "mark of ours: made by an older release, or the mark was removed)", self.dataplane.table)
            return True
        if now.fingerprint == wanted:
            self.structure, self._structure_tag = now, layout.tag
            return False
        detail = describe(reference, now, wanted)
        if starting:
            log.error("event=table_lost table=%s check=start detail=%s action=replacing", self.dataplane.table,
                      f"structure changed: {detail}")
            self.repaired.append(f"structure changed: {detail}")
        else:
            log.warning("event=table_structure_replaced table=%s detail=%s", self.dataplane.table, detail)
        return True

    def _damage_at_start(self, layout: Layout) -> None:
        """A start about to replace a table of this very layout that was damaged while the daemon
        was down (a set flushed; with the ipset backend, an umbrella or our iptables chains and
        jumps, which ``read`` appends to the tag): logged and counted as the table check would."""
        if self.mirror is None:
            return   # no table at all: a first start, or a reboot
        tag = self.mirror.layout_tag or ""
        if tag.startswith(f"{layout.tag} (") and tag.endswith(")"):
            problem = tag[len(layout.tag) + 2:-1]
        elif tag == layout.tag:
            problem = f"set(s) flushed: {_few(sorted(set(layout.containers()) - self.mirror.sealed))}"
        else:
            return   # another layout (a new configuration or release), or no table: not damage
        log.error("event=table_lost table=%s check=start detail=%s action=replacing", self.dataplane.table, problem)
        self.repaired.append(problem)

    def take_repaired(self) -> list[str]:
        """The structure changes the start found and repaired, once each (``TableHealth`` counts them)."""
        out, self.repaired = self.repaired, []
        return out

    def _carries(self, layout: Layout, target: int, desired: Elements) -> bool:
        """Does the kernel table carry ``target``, the digest of ``desired``'s subscriber sets,
        marked with the ruleset generation of now? If so, it becomes the mirror (with the small
        ``allowhost`` sets read back), and nothing is read.

        What that proves. A mark is written only in the same transaction as the elements it
        sums, and with the generation that transaction commits as only when every commit since
        the table was last read back (or replaced) was ours (``_apply``); every nftables commit
        by anyone moves the generation on (an ``nft add/delete element``, a ``flush set``,
        another table's rules). So a mark naming the generation of now says: no transaction at
        all since ours, and ours left exactly these elements. A start after any other commit
        (with ``dns: gateway`` the forwarder's own, usually) reads the table back as before.
        What it does not cover: a change that commits nothing (the kernel's own, e.g. timeouts:
        none in these sets) and a bug of ours; ``verified`` stays False until the next full
        check (``check_kernel(full=True)``) has compared every element.
        """
        generation = self.dataplane.generation()
        mark = digest_mark(target, generation)
        if not self.dataplane.holds_layout(layout.tag, layout.containers(), mark):
            return False
        hosts = self.dataplane.read_sets(HOST_ALLOW.values())
        if (hosts is None or not hosts.sealed.issuperset(HOST_ALLOW.values())
                or self.dataplane.generation() != generation):   # a commit while we looked
            return False
        elements = dict(desired)
        elements.update(hosts.elements)
        self.mirror = TableState(layout.tag, elements, set(layout.containers()))
        self.digest, self._marks, self._generation = target, {mark}, generation
        self.verified = False
        return True

    def _desired(self, decisions: Mapping[str, Decision], order: _Preferred) -> Desired:
        """Elements and owners for all decisions.

        Written for 100k subscribers (a cold load's budget is ~1.3x raw ``nft -f``): one
        Python pass groups the keys per (family, prefix length, mode); the containers are
        then built by dict constructors in C. Only when some address is claimed twice does
        the exact per-subscriber pass (``_desired_exact``) decide, in ``order``, who keeps it.
        """
        groups: dict[tuple[int, int, Mode], tuple[list[str], list[str]]] = {}
        owned: dict[str, Decision] = {}
        for sid, decision in decisions.items():
            subscriber = decision.subscriber
            if subscriber is None or not decision.restricted:
                continue
            owned[sid] = decision
            mode = decision.mode
            for version, plen, key in subscriber.keys:
                group = groups.get((version, plen, mode))
                if group is None:
                    group = groups[(version, plen, mode)] = ([], [])
                group[0].append(key)
                group[1].append(sid)
        desired: Elements = {}
        owners: dict[str, dict[str, str]] = {}
        for (version, plen, mode), (keys, sids) in groups.items():
            holders = owners.setdefault(mode_map(version, plen), {})
            size = len(holders)
            holders.update(zip(keys, sids, strict=True))
            if len(holders) != size + len(keys):      # an address claimed twice
                return self._desired_exact(decisions, order)
            for name, value in placements(version, plen, mode):
                if name in desired:
                    desired[name].update(dict.fromkeys(keys, value))
                else:
                    desired[name] = dict.fromkeys(keys, value)
        if _nested(groups):                            # a prefix of one around another's address
            return self._desired_exact(decisions, order)
        self._add_hosts(desired)
        return Desired(desired, owned, owners, {(version, plen) for version, plen, _ in groups}, [])

    def _add_hosts(self, desired: Elements) -> None:
        """The resolved garden hosts join the desired elements."""
        for address in self.host_allow:
            desired.setdefault(HOST_ALLOW[6 if ":" in address else 4], {})[address] = None

    def _desired_exact(self, decisions: Mapping[str, Decision], order: _Preferred) -> Desired:
        """``_desired`` one address at a time. A contested address (equal, or inside or around
        another's: ``ClaimsIndex``) stays with whoever holds it now (``order.holding``), then
        goes to the lower id; a subscriber that loses one gets the rest of its addresses
        (``claims.uncontested``, reported in ``clashes``), as ``Engine.apply_resolving`` does,
        so a full sync enforces what the diffs enforced."""
        desired: Elements = {}
        owners: dict[str, dict[str, str]] = {}
        owned: dict[str, Decision] = {}
        slots: dict[tuple[int, int, Mode], tuple[list[tuple[dict[str, str | None], str | None]], dict[str, str]]] = {}
        clashes: list[tuple[str, str]] = []
        index = ClaimsIndex()
        wanted = {sid: s.keys for sid in order
                  if (s := decisions[sid].subscriber) is not None and decisions[sid].restricted}
        taken: dict[str, list[Network]] = {sid: [] for sid in wanted}
        lost: dict[str, list[tuple[Network, str]]] = {}
        # first what each holds now and still wants, then what it newly claims
        for claiming_new in (False, True):
            for sid, keys in wanted.items():
                holding = order.holding(sid)
                networks = [key_network(key) for key in keys if (key in holding) is not claiming_new]
                for network in networks:
                    conflict = index.conflict(sid, (network,))
                    if conflict is None:
                        taken[sid].append(network)
                    else:
                        lost.setdefault(sid, []).append((network, conflict.holder))
                if networks:
                    index.claim(sid, taken[sid])
        for sid in wanted:
            decision = decisions[sid]
            if sid in lost:
                clashes.append((sid, lost[sid][0][1]))
                if not taken[sid]:
                    continue
                kept = set(taken[sid])
                decision = uncontested(decision, [key_network(k) for k in wanted[sid] if key_network(k) in kept],
                                       [n for n, _ in lost[sid]])
            subscriber = decision.subscriber
            assert subscriber is not None
            entries = []
            mode = decision.mode
            for version, plen, key in subscriber.keys:
                slot = slots.get((version, plen, mode))
                if slot is None:
                    places = placements(version, plen, mode)
                    slot = slots[(version, plen, mode)] = (
                        [(desired.setdefault(name, {}), value) for name, value in places],
                        owners.setdefault(places[0][0], {}))
                entries.append((slot, key))
            for (containers, holders), key in entries:
                for items, value in containers:
                    items[key] = value
                holders[key] = sid
            owned[sid] = decision
        self._add_hosts(desired)
        return Desired(desired, owned, owners, {(version, plen) for version, plen, _ in slots}, clashes)

    # -- small changes -----------------------------------------------------------------
    def update(self, decisions: Mapping[str, Decision], acknowledged: Mapping[str, int] | None = None
               ) -> SyncResult:
        """Apply new decisions for a few subscribers as an element diff; the notice
        acknowledgements of those in ``acknowledged`` (subscriber -> seconds left) follow their
        addresses in the same commit (``_move_acknowledgements``)."""
        if self.needs_full or self.mirror is None or self.layout is None:
            raise NeedsFullSync("the kernel table must be re-read and synced in full first")
        if not self.layout.prefixes >= _prefixes(decisions.values()):
            raise NeedsFullSync("a new prefix length needs a layout change")
        before = {sid: subscriber_elements(self.owned[sid]) if sid in self.owned else frozenset()
                  for sid in decisions}
        after = {sid: subscriber_elements(d) for sid, d in decisions.items()}
        claimed: dict[tuple[str, str], str] = {}
        kept = {sid: {(container, key) for container, key, _ in elements} for sid, elements in after.items()}
        for sid, elements in after.items():
            for container, key, _ in elements:
                if not container.startswith(MODE_PREFIX):
                    continue
                holder = claimed.setdefault((container, key), sid)
                if holder == sid:
                    holder = self.owner_of(container, key) or sid
                    if holder in decisions and holder != sid and (container, key) not in kept[holder]:
                        holder = sid  # released in this same batch (a move, a swap)
                if holder != sid:
                    raise AddressConflict(f"{key} is already enforced for subscriber {holder}")
        old: Elements = {}
        new: Elements = {}
        for sid in decisions:
            for container, key, value in before[sid] - after[sid]:
                old.setdefault(container, {})[key] = value
            for container, key, value in after[sid] - before[sid]:
                new.setdefault(container, {})[key] = value
        tx = Transaction(self.dataplane.table)
        _diff(tx, old, {c: new.get(c, {}) for c in old.keys() | new.keys()})
        concerned = [sid for sid in acknowledged or {} if sid in decisions]
        if concerned:
            assert acknowledged is not None
            _move_acknowledgements(tx, {sid: self.owned.get(sid) for sid in concerned},
                                   {sid: decisions[sid] for sid in concerned}, acknowledged)
        count = self._apply(tx, self._followed(tx))
        for container, items in old.items():   # the mode views: the sets' elements follow from them
            if container.startswith(MODE_PREFIX):
                for key in items:
                    self.mirror.elements[container].pop(key, None)
                    self.owners.get(container, {}).pop(key, None)
        for sid in decisions:
            for container, key, value in after[sid]:
                if container.startswith(MODE_PREFIX):
                    self.mirror.elements.setdefault(container, {})[key] = value
                    self.owners.setdefault(container, {})[key] = sid
            if after[sid]:
                self.owned[sid] = decisions[sid]
            else:
                self.owned.pop(sid, None)
        return SyncResult("partial", count, sorted(changed_networks(old, new)))

    def acknowledge(self, decision: Decision, seconds: int) -> None:
        """Let a notice subscriber's HTTP through for ``seconds`` (kernel-side expiry).

        The elements are not mirrored: the kernel drops them on time, and an element diff that
        takes an address from an acknowledged subscriber drops it there whether it is still in
        the set or not (``_move_acknowledgements``), so there is no state of ours that could go
        stale: the subscribers (``Engine.acknowledged``) are the daemon's record, not the keys.
        """
        if self.needs_full or self.layout is None:
            raise NeedsFullSync("the kernel table must be synced before acknowledging")
        assert decision.subscriber is not None
        tx = Transaction(self.dataplane.table)
        for version, plen, key in decision.subscriber.keys:
            tx.add(ack_set(version, plen), [(key, None)], timeout=seconds)
        self._apply(tx, self.digest)   # timeout sets are not in the digest

    def owner_of(self, container: str, key: str) -> str | None:
        """The subscriber whose restriction put ``key`` into mode map ``container``."""
        return self.owners.get(container, {}).get(key)

    def set_host_allow(self, addresses: Iterable[str]) -> None:
        """Addresses that walled-garden hostnames resolve to, kept as a diff like the rest."""
        found = set(addresses)
        for sentinel in found.intersection(SENTINELS.values()):   # broadcast/multicast: never a host
            log.warning("event=host_allow_ignored address=%s (the layout's sentinel, not a host)", sentinel)
        wanted = dict.fromkeys(sorted(found.difference(SENTINELS.values())))
        if self.mirror is None or self.needs_full:
            self.host_allow = wanted
            return
        tx = Transaction(self.dataplane.table)
        target: Elements = {HOST_ALLOW[v]: {a: None for a in wanted if (":" in a) == (v == 6)} for v in (4, 6)}
        _diff(tx, {name: self.mirror.elements.get(name, {}) for name in target}, target)
        self._apply(tx, self.digest)   # nor are the garden hosts: see ``_digested``
        self.host_allow = wanted
        self.mirror.elements.update(target)

    # -- drift ---------------------------------------------------------------------------
    def check_kernel(self, full: bool = False) -> str:
        """Does the kernel still hold what the mirror says? ``""`` if so, else what differs.

        Runs on the caller's thread (the daemon's kernel thread, like every other call here).
        Cheap (``full=False``, every few seconds; ~0.3 ms at 100k elements): one batch of ``get
        element`` for the layout tag's element and each reconciled set's sentinel, so a deleted or
        replaced table and a ``flush set`` are seen (only then is the table listed, to say what).
        Full (``full=True``, rarely: it lists every element, see docs/benchmarks.md): every
        reconciled set compared element by element with the mirror, so a single deleted or added
        element is seen too. Both compare the table's structure with ``structure``
        (``structure_problem``: a few ms whatever the sets hold). A difference sets ``needs_full``: the
        next ``sync_all`` re-reads the kernel and repairs it (a diff, or one atomic replace when
        a set was flushed). Nothing is checked, and ``""`` returned, while ``needs_full`` is
        already set or before the first sync. The kernel's own failures raise ``DataplaneError``.
        """
        layout, mirror = self.layout, self.mirror
        if self.needs_full or layout is None or mirror is None:
            return ""
        if full:
            problem = _compare(self.dataplane.read(), layout, mirror) or \
                structure_problem(self.dataplane, layout, self.structure)
        else:
            problem = probe(self.dataplane, layout, self.structure)
        if problem:
            self.needs_full = True
        elif full:
            self.verified = True
        return problem

    def _followed(self, tx: Transaction) -> int:
        """The digest once ``tx`` (an element diff against the mirror) is applied: one XOR per
        element it adds or deletes in the digested sets."""
        value = self.digest
        digested = _digested(self.layout) if self.layout is not None else frozenset()
        for op in tx.operations:
            if isinstance(op, AddElements) and op.container in digested:
                for key, _ in op.items:
                    value ^= element_hash(op.container, key)
            elif isinstance(op, DeleteElements) and op.container in digested:
                for key in op.keys:
                    value ^= element_hash(op.container, key)
        return value

    def _apply(self, tx: Transaction, target: int) -> int:
        """Run the kernel part of ``tx`` (the mode view is ours alone); returns its element count
        (marks not counted). ``target`` is the digest of the subscriber sets once ``tx`` is
        applied: its mark, with the generation this commit will have, replaces the old one in
        the same transaction, but only while the table's generation is still the one our own
        last commit (or read) left; after anyone else's commit the old mark is deleted and none
        written, until a read-back or a replace knows the table again (``_carries``)."""
        operations = [op for op in tx.operations if isinstance(op, (ReplaceTable, MarkStructure))
                      or not op.container.startswith(MODE_PREFIX)]
        kernel = Transaction(tx.table, operations)
        count = kernel.element_count()
        replaced = any(isinstance(op, ReplaceTable) for op in operations)
        generation = self.dataplane.generation()
        known = replaced or generation == self._generation
        if not operations and (not known or self._marks == {digest_mark(target, generation)}):
            self.digest = target   # the table holds it already
            return 0               # nothing to change, nor a mark to write: no commit at all
        marks = set() if replaced else self._marks
        mark = digest_mark(target, generation + 1) if known else None
        kernel.delete(TAG_SET, sorted(marks))
        if mark is not None:
            kernel.add(TAG_SET, [(mark, None)])
        try:
            self.dataplane.apply(kernel)
        except DataplaneError:
            self.needs_full = True
            raise
        self.digest, self._marks = target, {mark} if mark is not None else set()
        self._generation = generation + 1 if known else None
        return count


class _Listed(NamedTuple):
    """What a listing of the table gave of the carried timeout sets (``Reconciler._carry``)."""

    expiring: Expiring
    at: float   # ``time.monotonic()`` just before the listing


_SENTINEL_KEYS = frozenset(SENTINELS.values())


def _longest_lived(item: tuple[str, int, int]) -> tuple[int, str]:
    """The order ``_carry`` keeps carried elements in: most time left first, then by key."""
    return -item[2], item[0]


#: How the kernel (through nft) refuses an element a replace carries (``carry_refused``): an
#: expiry above its timeout (ERANGE), a set full (ENFILE), a timeout the set does not take
#: (EINVAL), a timeout beyond nft's range. Measured with nft 1.0.6 on Linux 6.1; nft 1.0.6 echoes
#: the first line of its input, not the failing one, so the message alone must do.
_ELEMENT_REFUSALS = ("Numerical result out of range", "Too many open files in system", "Invalid argument",
                     "value too large")
#: The set a failure names as the one its failing line adds to: nft's echo of the command (an nft
#: that echoes the failing line: 1.0.6 echoes the input's first one), the ipset backend's
#: ``(adding to set NAME)`` (``IpsetDataplane._replace``).
_FAILED_SET = re.compile(r"^add element inet \S+ ([\w-]+) \{|\(adding to set ([\w-]+)\)", re.MULTILINE)


def carry_refused(message: str, carried: Collection[str]) -> bool:
    """Could the failure ``message`` of a replace carrying elements into the sets ``carried``
    (``Reconciler._carry``) be theirs, so that the replace without them may succeed? When the
    message names the set its failing line adds to, whether that is one of ``carried``;
    else whether it is how the kernel refuses an element such as these (``_ELEMENT_REFUSALS``).
    Not a lack of memory or buffers, a permission, a missing object, a parse error (the keys
    come from the kernel's own listing), a tool that hung: a replace without them would fail the
    same way, 2 s later at 100k subscribers, and the log would blame them wrongly; the repair
    loop tries again. (EINVAL may also be a rule's: then one replace more is tried, in vain.)"""
    named = {name for match in _FAILED_SET.finditer(message) for name in match.groups() if name}
    if named:
        return not named.isdisjoint(carried)
    return any(refusal in message for refusal in _ELEMENT_REFUSALS)


#: Elements in a sync above which the C heap is trimmed after it (``_trim_heap``).
BIG_TRANSACTION = 10_000


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    libnftables parses a transaction of 125k elements into ~50 MB of its own structures and
    frees them after; glibc keeps the freed pages, so without this the daemon's RSS keeps the
    peak of its largest sync for good (measured at 100k: 456 -> 355 MB, a few ms).
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def _diff(tx: Transaction, current: Mapping[str, Mapping[str, str | None]],
          desired: Mapping[str, Mapping[str, str | None]]) -> None:
    """Deletes (of missing or changed keys) before adds, so a changed verdict is delete+add. A
    container that is the same object on both sides (a trusted table's) is not compared."""
    for container, want in desired.items():
        have = current.get(container, {})
        if have is not want:
            tx.delete(container, [k for k, v in have.items() if k not in want or want[k] != v])
    for container, want in desired.items():
        have = current.get(container, {})
        if have is not want:
            tx.add(container, [(k, v) for k, v in want.items() if k not in have or have[k] != v])


def changed_networks(before: Mapping[str, Mapping[str, str | None]],
                     after: Mapping[str, Mapping[str, str | None]]) -> set[Key]:
    """Addresses whose mode-map entry was added, removed or changed between two states, as
    keys (version, prefix length, text): no ``ipaddress`` object built."""
    return set(_changed(before, after))


class _Preferred:
    """Who a contested address goes to (``_desired_exact``): whoever holds it now (in the
    kernel; at a start, by the saved decisions), then the lower id. Iterated by id; sorted
    only when iterated: without a clash (nearly always) nobody asks."""

    def __init__(self, decisions: Mapping[str, Decision], owned: Mapping[str, Decision],
                 before: Mapping[str, Decision]) -> None:
        self._decisions, self._owned, self._before = decisions, owned, before

    def holding(self, sid: str) -> tuple[Key, ...]:
        """The keys ``sid`` holds now."""
        current = self._owned.get(sid) or self._before.get(sid)
        if current is None or not current.restricted or current.subscriber is None:
            return ()
        return current.subscriber.keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._decisions))


def _nested(groups: Mapping[tuple[int, int, Mode], tuple[list[str], list[str]]]) -> bool:
    """Does a prefix of one subscriber lie around (or inside) another's address? Equal keys are
    found as they are grouped; nesting needs two prefix lengths in one family (a gateway with
    /32s and /128s alone does no work here). Then, shortest length first, each key masked to
    every shorter length in use is looked up among that length's keys: one dict lookup per
    key and shorter length, no sort (158 -> 60 ms for 100k /64s beside 25k /56s)."""
    used: dict[int, set[int]] = {}
    for version, plen, _ in groups:
        used.setdefault(version, set()).add(plen)
    for version, plens in used.items():
        if len(plens) < 2:
            continue      # nothing to look at: no pair list is built for 125k keys
        by_length: dict[int, list[tuple[str, str]]] = {}
        for (v, plen, _), (keys, sids) in groups.items():
            if v == version:
                by_length.setdefault(plen, []).extend(zip(keys, sids, strict=True))
        family, width = (socket.AF_INET, 32) if version == 4 else (socket.AF_INET6, 128)
        shorter: list[tuple[int, dict[int, str]]] = []      # (host bits, value -> holder)
        for plen in sorted(by_length):
            held: dict[int, str] = {}
            for key, sid in by_length[plen]:
                value = int.from_bytes(socket.inet_pton(family, key), "big")
                for bits, values in shorter:
                    holder = values.get(value >> bits << bits)
                    if holder is not None and holder != sid:
                        return True
                held[value] = sid
            shorter.append((width - plen, held))
    return False


def _changed(before: Mapping[str, Mapping[str, str | None]],
             after: Mapping[str, Mapping[str, str | None]]) -> list[Key]:
    """``changed_networks`` as a list; a mode view that is the same object on both sides (a
    trusted table, ``Reconciler._carries``) is skipped unread."""
    out: list[Key] = []
    for container in before.keys() | after.keys():
        if not container.startswith(MODE_PREFIX):
            continue
        old, new = before.get(container) or {}, after.get(container) or {}
        if old is new:
            continue
        keys = [k for k, v in new.items() if old.get(k, "absent") != v] if old else list(new)
        keys += [k for k in old if k not in new]
        version, plen = mode_prefix(container)
        out.extend((version, plen, key) for key in keys)
    return out


def _compact(elements: Elements) -> Elements:
    """What the mirror keeps of a table's elements: the mode views and the garden hosts. The
    subscriber sets' elements follow from the mode views (``placements``), so they are not
    kept twice (``_implied`` makes them again when a full sync or check needs them)."""
    return {name: items for name, items in elements.items()
            if name.startswith(MODE_PREFIX) or name in HOST_ALLOW.values()}


def _implied(elements: Elements) -> Elements:
    """``_compact``'s inverse: the mode views with the subscriber sets' elements they imply."""
    out = dict(elements)
    for container, view in elements.items():
        if not container.startswith(MODE_PREFIX):
            continue
        version, plen = mode_prefix(container)
        for mode, verdict in MODE_VERDICTS.items():
            keys = [key for key, value in view.items() if value == verdict]
            for name, value in placements(version, plen, mode)[1:]:
                out.setdefault(name, {}).update(dict.fromkeys(keys, value))
    return out


@functools.cache
def _digested(layout: Layout) -> frozenset[str]:
    """The sets the digest covers: the subscriber sets. Not the garden hosts' ``allowhost``: a
    start knows none until they are resolved again (``_carries`` reads those two back)."""
    return frozenset(layout.containers()).difference(HOST_ALLOW.values())


def _marks(state: TableState | None, layout: Layout) -> set[str]:
    """The digest marks a table read back holds: ``layouttag``'s elements but the tag's own."""
    if state is None or state.layout_tag != layout.tag:
        return set()
    return set(state.elements.get(TAG_SET, {})) - {tag_address(layout.tag)}


def probe(dataplane: Dataplane, layout: Layout, structure: Structure | None = None) -> str:
    """The cheap check alone, touching no reconciler state, so it may run on another thread
    (with ``dataplane.reader()``): one batch of ``get element`` for the layout tag's element and
    every sentinel, then the structure compared with ``structure`` (``structure_problem``); only
    when the lookups fail is the table looked at more closely, to say what."""
    if dataplane.holds_layout(layout.tag, layout.containers()):
        return structure_problem(dataplane, layout, structure)
    problem = _tag_problem(dataplane.layout_tag(), layout)
    if not problem:
        flushed = dataplane.missing_sentinels(layout.containers())
        problem = f"set(s) flushed: {_few(flushed)}" if flushed else ""
    return problem


def structure_problem(dataplane: Dataplane, layout: Layout, reference: Structure | None) -> str:
    """"" when the table's structure is ``reference``'s (or there is nothing to compare: no
    reference yet, or a backend without a fingerprint), else what differs. No element of a
    reconciled, timeout or dynamic set is read (~5 ms at 100k subscribers, tests/bench/bench_table_structure.py)."""
    if reference is None or not reference.fingerprint:
        return ""
    now = dataplane.structure(layout)
    if now is None:
        return "table missing"
    return "" if now.fingerprint == reference.fingerprint else f"structure changed: {describe(reference, now)}"


def audit(dataplane: Dataplane, layout: Layout) -> str:
    """Do the table's subscriber sets still hash to the digest mark our last transaction wrote
    with them? ``""`` if so (or when there is no mark: nothing to compare), else what is wrong:
    an element added or deleted with ``nft`` behind our back since.

    Like ``probe`` it touches no reconciler state, so it may run on another thread with
    ``dataplane.reader()``: the table is compared with itself (one listing is one generation of
    the ruleset), not with the mirror, so a transaction committed meanwhile cannot make it
    report a difference that is not there. It lists every element (~1 s at 100k subscribers).
    """
    state = dataplane.read()
    problem = _tag_problem(state.layout_tag if state else None, layout)
    if problem or state is None:
        return problem
    flushed = sorted(set(layout.containers()) - state.sealed)
    if flushed:
        return f"set(s) flushed: {_few(flushed)}"
    marks = _marks(state, layout)
    if marks and {mark_digest(m) for m in marks} != {digest(state.elements, _digested(layout))}:
        return (f"the subscriber sets do not hash to the digest mark{'s' if len(marks) > 1 else ''} "
                f"{', '.join(sorted(marks))}: elements added or deleted behind our back")
    return ""


def _tag_problem(tag: str | None, layout: Layout) -> str:
    if tag is None:
        return "table missing"
    return "" if tag == layout.tag else f"layout {tag} instead of {layout.tag}"


def _few(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _compare(state: TableState | None, layout: Layout, mirror: TableState) -> str:
    """What differs between the kernel's reconciled sets and the mirror, in a line or two."""
    problem = _tag_problem(state.layout_tag if state else None, layout)
    if problem or state is None:
        return problem
    problems: list[str] = []
    wanted = _implied(mirror.elements)
    for name in layout.containers():
        have = state.elements.get(name)
        if have is None:
            problems.append(f"{name} missing")
            continue
        if name not in state.sealed:
            problems.append(f"{name} flushed")
        want = wanted.get(name, {})
        if have != want:
            gone = sorted(k for k in want if k not in have)
            extra = sorted(k for k in have if k not in want)
            parts = ([f"{len(gone)} missing (e.g. {gone[0]})"] if gone else []) + \
                    ([f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else [])
            problems.append(f"{name}: " + ", ".join(parts or ["values differ"]))
    return "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")

"""Desired decisions → the smallest transaction that makes the kernel match them.

Like kube-proxy's nftables proxier: keep a mirror of what we put in each container, emit only
changed elements, and fall back to one atomic full sync at start-up and after any failure.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .dataplane.backend import Dataplane, DataplaneError
from .dataplane.layout import HOST_ALLOW, MODE_PREFIX, Layout, elements_for
from .dataplane.state import TableState
from .dataplane.transaction import Transaction
from .policy import Decision
from .subscribers import Network

log = logging.getLogger(__name__)

Element = tuple[str, str, str | None]  # (container, key, value)


@dataclass
class SyncResult:
    kind: str                       # "full" (table replaced) or "partial" (element diff)
    elements: int                   # elements added or deleted
    changed: set[Network] = field(default_factory=set)  # enforcement changed: flush their connections


def subscriber_elements(decision: Decision) -> frozenset[Element]:
    if not decision.restricted or decision.subscriber is None:
        return frozenset()
    return frozenset(e for network in decision.subscriber.addresses
                     for e in elements_for(network, decision.mode))


def _prefixes(decisions: Iterable[Decision]) -> set[tuple[int, int]]:
    return {(n.version, n.prefixlen) for d in decisions if d.restricted and d.subscriber
            for n in d.subscriber.addresses}


class Reconciler:
    """Owns the mirror of our table; every kernel change goes through here."""

    def __init__(self, dataplane: Dataplane, base_layout: Layout) -> None:
        self.dataplane = dataplane
        self.base_layout = base_layout
        self.layout: Layout | None = None
        self.mirror: TableState | None = None
        self.owned: dict[str, frozenset[Element]] = {}
        self.owner: dict[tuple[str, str], str] = {}
        self.host_allow: dict[str, None] = {}
        self.needs_full = True

    # -- whole-state syncs -------------------------------------------------------------
    def sync_all(self, decisions: Mapping[str, Decision], read_kernel: bool = False) -> SyncResult:
        """Make the whole table match ``decisions``.

        With ``read_kernel`` (start-up, after a failure) the mirror is first rebuilt from what
        the kernel really holds, so restarting never opens a window: a matching table gets an
        element diff, anything else one atomic replace.
        """
        layout = self.base_layout.with_prefixes(_prefixes(decisions.values()))
        if read_kernel or self.mirror is None:
            self.mirror = self.dataplane.read()
            self.layout = layout if self.mirror and self.mirror.layout_tag == layout.tag else None
        owned, owner, conflicts = self._assign(decisions)
        desired: dict[str, dict[str, str | None]] = {name: {} for name in layout.containers()}
        for elements in owned.values():
            for container, key, value in elements:
                desired[container][key] = value
        for address in self.host_allow:
            desired[HOST_ALLOW[6 if ":" in address else 4]][address] = None
        tx = Transaction(self.dataplane.table)
        if self.layout is None or self.layout.tag != layout.tag or self.mirror is None:
            tx.replace_table(layout)
            for container, items in desired.items():
                tx.add(container, items.items())
            kind, before = "full", self.mirror or TableState(None)
        else:
            kind, before = "partial", self.mirror
            _diff(tx, before.elements, desired)
        self._apply(tx)
        changed = changed_networks(before.elements, desired)
        self.layout, self.mirror = layout, TableState(layout.tag, desired)
        self.owned, self.owner = owned, owner
        self.needs_full = False
        for sid, holder in conflicts:
            log.warning("address conflict: %s is not enforced for %s, already held by %s", sid, sid, holder)
        return SyncResult(kind, tx.element_count(), changed)

    def _assign(self, decisions: Mapping[str, Decision]) -> tuple[dict, dict, list]:
        owned: dict[str, frozenset[Element]] = {}
        owner: dict[tuple[str, str], str] = {}
        conflicts: list[tuple[str, str]] = []
        for sid in sorted(decisions):
            elements = subscriber_elements(decisions[sid])
            if not elements:
                continue
            clash = next((owner[(c, k)] for c, k, _ in elements if (c, k) in owner), None)
            if clash is not None:
                conflicts.append((sid, clash))
                continue
            owned[sid] = elements
            for container, key, _ in elements:
                owner[(container, key)] = sid
        return owned, owner, conflicts

    # -- small changes -----------------------------------------------------------------
    def update(self, decisions: Mapping[str, Decision]) -> SyncResult:
        """Apply new decisions for a few subscribers as an element diff."""
        if self.needs_full or self.mirror is None or self.layout is None:
            raise DataplaneError("a full sync is required first")
        if not self.layout.prefixes >= _prefixes(decisions.values()):
            raise NeedsFullSync("a new prefix length needs a layout change")
        tx = Transaction(self.dataplane.table)
        new_owned: dict[str, frozenset[Element]] = {}
        for sid, decision in decisions.items():
            elements = subscriber_elements(decision)
            for container, key, _ in elements:
                holder = self.owner.get((container, key))
                if holder is not None and holder != sid:
                    raise AddressConflict(f"{key} is already enforced for subscriber {holder}")
            new_owned[sid] = elements
        before = {sid: self.owned.get(sid, frozenset()) for sid in decisions}
        removed = [e for sid in decisions for e in before[sid] - new_owned[sid]]
        added = [e for sid in decisions for e in new_owned[sid] - before[sid]]
        old: dict[str, dict[str, str | None]] = {}
        new: dict[str, dict[str, str | None]] = {}
        for container, key, value in removed:
            old.setdefault(container, {})[key] = value
        for container, key, value in added:
            new.setdefault(container, {})[key] = value
        _diff(tx, old, {c: new.get(c, {}) for c in old.keys() | new.keys()})
        self._apply(tx)
        changed = {_network(c, k) for c, k, _ in removed + added if c.startswith(MODE_PREFIX)}
        for sid in decisions:
            if before[sid] == new_owned[sid]:
                continue
            for container, key, _ in before[sid]:
                self.mirror.elements[container].pop(key, None)
                self.owner.pop((container, key), None)
            for container, key, value in new_owned[sid]:
                self.mirror.elements[container][key] = value
                self.owner[(container, key)] = sid
            if new_owned[sid]:
                self.owned[sid] = new_owned[sid]
            else:
                self.owned.pop(sid, None)
        return SyncResult("partial", tx.element_count(), changed)

    def set_host_allow(self, addresses: Iterable[str]) -> None:
        """Addresses that walled-garden hostnames resolve to, kept as a diff like the rest."""
        wanted = dict.fromkeys(sorted(set(addresses)))
        if self.mirror is None or self.needs_full:
            self.host_allow = wanted
            return
        tx = Transaction(self.dataplane.table)
        for version in (4, 6):
            name = HOST_ALLOW[version]
            current = self.mirror.elements.get(name, {})
            mine = {a: None for a in wanted if (":" in a) == (version == 6)}
            tx.delete(name, [a for a in current if a not in mine])
            tx.add(name, [(a, None) for a in mine if a not in current])
        self._apply(tx)
        self.host_allow = wanted
        for version in (4, 6):
            self.mirror.elements[HOST_ALLOW[version]] = {a: None for a in wanted
                                                         if (":" in a) == (version == 6)}

    def _apply(self, tx: Transaction) -> None:
        try:
            self.dataplane.apply(tx)
        except DataplaneError:
            self.needs_full = True
            raise


class NeedsFullSync(DataplaneError):
    """The change cannot be a diff (e.g. a new prefix length); run ``sync_all``."""


class AddressConflict(ValueError):
    """An address is already enforced for another subscriber."""


def _diff(tx: Transaction, current: Mapping[str, Mapping[str, str | None]],
          desired: Mapping[str, Mapping[str, str | None]]) -> None:
    for container, want in desired.items():
        have = current.get(container, {})
        tx.delete(container, [k for k, v in have.items() if k not in want or want[k] != v])
    for container, want in desired.items():
        have = current.get(container, {})
        tx.add(container, [(k, v) for k, v in want.items() if k not in have or have[k] != v])


def _network(container: str, key: str) -> Network:
    return ipaddress.ip_network(f"{key}/{container.rsplit('_', 1)[1]}")


def changed_networks(before: Mapping[str, Mapping[str, str | None]],
                     after: Mapping[str, Mapping[str, str | None]]) -> set[Network]:
    """Addresses whose mode-map entry was added, removed or changed between two states."""
    out: set[Network] = set()
    for container in before.keys() | after.keys():
        if not container.startswith(MODE_PREFIX):
            continue
        old, new = before.get(container, {}), after.get(container, {})
        out.update(_network(container, k) for k in old.keys() ^ new.keys())
        out.update(_network(container, k) for k in old.keys() & new.keys() if old[k] != new[k])
    return out

"""An in-memory dataplane with the kernel's rules of conduct, for unit tests.

It fails where nftables fails (deleting a missing element, re-adding a map key with another
verdict, touching a container the layout does not have) and applies nothing of a failed
transaction, so reconciler tests catch the mistakes the kernel would. It implements the whole
``Dataplane`` Protocol; ``tests/unit/test_dataplane_conformance.py`` holds it to the kernel's
behaviour. ``flush_set`` and ``drop_element`` play another tool changing the table behind our back;
``delete_rule`` and ``make_dormant`` change its structure (``structure``) as ``nft`` would.

The structure: a fake table's chains are named after the layout, each holding two rules, so a
fresh table of a layout has a fingerprint known before it is installed (``expected_structure``,
as the ipset backend's rendered rules), unless ``predicts_structure`` is False: then, as with
nftables, only a reading after our own install knows it, and the reconciler marks it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .backend import DataplaneError
from .layout import CALLER_SET, CALLER_TIMEOUT, COUNTERS, TAG_SET, Layout, carried_set, tag_address, with_mode_view
from .state import STRUCTURE_COMMENT, Expiring, Structure, TableState, fingerprint, marked_fingerprint
from .transaction import (
    AddElements,
    AddExpiring,
    DeleteElements,
    DropElements,
    MarkStructure,
    ReplaceTable,
    Transaction,
)

#: A caller's time in ``portalcallerV`` (``saw_caller``), in seconds.
_CALLER_SECONDS = int(CALLER_TIMEOUT.rstrip("m")) * 60
#: A fake table's chains (``structure``); each is created with ``_RULES`` rules.
CHAINS = ("forward", "from_subscriber", "garden", "input", "prerouting")
_RULES = 2


class FakeDataplane:
    def __init__(self, table: str = "walled_garden", callers_seen_by_default: bool = True,
                 predicts_structure: bool = True) -> None:
        """``callers_seen_by_default``: ``recent_caller`` answers True for every address (tests
        that predate the portal-caller check); strict tests pass False and mark callers with
        ``saw_caller``. ``predicts_structure``: see the module docstring."""
        self.table = table
        self.state: TableState | None = None
        self.transactions: list[Transaction] = []
        self.fail_next: str | None = None  # make the next apply fail with this message
        self.callers_seen_by_default = callers_seen_by_default
        self.callers: dict[str, tuple[int, int]] = {}   # address → (timeout, seconds left)
        self.counter_values: dict[str, tuple[int, int]] = {}
        self.generation_id = 1   # the kernel's ruleset generation: one more per committed change
        self.predicts_structure = predicts_structure
        #: chain → its rules (``structure``); None: as an install of the table's layout made them (a
        #: table a test put in ``state`` itself)
        self.chains: dict[str, list[str]] | None = None
        self.dormant = False
        self.structure_comment: str | None = None   # the layout tag element's comment (``MarkStructure``)

    def apply(self, tx: Transaction) -> None:
        if self.fail_next:
            message, self.fail_next = self.fail_next, None
            raise DataplaneError(message)
        state = self.state.copy() if self.state else None
        chains, dormant, comment = self.chains, self.dormant, self.structure_comment
        callers = dict(self.callers)
        for op in tx.operations:
            if isinstance(op, ReplaceTable):
                names = [*op.layout.containers(), *op.layout.ack_sets()]
                state = TableState(op.layout.tag, {name: {} for name in names}, set(op.layout.containers()))
                state.elements[TAG_SET] = {tag_address(op.layout.tag): None}
                chains, dormant, comment = None, False, None
                callers = {}   # the caller sets are part of the table: a new table starts them empty
                continue
            if state is None:
                raise DataplaneError(f"No such file or directory: table inet {self.table}")
            if isinstance(op, AddExpiring):   # as the kernel: an expiry above its timeout is refused
                for key, timeout, left in op.items:
                    if not 0 < left <= timeout:
                        raise DataplaneError("Could not process rule: Numerical result out of range "
                                             f"({op.container} {key})")
            if isinstance(op, AddExpiring) and op.container in CALLER_SET.values():
                callers.update({key: (timeout, left) for key, timeout, left in op.items})
                continue
            if isinstance(op, MarkStructure):
                if tag_address(op.tag) not in state.elements.get(TAG_SET, {}):
                    raise DataplaneError(f"No such file or directory: {TAG_SET} {tag_address(op.tag)}")
                comment = STRUCTURE_COMMENT + op.fingerprint
                continue
            container = state.elements.get(op.container)
            if container is None:
                raise DataplaneError(f"No such file or directory: {op.container}")
            if isinstance(op, AddElements):
                for key, value in op.items:
                    if key in container and container[key] != value:
                        raise DataplaneError(f"File exists: {op.container} {key}")
                    container[key] = value
                    if op.timeout:   # an acknowledgement: listed with its expiry, as by the kernel
                        state.expiring.setdefault(op.container, {})[key] = (op.timeout, op.timeout)
            elif isinstance(op, AddExpiring):
                for key, timeout, left in op.items:
                    container[key] = None
                    state.expiring.setdefault(op.container, {})[key] = (timeout, left)
            elif isinstance(op, DeleteElements):
                for key in op.keys:
                    if key not in container:
                        raise DataplaneError(f"No such file or directory: {op.container} {key}")
                    del container[key]
                    state.expiring.get(op.container, {}).pop(key, None)
            elif isinstance(op, DropElements):   # there or not (``transaction.DropElements``)
                for key in op.keys:
                    container.pop(key, None)
                    state.expiring.get(op.container, {}).pop(key, None)
        self.state = state
        self.chains, self.dormant, self.structure_comment = chains, dormant, comment
        self.callers = callers
        if tx.operations:
            self.generation_id += 1
        self.transactions.append(tx)

    @property
    def view(self) -> dict[str, dict[str, str | None]]:
        """The elements plus the reconciler's mode view they imply (``mode4_32`` → key → verdict),
        so tests can ask "which mode is this address in" the way the daemon does."""
        state = with_mode_view(self.state)
        return {} if state is None else state.elements

    def read(self) -> TableState | None:
        """The table, with the expiry of the carried sets' elements as a listing gives it
        (``TableState.expiring``: ``kernel.parse_listing`` keeps only ``carried_set``'s)."""
        if self.state is None:
            return None
        state = self.state.copy()
        state.expiring = {name: items for name, items in state.expiring.items() if carried_set(name)}
        state.expiring.update({name: self._callers(version) for version, name in CALLER_SET.items()})
        return state

    def layout_tag(self) -> str | None:
        return self.state.layout_tag if self.state else None

    def holds_layout(self, tag: str, containers: Iterable[str], mark: str | None = None) -> bool:
        return (self.state is not None and self.state.layout_tag == tag and not self.missing_sentinels(containers)
                and (mark is None or mark in self.state.elements.get(TAG_SET, {})))

    def generation(self) -> int:
        return self.generation_id

    def structure(self, layout: Layout) -> Structure | None:
        if self.state is None:
            return None
        marked = self.structure_comment if self.state.layout_tag == layout.tag else None
        return _structure(self._chains(), self.dormant, marked_fingerprint(marked))

    def expected_structure(self, layout: Layout) -> str:
        return _structure(_fresh_chains(layout.tag), False).fingerprint if self.predicts_structure else ""

    def _chains(self) -> dict[str, list[str]]:
        if self.chains is None:
            self.chains = _fresh_chains(self.state.layout_tag if self.state and self.state.layout_tag else "")
        return self.chains

    def read_sets(self, names: Iterable[str]) -> TableState | None:
        if self.state is None:
            return None
        wanted = list(names)
        if any(name not in self.state.elements for name in wanted):
            return None   # as the kernel's listing of a missing set
        return TableState(None, {name: dict(self.state.elements[name]) for name in wanted},
                          self.state.sealed.intersection(wanted))

    def read_timeouts(self, names: Iterable[str]) -> Expiring:
        """The expiry of these sets' elements added with one (the callers', acknowledgements',
        elements carried in), as added: no clock runs here."""
        if self.state is None:
            return {}
        out: Expiring = {}
        for name in names:
            if name in CALLER_SET.values():
                out[name] = self._callers(6 if name == CALLER_SET[6] else 4)
            elif name in self.state.elements:
                out[name] = dict(self.state.expiring.get(name, {}))
        return out

    def _callers(self, version: int) -> dict[str, tuple[int, int]]:
        return {key: expiry for key, expiry in self.callers.items() if (":" in key) == (version == 6)}

    def missing_sentinels(self, containers: Iterable[str]) -> list[str]:
        sealed = self.state.sealed if self.state else set()
        return [name for name in containers if name not in sealed]

    def counters(self) -> dict[str, tuple[int, int]]:
        """The layout's named counters, zero unless a test set ``counter_values``; none without a table."""
        return {name: self.counter_values.get(name, (0, 0)) for name in COUNTERS} if self.state else {}

    def reader(self) -> FakeDataplane:
        """Reads off the kernel thread see the same (in-memory) table."""
        return self

    def recent_caller(self, address: str) -> bool:
        try:
            parsed = str(ipaddress.ip_address(address))
        except ValueError:
            raise ValueError(f"recent_caller: {address!r} is not an IP address") from None
        if self.callers_seen_by_default:
            return True
        return self.state is not None and parsed in self.callers

    # -- what the packet path and other tools do ------------------------------------------
    def saw_caller(self, address: str) -> None:
        """``address`` connected to the portal's ports (the kernel's input hook records it).
        Needs the table, as the kernel does; a new table starts without it (unless the
        replacing transaction carries it over, ``AddExpiring``), as does a deleted one."""
        if self.state is None:
            raise DataplaneError(f"No such file or directory: table inet {self.table}")
        self.callers[str(ipaddress.ip_address(address))] = (_CALLER_SECONDS, _CALLER_SECONDS)

    def flush_set(self, name: str) -> None:
        """``nft flush set``: every element goes, the sentinel too."""
        if self.state is None or name not in self.state.elements:
            raise DataplaneError(f"No such file or directory: {name}")
        self.state.elements[name].clear()
        self.state.sealed.discard(name)
        self.generation_id += 1

    def drop_element(self, name: str, key: str) -> None:
        """``nft delete element`` by someone else."""
        if self.state is None or key not in self.state.elements.get(name, {}):
            raise DataplaneError(f"No such file or directory: {name} {key}")
        del self.state.elements[name][key]
        self.generation_id += 1

    def add_element(self, name: str, key: str) -> None:
        """``nft add element`` by someone else."""
        if self.state is None or name not in self.state.elements:
            raise DataplaneError(f"No such file or directory: {name}")
        self.state.elements[name][key] = None
        self.generation_id += 1

    def drop_table(self) -> None:
        """``nft delete table`` (or ``flush ruleset``) by someone else."""
        self.state = None
        self.chains, self.dormant, self.structure_comment = None, False, None
        self.callers.clear()
        self.generation_id += 1

    def delete_rule(self, chain: str = "forward") -> None:
        """``nft delete rule inet <table> <chain> handle N`` by someone else (the chain's first)."""
        if self.state is None or not self._chains().get(chain):
            raise DataplaneError(f"No such file or directory: rule in {chain}")
        self._chains()[chain] = self._chains()[chain][1:]
        self.generation_id += 1

    def make_dormant(self) -> None:
        """``nft add table inet <table> { flags dormant; }`` by someone else."""
        if self.state is None:
            raise DataplaneError(f"No such file or directory: table inet {self.table}")
        self.dormant = True
        self.generation_id += 1

    def dump(self) -> str:
        """Every transaction applied so far as ``nft -f`` text."""
        return "".join(tx.render() for tx in self.transactions)


def _fresh_chains(tag: str) -> dict[str, list[str]]:
    """A fake table's chains as a fresh install of the layout with this tag makes them."""
    return {chain: [f"{tag} {chain} {n}" for n in range(_RULES)] for chain in CHAINS}


def _structure(chains: dict[str, list[str]], dormant: bool, marked: str = "") -> Structure:
    parts = {"table": f"flags {int(dormant)}", **{f"chain {name}": " | ".join(rules) for name, rules in chains.items()}}
    return Structure(fingerprint(parts), parts, {name: len(rules) for name, rules in chains.items()}, dormant, marked)

"""An in-memory dataplane with the kernel's rules of conduct, for unit tests.

It fails where nftables fails (deleting a missing element, re-adding a map key with another
verdict, touching a container the layout does not have) and applies nothing of a failed
transaction, so reconciler tests catch the mistakes the kernel would. It implements the whole
``Dataplane`` Protocol; ``tests/unit/test_dataplane_conformance.py`` holds it to the kernel's
behaviour. ``flush_set`` and ``drop_element`` play another tool changing the table behind our back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .backend import DataplaneError
from .layout import COUNTERS, TAG_SET, tag_address, with_mode_view
from .state import TableState
from .transaction import AddElements, DeleteElements, ReplaceTable, Transaction


class FakeDataplane:
    def __init__(self, table: str = "walled_garden", callers_seen_by_default: bool = True) -> None:
        """``callers_seen_by_default``: ``recent_caller`` answers True for every address (tests
        that predate the portal-caller check); strict tests pass False and mark callers with
        ``saw_caller``."""
        self.table = table
        self.state: TableState | None = None
        self.transactions: list[Transaction] = []
        self.fail_next: str | None = None  # make the next apply fail with this message
        self.callers_seen_by_default = callers_seen_by_default
        self.callers: set[str] = set()
        self.counter_values: dict[str, tuple[int, int]] = {}
        self.generation_id = 1   # the kernel's ruleset generation: one more per committed change

    def apply(self, tx: Transaction) -> None:
        if self.fail_next:
            message, self.fail_next = self.fail_next, None
            raise DataplaneError(message)
        state = self.state.copy() if self.state else None
        replaced = False
        for op in tx.operations:
            if isinstance(op, ReplaceTable):
                names = [*op.layout.containers(), *op.layout.ack_sets()]
                state = TableState(op.layout.tag, {name: {} for name in names}, set(op.layout.containers()))
                state.elements[TAG_SET] = {tag_address(op.layout.tag): None}
                replaced = True
                continue
            if state is None:
                raise DataplaneError(f"No such file or directory: table inet {self.table}")
            container = state.elements.get(op.container)
            if container is None:
                raise DataplaneError(f"No such file or directory: {op.container}")
            if isinstance(op, AddElements):
                for key, value in op.items:
                    if key in container and container[key] != value:
                        raise DataplaneError(f"File exists: {op.container} {key}")
                    container[key] = value
            elif isinstance(op, DeleteElements):
                for key in op.keys:
                    if key not in container:
                        raise DataplaneError(f"No such file or directory: {op.container} {key}")
                    del container[key]
        self.state = state
        if tx.operations:
            self.generation_id += 1
        if replaced:   # the caller sets are part of the table: a new table starts them empty
            self.callers.clear()
        self.transactions.append(tx)

    @property
    def view(self) -> dict[str, dict[str, str | None]]:
        """The elements plus the reconciler's mode view they imply (``mode4_32`` → key → verdict),
        so tests can ask "which mode is this address in" the way the daemon does."""
        state = with_mode_view(self.state)
        return {} if state is None else state.elements

    def read(self) -> TableState | None:
        return self.state.copy() if self.state else None

    def layout_tag(self) -> str | None:
        return self.state.layout_tag if self.state else None

    def holds_layout(self, tag: str, containers: Iterable[str], mark: str | None = None) -> bool:
        return (self.state is not None and self.state.layout_tag == tag and not self.missing_sentinels(containers)
                and (mark is None or mark in self.state.elements.get(TAG_SET, {})))

    def generation(self) -> int:
        return self.generation_id

    def read_sets(self, names: Iterable[str]) -> TableState | None:
        if self.state is None:
            return None
        wanted = list(names)
        if any(name not in self.state.elements for name in wanted):
            return None   # as the kernel's listing of a missing set
        return TableState(None, {name: dict(self.state.elements[name]) for name in wanted},
                          self.state.sealed.intersection(wanted))

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
        Needs the table, as the kernel does; lost when the table is replaced."""
        if self.state is None:
            raise DataplaneError(f"No such file or directory: table inet {self.table}")
        self.callers.add(str(ipaddress.ip_address(address)))

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
        self.callers.clear()
        self.generation_id += 1

    def dump(self) -> str:
        """Every transaction applied so far as ``nft -f`` text."""
        return "".join(tx.render() for tx in self.transactions)

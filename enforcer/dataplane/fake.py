"""An in-memory dataplane with the kernel's rules of conduct, for unit tests.

It fails where nftables fails (deleting a missing element, re-adding a map key with another
verdict, touching a container the layout does not have) and applies nothing of a failed
transaction, so reconciler tests catch the mistakes the kernel would.
"""

from __future__ import annotations

from .backend import DataplaneError
from .state import TableState
from .transaction import AddElements, DeleteElements, ReplaceTable, Transaction


class FakeDataplane:
    def __init__(self, table: str = "walled_garden") -> None:
        self.table = table
        self.state: TableState | None = None
        self.transactions: list[Transaction] = []
        self.fail_next: str | None = None  # make the next apply fail with this message

    def apply(self, tx: Transaction) -> None:
        if self.fail_next:
            message, self.fail_next = self.fail_next, None
            raise DataplaneError(message)
        state = self.state.copy() if self.state else None
        for op in tx.operations:
            if isinstance(op, ReplaceTable):
                names = [*op.layout.containers(), *op.layout.ack_sets()]
                state = TableState(op.layout.tag, {name: {} for name in names})
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
        self.transactions.append(tx)

    @property
    def view(self) -> dict[str, dict[str, str | None]]:
        """The elements plus the reconciler's mode view they imply (``mode4_32`` → key → verdict),
        so tests can ask "which mode is this address in" the way the daemon does."""
        from ..reconciler import with_mode_view
        state = with_mode_view(self.state)
        return {} if state is None else state.elements

    def read(self) -> TableState | None:
        return self.state.copy() if self.state else None

    def dump(self) -> str:
        """Every transaction applied so far as ``nft -f`` text."""
        return "".join(tx.render() for tx in self.transactions)

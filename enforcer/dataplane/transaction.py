"""A batch of table changes that the kernel applies all-or-nothing.

Modelled on knftables: callers build a ``Transaction`` of a few kinds of operation, and a
backend runs it atomically. ``render()`` gives ``nft -f`` text, so what the fake records
is exactly what the kernel would be asked to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .layout import TAG_SET, Layout, tag_address
from .state import STRUCTURE_COMMENT


@dataclass(frozen=True)
class ReplaceTable:
    """Create the table afresh with ``layout`` (atomic: no moment without it)."""

    layout: Layout


@dataclass(frozen=True)
class AddElements:
    container: str
    items: tuple[tuple[str, str | None], ...]  # (key, verdict or None for a plain set)
    timeout: int | None = None                  # seconds, for sets with ``flags timeout``


@dataclass(frozen=True)
class AddExpiring:
    """Elements of a timeout set carried into a replaced table (``Reconciler._carry``), each with
    its own timeout and the time it had left: ``{ key timeout Ts expires Rs }`` (the kernel
    refuses an ``expires`` above the ``timeout``, and one without a timeout in a set without a
    default one). Not counted by ``element_count``: nothing of ours, the kernel's."""

    container: str
    items: tuple[tuple[str, int, int], ...]    # (key, timeout s, seconds left), left <= timeout


@dataclass(frozen=True)
class DeleteElements:
    container: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class DropElements:
    """Delete these elements of a timeout set whether it still holds them or not: a notice
    acknowledgement the kernel may have let expire meanwhile, which must not outlive its
    subscriber's hold on the address (``Reconciler._move_acknowledgements``). nft 1.0.6 has no
    ``destroy element`` and a ``delete`` of an absent element fails the whole transaction
    (ENOENT), so it is rendered as an ``add`` (no error for an element already there) then the
    ``delete``, in the same transaction; ipset: ``del ... -exist``. Not counted by
    ``element_count``: the kernel's elements, not ours."""

    container: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class MarkStructure:
    """Write the table's structure fingerprint (``state.Structure``) where a restart finds it:
    as the comment of the layout tag's element in ``layouttag`` (``state.STRUCTURE_COMMENT``),
    that element deleted and added again in the same transaction (never missing). Only for
    a backend whose ``expected_structure`` is unknown (nftables); no set's elements change."""

    tag: str
    fingerprint: str


Operation = ReplaceTable | AddElements | AddExpiring | DeleteElements | DropElements | MarkStructure


@dataclass
class Transaction:
    table: str
    operations: list[Operation] = field(default_factory=list)

    def replace_table(self, layout: Layout) -> None:
        self.operations.append(ReplaceTable(layout))

    def add(self, container: str, items: Iterable[tuple[str, str | None]], timeout: int | None = None) -> None:
        items = tuple(items)
        if items:
            self.operations.append(AddElements(container, items, timeout))

    def add_expiring(self, container: str, items: Iterable[tuple[str, int, int]]) -> None:
        items = tuple(items)
        if items:
            self.operations.append(AddExpiring(container, items))

    def delete(self, container: str, keys: Iterable[str]) -> None:
        keys = tuple(keys)
        if keys:
            self.operations.append(DeleteElements(container, keys))

    def drop(self, container: str, keys: Iterable[str]) -> None:
        keys = tuple(keys)
        if keys:
            self.operations.append(DropElements(container, keys))

    def mark_structure(self, tag: str, fingerprint: str) -> None:
        self.operations.append(MarkStructure(tag, fingerprint))

    def __bool__(self) -> bool:
        return bool(self.operations)

    def element_count(self) -> int:
        return sum(len(op.items) if isinstance(op, AddElements) else len(op.keys)
                   for op in self.operations if isinstance(op, (AddElements, DeleteElements)))

    def render(self) -> str:
        out: list[str] = []
        prefix = f"inet {self.table}"
        for op in self.operations:
            if isinstance(op, ReplaceTable):
                # "add" makes the delete valid when the table is absent; all one batch.
                out.append(f"add table {prefix}\ndelete table {prefix}\n")
                out.append(op.layout.render())
            elif isinstance(op, AddElements):
                if op.timeout:
                    expiry = f" timeout {op.timeout}s"
                    body = ", ".join([f"{key}{expiry}" if value is None else f"{key}{expiry} : {value}"
                                      for key, value in op.items])
                else:   # the cold-load case: 100k+ plain set keys
                    body = ", ".join([key if value is None else f"{key} : {value}" for key, value in op.items])
                out.append(f"add element {prefix} {op.container} {{ {body} }}\n")
            elif isinstance(op, AddExpiring):
                body = ", ".join([f"{key} timeout {timeout}s expires {left}s" for key, timeout, left in op.items])
                out.append(f"add element {prefix} {op.container} {{ {body} }}\n")
            elif isinstance(op, DeleteElements):
                out.append(f"delete element {prefix} {op.container} {{ {', '.join(op.keys)} }}\n")
            elif isinstance(op, DropElements):   # present or not: added first, so the delete finds it
                keys = ", ".join(op.keys)
                out.append(f"add element {prefix} {op.container} {{ {keys} }}\n"
                           f"delete element {prefix} {op.container} {{ {keys} }}\n")
            else:
                tag, comment = tag_address(op.tag), f"{STRUCTURE_COMMENT}{op.fingerprint}"
                out.append(f"delete element {prefix} {TAG_SET} {{ {tag} }}\n"
                           f'add element {prefix} {TAG_SET} {{ {tag} comment "{comment}" }}\n')
        return "".join(out)

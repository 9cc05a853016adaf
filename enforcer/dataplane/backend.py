"""The interface the reconciler and the daemon see, shared by the kernel backend and the fake.

Complete on purpose: callers use these methods directly (never ``getattr``), and
``tests/unit/test_dataplane_conformance.py`` runs the same checks against both implementations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from .layout import Layout
from .state import Expiring, Structure, TableState
from .transaction import Transaction


class DataplaneError(Exception):
    """The kernel refused a transaction or a listing could not be read; nothing was applied."""


class Dataplane(Protocol):
    table: str

    def apply(self, tx: Transaction) -> None:
        """Run ``tx`` atomically or raise ``DataplaneError`` having changed nothing."""

    def read(self) -> TableState | None:
        """Our table as the kernel holds it now, or ``None`` if it does not exist."""

    def layout_tag(self) -> str | None:
        """The layout tag of our table, ``None`` if the table is gone. Costly on a big table (nft
        loads every set to list a chain): for diagnosis, ``holds_layout`` for routine checks."""

    def holds_layout(self, tag: str, containers: Iterable[str], mark: str | None = None) -> bool:
        """The cheap check, one batch of constant-time lookups (~0.3 ms at 100k elements): does
        the table exist with layout ``tag`` and does each of ``containers`` hold its sentinel?
        With ``mark``: and does ``layouttag`` hold that digest mark (``state.digest_mark``)?"""

    def structure(self, layout: Layout) -> Structure | None:
        """What the table is made of apart from the elements that change (``state.Structure``):
        flags, chains, rules, set declarations, ``layout.static_sets``' elements, with the
        fingerprint our own install marked on it. Cheap (no element of a reconciled, timeout or
        dynamic set is read: ~5 ms at 100k subscribers), for the periodic check and every
        start. None when the table is gone; a fingerprint of "" when the backend has nothing of
        its own to fingerprint (the ipset backend with ``rules: external``)."""

    def expected_structure(self, layout: Layout) -> str:
        """The fingerprint a table of ``layout`` has when nobody changed it, when the backend can
        tell without installing one (the ipset backend: its rules as this release renders them;
        the fake); "" when only a reading right after our own install can (nftables: how the
        kernel holds the rules is libnftables' translation of the rendered text)."""

    def generation(self) -> int:
        """The ruleset's generation id: every committed nftables transaction in the network
        namespace, ours or anyone's, moves it on by one (a listing or a lookup does not)."""

    def read_sets(self, names: Iterable[str]) -> TableState | None:
        """Only these sets (small ones: each is listed on its own), ``None`` if the table or one
        of them is gone."""

    def read_timeouts(self, names: Iterable[str]) -> Expiring:
        """The elements of these timeout sets (small ones: each is listed on its own) that expire,
        with their timeout and the seconds they have left; a set that does not exist (or the
        table) is left out, an element without a timeout (a marker) too. What a replace of the
        table carries over (``Reconciler._carry``) when it has not just listed the table."""

    def missing_sentinels(self, containers: Iterable[str]) -> list[str]:
        """Which of ``containers`` no longer hold their sentinel element (flushed, deleted, or the
        table is gone): names them once ``holds_layout`` said something is wrong."""

    def counters(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) of our named counters; no set contents are listed."""

    def reader(self) -> Dataplane:
        """The same table for reads from another thread (its own kernel session): checks,
        counters and caller lookups never wait behind, nor stall, the writes."""

    def recent_caller(self, address: str) -> bool:
        """Did ``address`` connect to the portal's ports from a subscriber interface recently
        (``layout.CALLER_TIMEOUT``)? False when not, or when the table is gone; ``ValueError``
        for something that is not an IP address."""

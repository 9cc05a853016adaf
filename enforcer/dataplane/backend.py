"""The interface the reconciler and the daemon see, shared by the kernel backend and the fake.

Complete on purpose: callers use these methods directly (never ``getattr``), and
``tests/unit/test_dataplane_conformance.py`` runs the same checks against both implementations.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from .state import TableState
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
        """The layout tag of our table (one small listing), ``None`` if the table is gone."""

    def missing_sentinels(self, containers: Iterable[str]) -> list[str]:
        """Which of ``containers`` no longer hold their sentinel element (flushed, deleted, or the
        table is gone): the cheap drift check, one batch of constant-time lookups."""

    def counters(self) -> dict[str, tuple[int, int]]:
        """(packets, bytes) of our named counters; no set contents are listed."""

    def recent_caller(self, address: str) -> bool:
        """Did ``address`` connect to the portal's ports from a subscriber interface recently
        (``layout.CALLER_TIMEOUT``)? False when not, or when the table is gone; ``ValueError``
        for something that is not an IP address."""

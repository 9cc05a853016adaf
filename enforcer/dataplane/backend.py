"""The interface the reconciler sees, shared by the kernel backend and the fake."""

from __future__ import annotations

from typing import Protocol

from .state import TableState
from .transaction import Transaction


class DataplaneError(Exception):
    """The kernel refused a transaction; nothing of it was applied."""


class Dataplane(Protocol):
    table: str

    def apply(self, tx: Transaction) -> None:
        """Run ``tx`` atomically or raise ``DataplaneError`` having changed nothing."""

    def read(self) -> TableState | None:
        """Our table as the kernel holds it now, or ``None`` if it does not exist."""

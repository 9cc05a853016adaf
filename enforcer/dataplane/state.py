"""What one table holds: its layout tag and the elements of each container."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TableState:
    """``elements`` never include the layout's sentinel (``layout.SENTINELS``); ``sealed`` names
    the sets that still hold theirs. A set missing from ``sealed`` was flushed (or created by
    someone else) since the layout created it, so its contents cannot be trusted as a diff base."""

    layout_tag: str | None
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)
    sealed: set[str] = field(default_factory=set)

    def copy(self) -> TableState:
        return TableState(self.layout_tag, {name: dict(items) for name, items in self.elements.items()},
                          set(self.sealed))

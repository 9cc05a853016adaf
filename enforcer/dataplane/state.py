"""What one table holds: its layout tag and the elements of each container."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TableState:
    layout_tag: str | None
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def copy(self) -> "TableState":
        return TableState(self.layout_tag, {name: dict(items) for name, items in self.elements.items()})

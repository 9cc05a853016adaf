"""A problem at a place: shared by config validation and list parsing.

Both report *every* problem with where it is (``portal.url (config.yaml:7)`` or
``restricted.csv:12``), so operators fix an input in one round instead of one error at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

#: How many issues an exception message shows; ``.issues`` always holds all of them.
SHOWN = 20


@dataclass(frozen=True)
class Issue:
    location: str
    message: str

    @property
    def where(self) -> str:
        return self.location

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class IssuesError(Exception):
    """The input was rejected as a whole; ``issues`` names every problem found."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        shown = "\n".join(str(i) for i in issues[:SHOWN])
        more = f"\n... and {len(issues) - SHOWN} more" if len(issues) > SHOWN else ""
        super().__init__(shown + more)

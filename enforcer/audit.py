"""The audit log: every change of a subscriber's state, with its cause, append-only.

Support answers "why was I cut off on Friday?" from here, months later. A row is written
when what the kernel enforces for a subscriber changes mode, when a restriction starts or
stops waiting for the enforcement window, and for every exemption or promise action (even
one that changes no mode). Rows live in SQLite (``store``) and are deleted only by the
retention setting (``policy.audit_retention``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .model import Mode
from .policy import Decision

Row = tuple[float, str, str, str, str]   # at, subscriber, old mode, new mode, cause


def state(decision: Decision | None) -> str:
    """``walled-garden``, ``free``, or ``free (walled-garden waiting)`` for a held restriction."""
    if decision is None:
        return Mode.FREE.value
    if decision.pending is not None:
        return f"{decision.mode.value} ({decision.pending.value} waiting)"
    return decision.mode.value


def audit_rows(previous: Mapping[str, Decision], decisions: Mapping[str, Decision], now: float,
               note: str = "") -> list[Row]:
    """Rows for the subscribers whose enforced state differs between ``previous`` and now;
    ``note`` names the action that caused the change when the decision's cause does not."""
    rows = []
    for sid, decision in decisions.items():
        old, new = state(previous.get(sid)), state(decision)
        if old != new:
            rows.append((now, sid, old, new, f"{note}; now: {decision.cause}" if note else decision.cause))
    return rows


def format_entry(entry: Mapping[str, Any]) -> str:
    at = datetime.fromtimestamp(entry["at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    change = entry["new"] if entry["old"] == entry["new"] else f"{entry['old']} -> {entry['new']}"
    return f"{at}  {entry['subscriber']:<16} {change:<34} {entry['cause']}"

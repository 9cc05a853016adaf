"""Enforcement windows: new restrictions only when somebody can answer the customer's call.

A window is a set of local weekdays and hour ranges in one time zone, minus the holidays in
a calendar file. Outside a window, a restriction that would start (or get stricter) waits;
lifting is never delayed (that rule lives in ``policy``; this module only answers "is it
open now?" and "when does it open next?"). Pure: callers pass the time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .issues import Issue, IssuesError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
#: How far ahead ``next_open`` looks before concluding the windows never open (a calendar
#: listing every day of the year as a holiday, say).
HORIZON_DAYS = 400


class HolidayError(IssuesError):
    """The holiday calendar has bad lines; each issue names file:line."""


@dataclass(frozen=True)
class Windows:
    """When new restrictions may be applied. ``always()`` is the default: no waiting."""

    zone: str = "UTC"
    days: frozenset[int] = frozenset(range(7))           # 0 = Monday
    hours: tuple[tuple[int, int], ...] = ((0, 1440),)    # minutes since midnight, [start, end)
    holidays: frozenset[date] = field(default_factory=frozenset)
    configured: bool = False

    @classmethod
    def always(cls) -> Windows:
        return cls()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.zone)

    def is_open(self, now: float) -> bool:
        if not self.configured:
            return True
        local = datetime.fromtimestamp(now, self.tz)
        if local.weekday() not in self.days or local.date() in self.holidays:
            return False
        minute = local.hour * 60 + local.minute
        return any(start <= minute < end for start, end in self.hours)

    def next_open(self, now: float) -> float | None:
        """The first instant at or after ``now`` inside a window (``now`` itself if open)."""
        if self.is_open(now):
            return now
        tz = self.tz
        local = datetime.fromtimestamp(now, tz)
        for offset in range(HORIZON_DAYS):
            day = local.date() + timedelta(days=offset)
            if day.weekday() not in self.days or day in self.holidays:
                continue
            for start, _ in sorted(self.hours):
                opening = datetime.combine(day, dtime(start // 60, start % 60), tz)
                # a start skipped by a DST jump resolves to the next valid wall time
                instant = opening.astimezone(UTC).timestamp()
                if instant > now and self.is_open(instant):
                    return instant
        return None

    def describe(self) -> str:
        if not self.configured:
            return "always (no enforcement windows configured)"
        days = ",".join(DAYS[d] for d in sorted(self.days))
        hours = ",".join(f"{s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d}" for s, e in self.hours)
        extra = f", except {len(self.holidays)} holidays" if self.holidays else ""
        return f"{days} {hours} {self.zone}{extra}"


def parse_hours(text: str) -> tuple[int, int]:
    """``"08:00-17:30"`` → minutes (480, 1050); ``24:00`` allowed as an end."""
    match = _RANGE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a range like 08:00-17:00")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > 1440 or (h2 == 24 and m2):
        raise ValueError(f"{text!r} has an impossible time")
    if end <= start:
        raise ValueError(f"{text!r} ends before it starts (windows across midnight: write two ranges)")
    return start, end


def parse_days(values: Iterable[str]) -> frozenset[int]:
    out = set()
    for value in values:
        name = str(value).strip().lower()[:3]
        if name not in DAYS:
            raise ValueError(f"{value!r} is not a weekday ({', '.join(DAYS)})")
        out.add(DAYS.index(name))
    if not out:
        raise ValueError("at least one weekday is needed")
    return frozenset(out)


def check_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a known time zone (e.g. Europe/Prague, UTC)") from None
    return name


def load_holidays(path: str) -> frozenset[date]:
    """One ``YYYY-MM-DD`` per line; ``#`` starts a comment; blank lines are fine."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise HolidayError([Issue(path, f"cannot read holiday calendar: {exc.strerror or exc}")]) from None
    days: set[date] = set()
    issues = []
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        try:
            days.add(date.fromisoformat(content.split()[0]))
        except ValueError:
            issues.append(Issue(f"{path}:{number}", f"{content!r} is not a date like 2026-12-24"))
    if issues:
        raise HolidayError(issues)
    return frozenset(days)

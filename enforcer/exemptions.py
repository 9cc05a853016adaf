"""Case-by-case exemptions: people the list names but who must not be restricted (yet).

A vulnerable household, a small business that lives on its connection, an open billing
dispute or fault ticket, an agreed payment arrangement: support staff (or billing, for
disputes and outages) record an exemption with a category, a note, who set it and an
expiry. An exempt subscriber stays free whatever the list says; at expiry the policy
re-evaluates by itself. Every exemption expires: "forever" is how people get forgotten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Any

#: Categories and what support staff see for them.
CATEGORIES: dict[str, str] = {
    "vulnerable": "vulnerable household",
    "business": "small business that depends on the connection",
    "dispute": "open billing dispute",
    "outage": "open outage or fault ticket",
    "arrangement": "payment arrangement",
    "other": "other (see note)",
}
#: Billing events may open and close only these (the others are people's decisions).
EVENT_CATEGORIES = ("dispute", "outage")
#: Longest exemption one action may set; renewing is a conscious act.
MAX_SECONDS = 400 * 86400.0


@dataclass(frozen=True)
class Exemption:
    category: str
    until: float                 # unix seconds; the exemption ends by itself then
    note: str
    set_by: str                  # "operator alice", "event msg_…", "list"
    set_at: float

    def active(self, now: float) -> bool:
        return now < self.until

    def describe(self) -> str:
        note = f": {self.note}" if self.note else ""
        return f"exempt ({CATEGORIES.get(self.category, self.category)}{note}; set by {self.set_by})"

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "until": self.until, "note": self.note, "set_by": self.set_by,
                "set_at": self.set_at}


def check_category(value: Any) -> str:
    text = str(value or "").strip().lower()
    if text not in CATEGORIES:
        raise ValueError(f"category {value!r} is not one of {', '.join(CATEGORIES)}")
    return text


def parse_instant(value: Any, zone: Any = None) -> float:
    """A date (``2026-12-31``: through the end of that day, local time), an RFC 3339 time, or
    unix seconds. Raises ``ValueError`` (and nothing else) for anything else, including dates
    the calendar arithmetic cannot reach (``9999-12-31`` plus a day, year 1 in another zone)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a date such as 2026-12-31 or a time")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a time")
        return float(value)
    text = str(value).strip()
    tz = zone or datetime.now().astimezone().tzinfo
    try:
        day = date.fromisoformat(text)
    except ValueError:
        day = None
    try:
        if day is not None:
            return datetime.combine(day + timedelta(days=1), dtime(0, 0), tz).timestamp()
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{text!r} is not a date (2026-12-31) or an RFC 3339 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=tz)
        return moment.astimezone(UTC).timestamp()
    except (OverflowError, OSError):   # OSError: some platforms' timestamp() for far dates
        raise ValueError(f"{text!r} is out of the range of dates this gateway can keep") from None


def parse_until(value: Any, now: float, zone: Any = None) -> float:
    """An exemption's end as an operator gives it: an instant (see ``parse_instant``) or a
    duration from now (``14d``, ``36h``, ``2w``); in the future and not too far away."""
    relative = _relative(str(value).strip(), now) if isinstance(value, str) else None
    until = relative if relative is not None else parse_instant(value, zone)
    if until <= now:
        raise ValueError("until lies in the past")
    if until - now > MAX_SECONDS:
        raise ValueError(f"until is more than {int(MAX_SECONDS // 86400)} days away; exemptions must be renewed")
    return until


#: The units of a span an operator types (``exempt --until 14d``, ``audit --since 1h``).
SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def span_seconds(text: str) -> int | None:
    """``90s``, ``30m``, ``36h``, ``14d``, ``2w`` as seconds; None for anything else (a date, a
    time). At most 11 digits: anything longer is far beyond every limit, and overflows a float."""
    if 1 < len(text) <= 12 and text[-1] in SPAN_UNITS and text[:-1].isascii() and text[:-1].isdigit():
        return int(text[:-1]) * SPAN_UNITS[text[-1]]
    return None


def _relative(text: str, now: float) -> float | None:
    if len(text) > 12 and text[-1:] in SPAN_UNITS and text[:-1].isascii() and text[:-1].isdigit():
        raise ValueError(f"until is more than {int(MAX_SECONDS // 86400)} days away; exemptions must be renewed")
    seconds = span_seconds(text)
    return None if seconds is None else now + seconds

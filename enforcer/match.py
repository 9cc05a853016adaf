"""Match keys: the identifiers the access network knows a subscriber by.

Billing knows an account id; DHCP servers know a MAC address (and the relay's Option 82
circuit and remote ids), a BNG knows the PPPoE username. A list entry may name any of these
(``match``) instead of, or besides, fixed addresses; a session from any source that carries
one of them gives that subscriber its current addresses (``sessions``).

One key is enough: a session belongs to the subscriber one of whose keys it carries. Values
are compared exactly after normalising what has more than one spelling (a MAC address).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The keys a list entry's ``match`` may have, in the order ties are broken (most specific first).
MATCH_KEYS = ("username", "circuit_id", "remote_id", "mac")
#: The pair every subscriber matches by itself: a session event may name the account directly.
ID_KEY = "id"
#: Longest value accepted (RADIUS attributes hold at most 253 octets).
MAX_VALUE = 253
_HEX = re.compile(r"[0-9a-f]{12}")
_PRINTABLE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")

Pair = tuple[str, str]


def normal_mac(text: str) -> str:
    """``02:00:00:00:10:01`` from any usual spelling (``02-00-...``, ``0200.0000.1001``,
    ``020000001001``, upper case); ValueError naming the text otherwise."""
    digits = re.sub(r"[:\-.]", "", text.strip().lower())
    if not _HEX.fullmatch(digits):
        raise ValueError(f"mac {text!r} is not a MAC address such as 02:00:00:00:10:01")
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def normal_value(key: str, value: Any) -> str:
    """One match value as compared: a MAC normalised, others printable ASCII without edge
    spaces, at most ``MAX_VALUE`` characters. ValueError says which key and why."""
    if key not in MATCH_KEYS:
        raise ValueError(f"unknown match key {key!r}; expected {', '.join(MATCH_KEYS)}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"match {key} must be a string, got {type(value).__name__}")
    text = str(value)
    if key == "mac":
        return normal_mac(text)
    if not text or len(text) > MAX_VALUE or not _PRINTABLE.fullmatch(text):
        raise ValueError(f"match {key} {text[:40]!r} must be 1 to {MAX_VALUE} printable ASCII characters "
                         "without leading or trailing spaces")
    return text


@dataclass(frozen=True, slots=True)
class Match:
    """A subscriber's (or a session's) identifiers; empty strings are absent keys.

    Slots, no cached attributes: there is one per list entry (100k and more), and most are
    empty, all then the one ``NO_MATCH``."""

    username: str = ""
    circuit_id: str = ""
    remote_id: str = ""
    mac: str = ""

    def pairs(self) -> tuple[Pair, ...]:
        """(key, value) for each key present, in ``MATCH_KEYS`` order."""
        if not (self.username or self.circuit_id or self.remote_id or self.mac):
            return ()
        return tuple((key, value) for key in MATCH_KEYS if (value := getattr(self, key)))

    def __bool__(self) -> bool:
        return bool(self.username or self.circuit_id or self.remote_id or self.mac)

    def to_json(self) -> dict[str, str]:
        return dict(self.pairs())

    def text(self) -> str:
        """``username=c1001@isp;mac=02:00:00:00:10:01``: the CSV spelling, also used in logs."""
        return ";".join(f"{key}={value}" for key, value in self.pairs())

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Match:
        if not data:
            return NO_MATCH
        return cls(**{key: data[key] for key in MATCH_KEYS if key in data})


#: The empty match, shared by every entry without one.
NO_MATCH = Match()


def parse_match(raw: Any) -> Match:
    """A ``match`` mapping (YAML/JSON) or its CSV spelling ``k=v;k=v``, validated and
    normalised; ValueError naming the first problem. An empty match is an error: write no
    ``match`` at all instead."""
    if isinstance(raw, str):
        items: dict[str, Any] = {}
        for part in raw.split(";"):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"match {part.strip()[:40]!r} is not key=value (e.g. username=c1001@isp)")
            if key in items:
                raise ValueError(f"match key {key!r} is given twice")
            items[key] = value.strip()
        raw = items
    if not isinstance(raw, Mapping):
        raise ValueError(f"match must be a mapping of {', '.join(MATCH_KEYS)}, got {type(raw).__name__}")
    values = {}
    for key, value in raw.items():
        values[str(key)] = normal_value(str(key), value)
    if not values:
        raise ValueError(f"match is empty; give at least one of {', '.join(MATCH_KEYS)}")
    return Match(**values)

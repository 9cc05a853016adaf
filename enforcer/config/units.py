"""Quantities with units as operators write them: durations (``72h``), sizes (``64 KiB``),
rates (``1 mbit/s``) and listen addresses (``[::]:8080``).

Each parser takes the raw YAML value and returns a plain number (or ``Listen``), or raises
``ValueError``/``TypeError`` whose text becomes the issue reported at the key; they are public
because tests and tools parse the same notations.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any

from .schema import Listen

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"72h"``, ``"3d"`` → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90, '15m', '72h' or '3d'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (examples: 90, '15m', '72h', '3d')")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a usable duration (finite, not negative)")
    return seconds


def positive_duration(value: Any) -> float:
    """A duration that is not zero: an interval, a term, a timeout."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_PREFIXES = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}
#: Spelled-out units (any case) → multiplier: ``byte``, ``kbyte``, ``kibyte``... / ``bit``, ``kbit``...
_BYTE_WORDS = {f"{p}{u}": m for p, m in _PREFIXES.items() for u in ("byte", "bytes")}
_BIT_WORDS = {f"{p}{u}": m for p, m in _PREFIXES.items() for u in ("bit", "bits")}
#: Abbreviations, case as written: a capital B is bytes ("Mb" would be ambiguous, so it is refused).
_BYTE_SYMBOLS = {"B": 1, "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
                 "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_PER_SECOND = re.compile(r"\s*/\s*s(?:ec(?:ond)?)?\s*$", re.IGNORECASE)
MIN_THROTTLE_RATE = 1000  # bytes/s (8 kbit/s): anything less is a typo, not a policy


def _byte_unit(unit: str) -> int | None:
    return _BYTE_WORDS.get(unit.lower()) or _BYTE_SYMBOLS.get(unit)


def parse_size(value: Any) -> int:
    """``65536``, ``"64 kbyte"``, ``"64 KiB"``, ``"1 MB"`` → bytes (k/m/g = 1000ⁿ, Ki/Mi/Gi = 1024ⁿ)."""
    problem = f"{value!r} is not a size in bytes (examples: 65536, '64 kbyte', '64 KiB')"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(problem)
    match = _AMOUNT.match(str(value))
    multiplier = _byte_unit(match.group(2) or "byte") if match else None
    if match is None or multiplier is None:
        raise ValueError(problem)
    size = int(float(match.group(1)) * multiplier)
    if size >= 2**32:
        raise ValueError(f"{value!r} is too large (at most 4 GB)")
    return size


def parse_rate(value: Any) -> int:
    """``"1 mbit/s"``, ``"512 kbit/s"``, ``"2 mbyte/s"`` → bytes per second.

    Bits use SI prefixes as ISPs sell them (1 mbit/s = 1,000,000 bit/s = 125,000 bytes/s);
    ``kibit``/``KiB`` and friends are 1024-based. A bare number is refused: bits or bytes?
    """
    problem = f"{value!r} is not a rate (examples: '1 mbit/s', '512 kbit/s', '2 mbyte/s')"
    text = value if isinstance(value, str) else ""
    per_second = _PER_SECOND.search(text)
    match = _AMOUNT.match(text[:per_second.start()]) if per_second else None
    if match is None or not match.group(2):
        raise ValueError(problem)
    number, unit = float(match.group(1)), match.group(2)
    if unit.lower() in _BIT_WORDS:
        rate = int(number * _BIT_WORDS[unit.lower()] / 8)
    elif _byte_unit(unit) is not None:
        rate = int(number * (_byte_unit(unit) or 1))
    else:
        raise ValueError(problem)
    if rate < MIN_THROTTLE_RATE:
        raise ValueError(f"{value!r} is below the minimum of 8 kbit/s (1000 bytes/s)")
    if rate >= 2**40:
        raise ValueError(f"{value!r} is too large")
    return rate


def parse_listen(value: Any) -> Listen:
    """``"0.0.0.0:8080"`` or ``"[::]:8080"``: literal addresses only, no name lookups at bind."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not ADDRESS:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is out of range 1-65535")
    return Listen(host, number)


def optional_listen(value: Any) -> Listen | None:
    """A listen address, or None (``~``, ``""`` or ``false``) for "do not listen"."""
    return None if value in (None, "", False) else parse_listen(value)

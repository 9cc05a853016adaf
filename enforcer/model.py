"""The vocabulary every layer shares: restriction modes, their severity, address networks and
the throttle defaults.

It imports only the standard library, so the list parser, the policy, the config reader, the
dataplane and the portal can all name a ``Mode`` or a ``Network`` without importing each other
(and without import cycles between them).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

#: One subscriber address or prefix, either family.
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(str, enum.Enum):
    """How a subscriber is restricted; ``FREE`` is the absence of any restriction."""

    FREE = "free"
    NOTICE = "notice"
    THROTTLE = "throttle"
    WALLED_GARDEN = "walled-garden"

    @classmethod
    def restricting(cls) -> tuple[Mode, ...]:
        return (cls.NOTICE, cls.THROTTLE, cls.WALLED_GARDEN)


#: How strict each mode is: a move to a stricter mode is a new restriction (windows apply).
SEVERITY: dict[Mode, int] = {Mode.FREE: 0, Mode.NOTICE: 1, Mode.THROTTLE: 2, Mode.WALLED_GARDEN: 3}


@dataclass(frozen=True)
class EscalationStep:
    """After ``after`` seconds on the list, a lighter list mode becomes ``mode``."""

    after: float
    mode: Mode


#: ``policy.throttle_rate`` default: 1 mbit/s, in bytes per second.
DEFAULT_THROTTLE_RATE = 125_000
#: The smallest ``throttle_burst`` chosen by default (64 KiB: one GSO/GRO super-packet).
MIN_DEFAULT_THROTTLE_BURST = 64 * 1024


def default_throttle_burst(rate: int) -> int:
    """A tenth of a second at ``rate``, but at least 64 KiB (see ``throttle_burst``)."""
    return max(rate // 10, MIN_DEFAULT_THROTTLE_BURST)

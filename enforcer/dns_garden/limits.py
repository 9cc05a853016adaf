"""Per-client query rate limit: a token bucket per client address in a bounded table.

A restricted subscriber's DNS lands on the gateway, so one subscriber (or a botnet behind many)
must not be able to make it a flood amplifier towards the upstream resolvers nor starve the
others. Each client address gets ``burst`` tokens refilled at ``rate`` per second; a query
takes one; a query without a token is answered REFUSED.

Memory stays bounded whatever the number of clients (spoofed UDP sources included): the table
holds at most ``max_clients`` buckets, least recently used first out. An evicted bucket is as if
the client had been idle long enough to refill it, which a full bucket is anyway; so under normal
load only full buckets leave, and under a spoofed-source flood the real clients keep their
(recently used) buckets longest.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["DEFAULT_MAX_CLIENTS", "RateLimiter"]

#: Buckets kept at most (~150 bytes each: ~10 MB at this size).
DEFAULT_MAX_CLIENTS = 65536


class RateLimiter:
    """``allow(client)`` says whether one more query of ``client`` is within its rate."""

    __slots__ = ("_buckets", "_clock", "burst", "max_clients", "rate")

    def __init__(self, rate: float, burst: int, max_clients: int = DEFAULT_MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate limiter: rate must be > 0 queries/s, got {rate!r}")
        if burst < 1:
            raise ValueError(f"rate limiter: burst must be >= 1, got {burst!r}")
        if max_clients < 1:
            raise ValueError(f"rate limiter: max_clients must be >= 1, got {max_clients!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self.max_clients = max_clients
        self._clock = clock
        # client -> [tokens, last refill instant]; order = least recently used first.
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, client: Hashable) -> bool:
        """Take one token of ``client``'s bucket; False (nothing taken) when it is empty."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            self._buckets[client] = [self.burst - 1.0, now]
            return True
        self._buckets.move_to_end(client)
        tokens, last = bucket
        # A clock that steps back (an injected one) refills nothing rather than draining.
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

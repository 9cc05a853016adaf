"""The forwarder's counters, gauges and added-latency histogram, sent to the daemon as deltas.

The forwarder is a child process; the daemon owns the Prometheus registry. So the forwarder
counts in plain dicts (a dict increment per query is all the hot path pays) and once a second
``drain()`` hands the daemon what changed since the last drain as one JSON-able value; the daemon
adds the deltas to its metrics (``walled_garden_dns_*``, docs/operations.md). Deltas rather than
totals: a restarted child starts from zero without the daemon's counters going backwards.

Names carry no prefix: "queries" (transport, result), "garden_answers" (), "upstream_failures"
(resolver, reason); the kernel writer adds "garden_addresses_added" (family), "garden_set_full"
(family), "kernel_failures" () and the gauge "garden_addresses" (family).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

__all__ = ["LATENCY_BUCKETS", "Stats"]

#: Upper bounds (seconds) of ``walled_garden_dns_added_seconds``; the goal is p99 <= 1 ms, and the
#: upper buckets show kernel adds and a slow event loop. +Inf is implied (the last count).
LATENCY_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                      0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Stats:
    """Counters and gauges keyed by (name, labels), plus the added-latency histogram."""

    __slots__ = ("_added_buckets", "_added_count", "_added_sum", "_counts", "_gauges")

    def __init__(self) -> None:
        self._counts: dict[tuple[str, tuple[str, ...]], int] = {}
        self._gauges: dict[tuple[str, tuple[str, ...]], float] = {}
        self._added_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._added_sum = 0.0
        self._added_count = 0

    def count(self, name: str, labels: tuple[str, ...] = (), by: int = 1) -> None:
        key = (name, labels)
        self._counts[key] = self._counts.get(key, 0) + by

    def gauge(self, name: str, labels: tuple[str, ...], value: float) -> None:
        """Set a gauge; the next drain reports its latest value (only if set since the last one)."""
        self._gauges[(name, labels)] = value

    def observe_added(self, seconds: float) -> None:
        """One query's time in the forwarder minus its upstream wait."""
        # bisect_left: a value equal to a bound falls in that bound's bucket (Prometheus "le").
        self._added_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._added_sum += seconds
        self._added_count += 1

    def peek(self, name: str, labels: tuple[str, ...] = ()) -> int:
        """The count of ``name``/``labels`` since the last drain (for tests and logs)."""
        return self._counts.get((name, labels), 0)

    def drain(self) -> dict[str, Any]:
        """What changed since the last drain, JSON-able; resets the deltas."""
        out: dict[str, Any] = {
            "counts": [[name, list(labels), n] for (name, labels), n in self._counts.items() if n],
            "gauges": [[name, list(labels), value] for (name, labels), value in self._gauges.items()],
            "added": {"buckets": list(self._added_buckets), "sum": self._added_sum,
                      "count": self._added_count},
        }
        self._counts = {}
        self._gauges = {}
        self._added_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._added_sum = 0.0
        self._added_count = 0
        return out

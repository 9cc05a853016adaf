"""The enforcer's Prometheus metrics (SPEC §6), in a registry of its own.

Gauges are set when state changes, never computed by listing the kernel on a scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .subscribers import Mode

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SYNC = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.subscribers = Gauge("walled_garden_subscribers", "Subscribers currently in each mode",
                                 ["mode"], registry=r)
        for mode in Mode.restricting():
            self.subscribers.labels(mode.value)
        self.event_to_enforce = Histogram("walled_garden_event_to_enforce_seconds",
                                          "From a billing event received to its kernel commit",
                                          buckets=_LATENCY, registry=r)
        self.sync_seconds = Histogram("walled_garden_sync_seconds", "Duration of kernel syncs",
                                      ["kind"], buckets=_SYNC, registry=r)
        for kind in ("full", "partial"):
            self.sync_seconds.labels(kind)
        self.sync_failures = Counter("walled_garden_sync_failures", "Kernel syncs that failed", registry=r)
        self.last_sync = Gauge("walled_garden_last_sync_timestamp_seconds",
                               "Unix time of the last successful kernel sync", registry=r)
        self.source_success = Gauge("walled_garden_source_last_success_timestamp_seconds",
                                    "Unix time the subscriber list was last read and accepted", registry=r)
        self.source_failures = Counter("walled_garden_source_failures",
                                       "Subscriber lists that could not be read or were rejected",
                                       ["reason"], registry=r)
        self.held_changes = Gauge("walled_garden_held_changes",
                                  "List changes held by the mass-change guard, waiting for approve/reject",
                                  registry=r)
        self.list_entries = Gauge("walled_garden_list_entries", "Entries in the list in force", registry=r)
        self.events = Counter("walled_garden_events", "Billing webhook requests by type and result",
                              ["type", "result"], registry=r)
        self.conntrack_flushed = Counter("walled_garden_conntrack_flushed_entries",
                                         "Tracked connections deleted on state changes", registry=r)
        self.conntrack_failures = Counter("walled_garden_conntrack_flush_failures",
                                          "conntrack flushes that failed", registry=r)

    def set_modes(self, counts: dict[Mode, int]) -> None:
        for mode in Mode.restricting():
            self.subscribers.labels(mode.value).set(counts.get(mode, 0))

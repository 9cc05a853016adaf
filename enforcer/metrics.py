"""The enforcer's Prometheus metrics (docs/reference.md, Metrics), in a registry of its own
(with build info and the process collectors: ``process_metrics``).

Gauges are set when state changes, or read at scrape time from counts the daemon already
keeps; a scrape never lists a kernel set. The packet counters of the table's named nftables
counters come from one ``list counters`` call, at most once a second (``KernelCounters``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .model import Mode
from .process_metrics import add_standard_collectors

log = logging.getLogger("walled_garden.metrics")

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SYNC = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FLEET = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)

# A labelled counter's series exists (at 0) from the start for every label value known in
# advance: Prometheus's increase()/rate() never count a series' first sample, so a series
# that a failure creates at 1 stays invisible to the alerts (and a broken list file is not
# read again until it changes: there may never be a second). What cannot be known in advance
# (a URL source's ``http_<status>``, a fleet message's kind) the alerts catch as a new series.

#: ``walled_garden_source_failures_total{reason}``: every reason but ``http_<status>``
#: (``sources.SourceFailure``; ``state``: a list that could not be saved, ``ListIntake``).
SOURCE_FAILURE_REASONS = ("unreadable", "invalid", "unreachable", "timeout", "truncated", "too_large", "internal",
                          "state")
#: ``walled_garden_task_failures_total{task}`` of one-off work (``Engine.spawn``); the
#: supervisor's tasks get theirs as they start (``Supervisor.start``).
SPAWNED_TASKS = ("flush", "answers", "backend_switch")
#: ``walled_garden_fleet_published_total{result}``, in a fleet (``FleetRelay.publish``).
FLEET_PUBLISHED = ("accepted", "duplicate", "unavailable")
#: ``walled_garden_fleet_applied_total{kind="-", result}`` that ``WalledGardenFleetInputsSkipped``
#: watches, in a fleet (``Applier``); malformed and failed messages of a known kind carry it.
FLEET_SKIPPED = ("malformed", "lost", "stream_replaced")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        add_standard_collectors(r)  # walled_garden_build_info, process_*, python_*
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
        self.table_repairs = Counter("walled_garden_table_repairs",
                                     "Damage to our table found (by the check named) and repaired", ["check"],
                                     registry=r)
        for check in ("quick", "full", "start"):
            self.table_repairs.labels(check)
        self.last_sync = Gauge("walled_garden_last_sync_timestamp_seconds",
                               "Unix time of the last successful kernel sync", registry=r)
        self.source_success = Gauge("walled_garden_source_last_success_timestamp_seconds",
                                    "Unix time the subscriber list was last read and accepted", registry=r)
        self.source_failures = Counter("walled_garden_source_failures",
                                       "Subscriber lists that could not be read or were rejected",
                                       ["reason"], registry=r)
        for reason in SOURCE_FAILURE_REASONS:
            self.source_failures.labels(reason)
        self.held_changes = Gauge("walled_garden_held_changes",
                                  "List changes held by the mass-change guard, waiting for approve/reject",
                                  registry=r)
        self.list_entries = Gauge("walled_garden_list_entries", "Entries in the list in force", registry=r)
        self.waiting = Gauge("walled_garden_restrictions_waiting",
                             "Restrictions held until the enforcement window opens", registry=r)
        self.exemptions = Gauge("walled_garden_exemptions", "Exemptions in force (operator and billing)",
                                registry=r)
        self.promises = Counter("walled_garden_promises", "Promises to pay by outcome",
                                ["outcome"], registry=r)
        for outcome in ("made", "refused", "kept", "lapsed"):
            self.promises.labels(outcome)
        self.portal_refusals = Counter("walled_garden_portal_actions_refused",
                                       "Portal actions refused: the address had not connected to the portal "
                                       "recently (a compromised or misconfigured portal)", ["action"], registry=r)
        for action in ("promise", "acknowledge", "lookup"):
            self.portal_refusals.labels(action)
        self.outbox = Gauge("walled_garden_outbox_messages",
                            "Outgoing webhooks to billing not yet delivered", registry=r)
        self.outbox_failures = Counter("walled_garden_outbox_failures",
                                       "Failed deliveries of outgoing webhooks (each is retried)", registry=r)
        self.events = Counter("walled_garden_events", "Billing events (webhooks, and operator restrict/lift "
                              "commands as the event they stand for) by type and result",
                              ["type", "result"], registry=r)
        self.conntrack_flushed = Counter("walled_garden_conntrack_flushed_entries",
                                         "Tracked connections deleted on state changes", registry=r)
        self.conntrack_failures = Counter("walled_garden_conntrack_flush_failures",
                                          "conntrack flushes that failed", registry=r)
        self.conntrack_seconds = Histogram("walled_garden_conntrack_flush_seconds",
                                           "Duration of conntrack flush passes by kind of dump",
                                           ["dump"], buckets=_SYNC, registry=r)
        for dump in ("filtered", "full", "tool"):
            self.conntrack_seconds.labels(dump)
        self.reloads = Counter("walled_garden_config_reloads", "Configuration reloads (SIGHUP) by result",
                               ["result"], registry=r)
        for result in ("applied", "rejected"):
            self.reloads.labels(result)
        self.task_failures = Counter("walled_garden_task_failures", "Background tasks (source, sessions_<name>, "
                                     "timers, table_check, outbox, webhooks, hosts, dns_forwarder, fleet, "
                                     "metrics_listener: restarted with backoff, status: tasks) and one-off work "
                                     "(flush, answers, backend_switch) that failed or ended unasked", ["task"],
                                     registry=r)
        for task in SPAWNED_TASKS:
            self.task_failures.labels(task)
        self.kernel = KernelCounters()
        r.register(self.kernel)
        # Read at scrape time from the owners' own bookkeeping (O(1), or O(graces)): each owner
        # sets the function when it starts (``set_function``), so this module imports none of them.
        self.list_age = Gauge("walled_garden_list_age_seconds", "Seconds since the list in force was accepted "
                              "from the source (kept across restarts; NaN before the first list)", registry=r)
        self.kernel_in_sync = Gauge("walled_garden_kernel_in_sync", "1 when the kernel table matches the policy, "
                                    "0 while a failed sync is being repaired", registry=r)
        self.payment_graces = Gauge("walled_garden_payment_graces", "Payment graces in force: subscribers kept "
                                    "free after paying until the grace expires", registry=r)
        self.next_grace_expiry = Gauge("walled_garden_next_grace_expiry_timestamp_seconds", "Unix time the next "
                                       "payment grace expires (0 when none is pending)", registry=r)
        self.grace_expiries_due = Gauge("walled_garden_grace_expiries_due", "Payment graces past their end but "
                                        "not yet applied (stays 0 unless expiry is stuck)", registry=r)
        self.overrides = Gauge("walled_garden_overrides", "Billing-event and operator overrides in force",
                               registry=r)
        self.quarantined_databases = Gauge(
            "walled_garden_state_quarantined_databases", "Unreadable state databases moved aside in state_dir "
            "(<name>.corrupt-<time>) and kept for inspection; 0 once the operator has removed them", registry=r)
        self.quarantined_rows = Gauge(
            "walled_garden_state_rows_quarantined", "State rows that did not decode, skipped and kept in the "
            "quarantined_rows table for inspection; 0 once the operator has removed them", registry=r)
        self.held_subscribers = Gauge("walled_garden_held_change_subscribers", "Subscribers the held list change "
                                      "would restrict or lift (0 when nothing is held)", ["change"], registry=r)
        self.sessions = Gauge("walled_garden_sessions", "Current sessions (addresses that follow subscribers) by "
                              "source", ["source"], registry=r)
        self.session_changes = Counter("walled_garden_session_changes", "Sessions started, updated or stopped, by "
                                       "source and change", ["source", "change"], registry=r)
        self.session_errors = Counter("walled_garden_session_source_errors", "Bad input from session sources "
                                      "(malformed lease line, bad authenticator, unknown attribute, address "
                                      "outside the subscriber prefixes ...), by source and kind",
                                      ["source", "kind"], registry=r)
        self.session_lag = Histogram("walled_garden_session_change_seconds", "From the source's change (lease "
                                     "file written, packet or request received) to the kernel commit",
                                     ["source"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                     registry=r)
        # The DNS forwarder (walled_garden.dns: gateway): its child process counts, the daemon's
        # ForwarderBridge adds the deltas here once a second (enforcer/dns_garden/bridge.py).
        self.dns_queries = Counter("walled_garden_dns_queries", "DNS queries the forwarder handled, by transport "
                                   "and result", ["transport", "result"], registry=r)
        for transport in ("udp", "tcp"):
            for result in ("forwarded", "rate_limited", "malformed", "upstream_failed", "refused"):
                self.dns_queries.labels(transport, result)
        self.dns_garden_answers = Counter("walled_garden_dns_garden_answers", "DNS answers for allowed names (their "
                                          "addresses are admitted to the garden)", registry=r)
        self.dns_addresses_added = Counter("walled_garden_dns_garden_addresses_added", "Addresses newly added to the "
                                           "dnsgarden sets, by family", ["family"], registry=r)
        self.dns_set_full = Counter("walled_garden_dns_garden_set_full", "Addresses not added because the dnsgarden "
                                    "set of their family was full (dns_forwarder.max_addresses)", ["family"],
                                    registry=r)
        self.dns_addresses = Gauge("walled_garden_dns_garden_addresses", "Addresses the forwarder holds in the "
                                   "dnsgarden sets, by family", ["family"], registry=r)
        for family in ("ipv4", "ipv6"):
            self.dns_addresses_added.labels(family)
            self.dns_set_full.labels(family)
            self.dns_addresses.labels(family)
        self.dns_capacity = Gauge("walled_garden_dns_garden_capacity", "Most addresses a dnsgarden set holds, per "
                                  "family", registry=r)
        self.dns_upstream_failures = Counter("walled_garden_dns_upstream_failures", "Queries a resolver did not "
                                             "answer in time or answered with an error, by resolver and reason",
                                             ["resolver", "reason"], registry=r)
        self.dns_kernel_failures = Counter("walled_garden_dns_kernel_failures", "Failed writes of the forwarder to "
                                           "the dnsgarden sets (the answer still went out)", registry=r)
        self.dns_added = DeltaHistogram("walled_garden_dns_added_seconds", "Time a query spent in the forwarder "
                                        "minus the upstream wait (includes the kernel add)")
        r.register(self.dns_added)
        self.dns_forwarder_events = Counter("walled_garden_dns_forwarder_events", "Other things the forwarder "
                                            "counts: admit_timeouts (an answer sent before its addresses were in), "
                                            "admit_failures, garden_answers_unparsable, tcp_clients_refused, "
                                            "upstream_answers_dropped, answers_dropped (no room to send an "
                                            "answer), garden_addresses_refused (an allowed name's address in "
                                            "subscriber, loopback, link-local or reserved space)", ["event"],
                                            registry=r)
        self.dns_forwarder_enabled = Gauge("walled_garden_dns_forwarder_enabled", "1 when the configuration "
                                           "asks for the DNS forwarder (walled_garden.dns: gateway)", registry=r)
        self.dns_forwarder_up = Gauge("walled_garden_dns_forwarder_up", "1 while the DNS forwarder process runs "
                                      "and listens", registry=r)
        # -- fleet (docs/reference.md, Fleet); every sample then carries gateway="<fleet.gateway>"
        self.constant_labels: dict[str, str] = {}
        self._fleet_series = False
        r.register(_FleetSeries(self))   # before the fleet's counters: it creates their series
        self.fleet_connected = Gauge("walled_garden_fleet_connected", "1 while connected to the fleet's NATS",
                                     registry=r)
        self.fleet_applied_sequence = Gauge("walled_garden_fleet_applied_sequence",
                                            "The last stream sequence applied on this gateway", registry=r)
        self.fleet_stream_sequence = Gauge("walled_garden_fleet_stream_sequence",
                                           "The newest stream sequence this gateway knows of", registry=r)
        self.fleet_lag_seconds = Gauge("walled_garden_fleet_lag_seconds", "How long the oldest input not yet "
                                       "applied on this gateway has waited (0 when caught up)", registry=r)
        self.fleet_published = Counter("walled_garden_fleet_published", "Inputs this gateway published to the "
                                       "stream, by result (accepted, duplicate, unavailable)", ["result"], registry=r)
        self.fleet_applied = Counter("walled_garden_fleet_applied", "Stream messages applied on this gateway, by "
                                     "kind and result (applied, refused, malformed, failed, lost, stream_replaced)",
                                     ["kind", "result"],
                                     registry=r)
        self.fleet_apply_retries = Counter("walled_garden_fleet_apply_retries", "Retries of a stream message whose "
                                           "local apply failed (kernel or state); nothing after it is applied "
                                           "meanwhile", registry=r)
        self.fleet_commit_seconds = Histogram("walled_garden_fleet_commit_seconds", "From the stream storing an "
                                              "input (JetStream's clock) to its commit on this gateway",
                                              buckets=_FLEET, registry=r)
        self.fleet_peer_seen = Gauge("walled_garden_fleet_peer_seen_seconds_ago", "Age of each fleet gateway's last "
                                     "heartbeat, as this gateway read it", ["peer"], registry=r)
        self.fleet_clock_offset = Gauge("walled_garden_fleet_clock_offset_seconds", "Each fleet gateway's clock "
                                        "minus the clock NATS stamps stored inputs with, as last estimated here "
                                        "(a few seconds' precision): another gateway's from the inputs it "
                                        "accepted, this gateway's own from inputs delivered to it live",
                                        ["origin"], registry=r)

    def expect_fleet(self) -> None:
        """The fleet counters' series (at 0), once the daemon is one of a fleet: without
        ``fleet`` they have no samples (docs/operations.md, Metrics). Called at each collect
        (``_FleetSeries``) since the daemon says so only by ``constant_labels["gateway"]``:
        Prometheus sees the series no later than if they were created at start."""
        if self._fleet_series:
            return
        self._fleet_series = True
        for result in FLEET_PUBLISHED:
            self.fleet_published.labels(result)
        for result in FLEET_SKIPPED:
            self.fleet_applied.labels("-", result)

    def set_modes(self, counts: dict[Mode, int]) -> None:
        for mode in Mode.restricting():
            self.subscribers.labels(mode.value).set(counts.get(mode, 0))

    @staticmethod
    def age(at: Any, now: float) -> float:
        return now - float(at) if at else math.nan


#: Seconds a reading of the kernel counters is served before the next scrape reads again.
COUNTER_MAX_AGE = 1.0
#: How long a scrape waits for a reading (the kernel thread may be busy with a big sync);
#: after that it is served the previous reading.
COUNTER_WAIT = 0.25


class KernelCounters(Collector):
    """Our table's named nftables counters (``redirected``, ``refused_tcp``, ``refused_other``, ...).

    ``refresh`` (awaited by the /metrics handler) reads them with one ``list counters`` call
    on the daemon's kernel thread, at most once per ``COUNTER_MAX_AGE``; ``collect`` serves the
    last reading. Replacing the table (a layout change) resets them, as counters may.
    """

    def __init__(self) -> None:
        self.values: dict[str, tuple[int, int]] = {}
        self._read_at = -math.inf
        self._pending: asyncio.Future[dict[str, tuple[int, int]]] | None = None

    async def refresh(self, read: Callable[[], Awaitable[dict[str, tuple[int, int]]]]) -> None:
        if self._pending is None and time.monotonic() - self._read_at >= COUNTER_MAX_AGE:
            self._pending = asyncio.ensure_future(read())
        task = self._pending
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=COUNTER_WAIT)
        if not done or self._pending is not task:
            return
        self._pending, self._read_at = None, time.monotonic()
        try:
            values = task.result()
        except Exception as exc:  # noqa: BLE001 (a scrape must not fail because nft did)
            log.warning("event=kernel_counters_unreadable error=%s", exc)
            return
        if values:
            self.values = values

    def collect(self) -> Iterator[Metric]:
        packets = CounterMetricFamily("walled_garden_kernel_packets", "Packets counted by the table's named "
                                      "nftables counters (redirected: first packet of each connection sent to "
                                      "the portal; refused_tcp/refused_other: packets refused in the garden "
                                      "chain)", labels=["counter"])
        octets = CounterMetricFamily("walled_garden_kernel_bytes", "Bytes counted by the table's named "
                                     "nftables counters", labels=["counter"])
        for name, (count, size) in sorted(self.values.items()):
            packets.add_metric([name], count)
            octets.add_metric([name], size)
        yield packets
        yield octets


class _FleetSeries(Collector):
    """Yields nothing; in a fleet (``constant_labels`` has ``gateway``) it has the fleet
    counters' series created (``Metrics.expect_fleet``) before they are collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        if "gateway" in self.metrics.constant_labels:
            self.metrics.expect_fleet()
        return iter(())


class DeltaHistogram(Collector):
    """A histogram another process observes: it sends per-bucket deltas, this sums them.

    ``add`` takes non-cumulative bucket counts (one per upper bound, then +Inf), their sum and
    count, as ``dns_garden.stats.Stats.drain`` gives them. The bounds come with the data, so a
    child of another version cannot mislabel buckets: new bounds start the sums again (a reset,
    as a restarted process's histogram would).
    """

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.bounds: tuple[float, ...] = ()
        self.buckets: list[int] = [0]
        self.sum = 0.0

    def add(self, bounds: tuple[float, ...], buckets: list[int], total: float, count: int) -> None:
        if len(buckets) != len(bounds) + 1 or any(n < 0 for n in buckets) or sum(buckets) != count:
            raise ValueError(f"{self.name}: {len(buckets)} buckets with counts {buckets} do not fit "
                             f"{len(bounds)} bounds and count {count}")
        if tuple(bounds) != self.bounds:
            self.bounds, self.buckets, self.sum = tuple(bounds), [0] * (len(bounds) + 1), 0.0
        for i, n in enumerate(buckets):
            self.buckets[i] += n
        self.sum += total

    def collect(self) -> Iterator[Metric]:
        cumulative, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.buckets, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


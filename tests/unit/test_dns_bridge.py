"""The daemon's side of the DNS forwarder: the child's stats lines become metrics promtool accepts."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from typing import Any

import pytest
from prometheus_client import generate_latest

from enforcer.dns_garden.bridge import ForwarderBridge
from enforcer.dns_garden.settings import ForwarderSettings
from enforcer.dns_garden.stats import LATENCY_BUCKETS, Stats
from enforcer.metrics import Metrics
from required import tool

SETTINGS = ForwarderSettings(table="wg_test", port=5300, resolvers=(("198.51.100.53", 53),), max_addresses=500)


def value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def child_stats() -> dict[str, Any]:
    """What a child's ``Stats.drain()`` sends after some traffic (the real class, over JSON)."""
    stats = Stats()
    stats.count("queries", ("udp", "forwarded"), by=5)
    stats.count("queries", ("tcp", "rate_limited"))
    stats.count("garden_answers", by=2)
    stats.count("garden_addresses_added", ("ipv4",), by=3)
    stats.count("garden_set_full", ("ipv6",))
    stats.count("upstream_failures", ("198.51.100.53:53", "timeout"))
    stats.count("kernel_failures")
    stats.count("admit_timeouts")
    stats.count("upstream_answers_dropped", ("198.51.100.53:53",))
    stats.gauge("garden_addresses", ("ipv4",), 3)
    stats.gauge("garden_capacity", (), 499)
    for seconds in (0.00005, 0.0004, 0.0004, 3.0):
        stats.observe_added(seconds)
    wire: dict[str, Any] = json.loads(json.dumps(stats.drain()))
    return wire


def test_stats_become_metrics() -> None:
    metrics = Metrics()
    bridge = ForwarderBridge(SETTINGS, metrics)
    assert value(metrics, "walled_garden_dns_garden_capacity") == 500
    assert value(metrics, "walled_garden_dns_forwarder_up") == 0
    bridge.apply_stats(child_stats())
    bridge.apply_stats(child_stats())       # deltas add up
    assert value(metrics, "walled_garden_dns_queries_total", {"transport": "udp", "result": "forwarded"}) == 10
    assert value(metrics, "walled_garden_dns_queries_total", {"transport": "tcp", "result": "rate_limited"}) == 2
    assert value(metrics, "walled_garden_dns_garden_answers_total") == 4
    assert value(metrics, "walled_garden_dns_garden_addresses_added_total", {"family": "ipv4"}) == 6
    assert value(metrics, "walled_garden_dns_garden_set_full_total", {"family": "ipv6"}) == 2
    assert value(metrics, "walled_garden_dns_upstream_failures_total",
                 {"resolver": "198.51.100.53:53", "reason": "timeout"}) == 2
    assert value(metrics, "walled_garden_dns_kernel_failures_total") == 2
    assert value(metrics, "walled_garden_dns_forwarder_events_total", {"event": "admit_timeouts"}) == 2
    assert value(metrics, "walled_garden_dns_forwarder_events_total", {"event": "upstream_answers_dropped"}) == 2
    assert value(metrics, "walled_garden_dns_garden_addresses", {"family": "ipv4"}) == 3   # a gauge is set, not added
    assert value(metrics, "walled_garden_dns_garden_capacity") == 499
    hist = "walled_garden_dns_added_seconds"
    assert value(metrics, f"{hist}_count") == 8
    assert value(metrics, f"{hist}_sum") == pytest.approx(2 * 3.00085)
    assert value(metrics, f"{hist}_bucket", {"le": "0.0001"}) == 2
    assert value(metrics, f"{hist}_bucket", {"le": "0.0005"}) == 6      # cumulative
    assert value(metrics, f"{hist}_bucket", {"le": "2.5"}) == 6
    assert value(metrics, f"{hist}_bucket", {"le": "+Inf"}) == 8
    assert len(LATENCY_BUCKETS) + 1 == len([s for s in metrics.dns_added.collect().__next__().samples
                                            if s.name.endswith("_bucket")])


def test_promtool_accepts_the_dns_metrics() -> None:
    promtool = tool("promtool", "prometheus")
    metrics = Metrics()
    ForwarderBridge(SETTINGS, metrics).apply_stats(child_stats())
    text = generate_latest(metrics.registry).decode()
    assert "walled_garden_dns_added_seconds_bucket" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def test_promtool_accepts_the_empty_histogram_before_any_stats() -> None:
    promtool = tool("promtool", "prometheus")
    text = generate_latest(Metrics().registry).decode()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_unknown_names_are_logged_once_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    bridge = ForwarderBridge(SETTINGS, metrics)
    wire = {"counts": [["brand_new", [], 1], ["queries", ["udp"], 1]], "gauges": [["other", [], 1.0]],
            "added": {"buckets": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0, "count": 0}}
    with caplog.at_level(logging.WARNING, "walled_garden.dns"):
        bridge.apply_stats(wire)
        bridge.apply_stats(wire)
    unknown = [r.getMessage() for r in caplog.records if "dns_forwarder_unknown_stat" in r.getMessage()]
    assert len(unknown) == 3 and any("name=queries labels=1" in m for m in unknown)   # wrong arity: refused too
    assert value(metrics, "walled_garden_dns_queries_total", {"transport": "udp", "result": "forwarded"}) == 0


def test_a_histogram_that_does_not_fit_its_bounds_is_refused() -> None:
    metrics = Metrics()
    bridge = ForwarderBridge(SETTINGS, metrics)
    with pytest.raises(ValueError, match="buckets"):
        bridge.apply_stats({"added": {"buckets": [1, 2], "sum": 1.0, "count": 3}})
    with pytest.raises(ValueError, match="buckets"):   # counts that do not add up to count
        bridge.apply_stats({"added": {"buckets": [1] + [0] * len(LATENCY_BUCKETS), "sum": 1.0, "count": 2}})
    assert value(metrics, "walled_garden_dns_added_seconds_count") == 0


async def test_lines_from_the_child_ready_stats_and_garbage() -> None:
    metrics = Metrics()
    bridge = ForwarderBridge(SETTINGS, metrics)
    reader = asyncio.StreamReader()
    stats = {"counts": [["garden_answers", [], 7]], "gauges": [], "added": {"buckets": [], "sum": 0, "count": 0}}
    for line in (b'{"ready": true}\n', b"not json\n", b"[1, 2]\n", b'{"stats": 5}\n',
                 json.dumps({"stats": stats}).encode() + b"\n"):
        reader.feed_data(line)
    reader.feed_eof()
    await asyncio.wait_for(bridge._serve(reader), 5)
    assert bridge.ready.is_set()
    assert value(metrics, "walled_garden_dns_forwarder_up") == 1
    assert value(metrics, "walled_garden_dns_garden_answers_total") == 7   # garbage before it did not stop reading
    status = bridge.status()
    assert status["running"] is False and status["restarts"] == 0 and status["pid"] is None

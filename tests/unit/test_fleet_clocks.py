"""Each fleet gateway's clock offset against NATS (``enforcer.fleet.clocks``), estimated without
trusting the clock in doubt: another gateway's from the inputs it accepted (``at`` minus the stored
stamp), this gateway's own from inputs it receives live (its clock minus the stored stamp).

Found by an audit: a gateway whose clock runs ahead of the accepting gateway's by more than a
payment grace ends that grace as soon as it applies it; nothing showed the skew before a paid
customer was walled. The estimate must show it, and must not cry wolf on a catch-up (inputs stored
long ago are no measure of this gateway's clock) or on one delayed sample."""

from __future__ import annotations

import datetime
import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest

from enforcer.fleet import clocks as clocks_module
from enforcer.fleet.applier import Applier
from enforcer.fleet.clocks import MAX_ORIGINS, WARN_EVERY, WINDOW, ClockOffsets
from enforcer.fleet.messages import Message
from enforcer.metric_labels import Labelled
from enforcer.metrics import Metrics
from enforcer.outcome import Outcome
from tests.required import tool

ROOT = Path(__file__).resolve().parents[2]
NATS = 1_700_000_000.0   # the clock NATS stamps with, in these tests


class Mono:
    """The monotonic clock the estimates' windows and warnings run on."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def offsets(gateway: str = "gw-a") -> tuple[ClockOffsets, Metrics, Mono]:
    metrics, mono = Metrics(), Mono()
    return ClockOffsets(gateway, metrics, mono), metrics, mono


def gauge(metrics: Metrics, origin: str) -> float | None:
    return metrics.registry.get_sample_value("walled_garden_fleet_clock_offset_seconds", {"origin": origin})


# --- the two measures --------------------------------------------------------------------------

def test_an_origins_offset_is_its_instant_less_the_stored_stamp_whenever_applied() -> None:
    clocks, metrics, mono = offsets()
    clocks.accepted("gw-b", NATS + 62.0, NATS + 0.004)   # gw-b 62 s ahead, published in 4 ms
    assert gauge(metrics, "gw-b") == pytest.approx(61.996)
    mono.now += 3 * 3600   # a catch-up hours later reads the same: both instants are from then
    clocks.accepted("gw-c", NATS - 45.0, NATS)
    assert gauge(metrics, "gw-c") == -45.0
    assert clocks.view() == {"gw-b": {"offset_seconds": 62.0, "measured_seconds_ago": 10800},
                             "gw-c": {"offset_seconds": -45.0, "measured_seconds_ago": 0}}


def test_this_gateways_own_inputs_measure_it_only_when_they_come_back_live() -> None:
    """Its own ``at`` minus the stamp is biased down by the publish, the live measure up by the
    delivery: the two are not mixed in one estimate (the least delayed of each is not the other's)."""
    clocks, metrics, _ = offsets("gw-a")
    clocks.accepted("gw-a", NATS + 40.0, NATS)
    assert gauge(metrics, "gw-a") is None
    clocks.live(NATS + 40.01, NATS)
    assert gauge(metrics, "gw-a") == pytest.approx(40.01)


# --- robust against delays, quick to follow a step ---------------------------------------------

def test_the_least_delayed_sample_of_the_minute_counts() -> None:
    """A slow publish reads an origin as further behind, a delivery held up reads this gateway as
    further ahead: within the window the least delayed sample stands for both."""
    clocks, metrics, mono = offsets("gw-a")
    clocks.accepted("gw-b", NATS + 0.0, NATS + 0.003)
    clocks.live(NATS + 0.005, NATS)
    mono.now += 5
    clocks.accepted("gw-b", NATS + 10.0, NATS + 10.0 + 8.0)   # published across an 8 s NATS election
    clocks.live(NATS + 20.0 + 40.0, NATS + 20.0)              # held 40 s by a stalled consumer
    assert gauge(metrics, "gw-b") == pytest.approx(-0.003, abs=1e-4)
    assert gauge(metrics, "gw-a") == pytest.approx(0.005, abs=1e-4)
    mono.now += WINDOW   # a new window: the last one still counts
    clocks.live(NATS + 100.0 + 35.0, NATS + 100.0)
    assert gauge(metrics, "gw-a") == pytest.approx(0.005, abs=1e-4)


def test_a_clock_step_shows_within_two_windows() -> None:
    clocks, metrics, mono = offsets("gw-a")
    clocks.live(NATS + 0.01, NATS)
    for second in range(1, int(2 * WINDOW) + 2):   # an input a second, the clock 90 s ahead from now on
        mono.now += 1
        clocks.live(NATS + second + 90.0, NATS + second)
    assert gauge(metrics, "gw-a") == pytest.approx(90.0)


def test_a_lone_sample_after_a_quiet_spell_is_the_estimate() -> None:
    clocks, metrics, mono = offsets()
    clocks.accepted("gw-b", NATS + 1.0, NATS)
    mono.now += 10 * WINDOW
    clocks.accepted("gw-b", NATS + 50.0, NATS)
    assert gauge(metrics, "gw-b") == 50.0, "a window long gone says nothing of the clock now"


def test_a_catch_up_leaves_the_newest_instant_of_each_origin_not_the_minutes_best() -> None:
    """Replayed in one go, a history in which gw-b's clock ran 70 s ahead and was then fixed must
    not keep showing 70 s: the stream's order is time's, so the last replayed input stands."""
    clocks, metrics, mono = offsets()
    for n in range(5):
        clocks.accepted("gw-b", NATS + n + 70.0, NATS + n, replayed=True)
    for n in range(5, 10):
        clocks.accepted("gw-b", NATS + n + 0.2, NATS + n, replayed=True)
    assert gauge(metrics, "gw-b") == pytest.approx(0.2)
    mono.now += 1
    clocks.accepted("gw-b", NATS + 20.0 - 3.0, NATS + 20.0)   # live again: joins the minute's samples
    assert gauge(metrics, "gw-b") == pytest.approx(0.2)


# --- bounded, and loud once in a while ---------------------------------------------------------

def test_origins_are_bounded_and_those_gone_from_the_fleet_are_dropped() -> None:
    clocks, metrics, mono = offsets("gw-a")
    clocks.live(NATS, NATS)
    for n in range(MAX_ORIGINS + 10):   # names anyone with publish rights could write
        mono.now += 1
        clocks.accepted(f"forged-{n}", NATS, NATS)
    assert len(clocks.estimates) == MAX_ORIGINS
    text = generate_latest(metrics.registry).decode()
    assert text.count("walled_garden_fleet_clock_offset_seconds{") == MAX_ORIGINS
    assert gauge(metrics, "gw-a") == 0.0, "this gateway's own is never crowded out"
    assert gauge(metrics, "forged-0") is None and gauge(metrics, f"forged-{MAX_ORIGINS + 9}") == 0.0
    clocks.retain(["gw-b", f"forged-{MAX_ORIGINS + 9}"])   # the gateways with a heartbeat key
    assert set(clocks.estimates) == {"gw-a", f"forged-{MAX_ORIGINS + 9}"}, "this gateway is always kept"
    assert text.count("walled_garden_fleet_clock_offset_seconds{") > \
        generate_latest(metrics.registry).decode().count("walled_garden_fleet_clock_offset_seconds{") == 2


def test_a_skew_is_warned_about_at_most_once_per_interval_and_its_end_told(
        caplog: pytest.LogCaptureFixture) -> None:
    clocks, _, mono = offsets("gw-a")
    caplog.set_level(logging.INFO, "walled_garden.enforcer")

    def told(event: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if f"event={event} " in r.getMessage()]
    clocks.accepted("gw-b", NATS + 29.0, NATS)
    assert not told("fleet_clock_skew")
    for _ in range(100):
        mono.now += 2 * WINDOW
        clocks.accepted("gw-b", NATS - 31.0, NATS)
        clocks.live(NATS + 45.0, NATS)
        if mono.now > 100 + 2 * WARN_EVERY:
            break
    skews = told("fleet_clock_skew")
    assert len(skews) == 6, skews   # each origin at once, then once per WARN_EVERY
    assert "origin=gw-b offset=-31.0s (gateway gw-b's clock is 31 s behind the fleet's NATS" in skews[0]
    assert "origin=gw-a offset=+45.0s (this gateway's clock is 45 s ahead of the fleet's NATS" in skews[1]
    mono.now += 2 * WINDOW
    clocks.accepted("gw-b", NATS + 0.5, NATS)
    assert told("fleet_clock_offset_ok") == ["event=fleet_clock_offset_ok origin=gw-b offset=+0.5s"]


# --- what the applier feeds it -----------------------------------------------------------------

class Store:
    def get_meta(self, key: str) -> Any:
        return None


def applier(gateway: str = "gw-a") -> Applier:
    link = SimpleNamespace(config=SimpleNamespace(gateway=gateway))
    never: Any = None   # nothing is started here: ``_live`` and ``_advance`` are called directly
    return Applier(link, Store(), never, Metrics(), lambda: NATS + 30.0)  # type: ignore[arg-type]


def delivered(seq: int, stored: float | None = NATS, pending: int = 0, delivered: int = 1,
              message: Message | None = None) -> Any:
    """A JetStream delivery as nats-py's ``Msg.metadata`` describes it (its ``timestamp``: when
    the stream stored the message, by the stream leader's clock)."""
    stamp = None if stored is None else datetime.datetime.fromtimestamp(stored, datetime.UTC)
    metadata = SimpleNamespace(timestamp=stamp, sequence=SimpleNamespace(stream=seq), num_pending=pending,
                               num_delivered=delivered)
    return SimpleNamespace(seq=seq, message=message, msg=SimpleNamespace(metadata=metadata))


def own(a: Applier) -> float | None:
    view = a.clocks.view()
    return view["gw-a"]["offset_seconds"] if "gw-a" in view else None


@pytest.mark.parametrize(("why", "seq", "kw"), [
    ("stored before this connection began: a catch-up", 5, {}),
    ("not the next to apply: something before it is not applied yet", 12, {}),
    ("NATS had more after it to send: a backlog", 11, {"pending": 3}),
    ("sent again: it waited ack_wait first", 11, {"delivered": 2}),
    ("no stored stamp", 11, {"stored": None}),
])
def test_only_a_live_delivery_measures_this_gateway(why: str, seq: int, kw: dict[str, Any]) -> None:
    a = applier()
    a.applied, a.target = 10, 10
    a._live(delivered(seq, **kw).msg, NATS + 30.0)
    assert own(a) is None, why


def test_a_live_delivery_measures_this_gateway() -> None:
    a = applier()
    a.applied, a.target = 10, 10
    a._live(delivered(11).msg, NATS + 30.02)
    assert own(a) == 30.0


def test_each_applied_input_measures_the_gateway_that_accepted_it() -> None:
    a = applier()
    a.target = 3   # 1-3 are a catch-up: each replaces the estimate
    for seq, origin, at in ((1, "gw-b", NATS + 50.0), (2, "gw-a", NATS + 9.0), (3, "gw-b", NATS - 50.0),
                            (4, "gw-c", NATS + 0.2)):
        a._advance(delivered(seq, message=Message("acknowledge", origin, at, {})), Outcome({}))
    a._advance(delivered(5), Outcome({}))   # malformed: no instant to read
    assert {k: v["offset_seconds"] for k, v in a.clocks.view().items()} == {"gw-b": -50.0, "gw-c": 0.2}
    a._advance(delivered(6, message=Message("acknowledge", "gw-b", NATS - 60.0, {})), Outcome({}))
    assert a.clocks.view()["gw-b"]["offset_seconds"] == -50.0, "live: the least delayed of the minute"


# --- the exposition ----------------------------------------------------------------------------

def test_promtool_accepts_the_metric_with_the_fleet_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clocks_module, "log", logging.getLogger("test.quiet"))
    clocks, metrics, _ = offsets("bng-1")
    clocks.live(NATS + 62.0, NATS)
    clocks.accepted("bng-2", NATS - 0.5, NATS)
    text = generate_latest(Labelled(metrics.registry, {"gateway": "bng-1"})).decode()
    assert 'walled_garden_fleet_clock_offset_seconds{gateway="bng-1",origin="bng-1"} 62.0' in text
    result = subprocess.run([tool("promtool", "prometheus"), "check", "metrics"], input=text, capture_output=True,
                            text=True, check=False, timeout=30)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_promtool_fires_the_clock_skew_alert_on_the_gateway_whose_clock_is_off() -> None:
    """config/prometheus-alerts.yaml's WalledGardenFleetClockSkew, on the series above (its promtool
    test file: tests/unit/data/prometheus-alerts-clock.test.yaml)."""
    result = subprocess.run([tool("promtool", "prometheus"), "test", "rules", "prometheus-alerts-clock.test.yaml"],
                            cwd=ROOT / "tests" / "unit" / "data", capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr

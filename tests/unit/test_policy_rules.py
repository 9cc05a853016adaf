"""The policy rules: exemptions, enforcement windows, escalation, promises — pure, with a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import policy
from enforcer.exemptions import CATEGORIES, Exemption
from enforcer.model import EscalationStep, Mode
from enforcer.policy import Decision, Grace, Origin, Override, PolicyInputs, Rules, decide
from enforcer.promises import Promise
from enforcer.subscribers import Subscriber, parse_address
from enforcer.windows import Windows

DAY = 86400.0
# Monday 2026-11-23 10:00 UTC; windows below are Mon-Fri 08:00-17:00 UTC
MONDAY_10 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC).timestamp()
OFFICE = Windows(zone="UTC", days=frozenset(range(5)), hours=((8 * 60, 17 * 60),), configured=True)


def sub(sid: str = "C-1", mode: Mode = Mode.WALLED_GARDEN, reason: str = "overdue", **kw) -> Subscriber:
    return Subscriber(sid, (parse_address("100.64.0.10"),), mode, reason, **kw)


def at(day: int, hour: float) -> float:
    """Unix time for 2026-11-(23+day) at ``hour`` UTC (day 0 = Monday)."""
    return MONDAY_10 - 10 * 3600 + day * DAY + hour * 3600


# -- enforcement windows --------------------------------------------------------------------

def test_window_open_and_next_open() -> None:
    assert OFFICE.is_open(at(0, 10))
    assert not OFFICE.is_open(at(0, 17))            # end is exclusive
    assert OFFICE.next_open(at(0, 18)) == at(1, 8)  # Monday evening → Tuesday 08:00
    assert OFFICE.next_open(at(4, 18)) == at(7, 8)  # Friday evening → Monday 08:00
    assert OFFICE.next_open(at(0, 9)) == at(0, 9)   # open now


def test_holidays_skip_days() -> None:
    holiday = datetime(2026, 11, 24, tzinfo=UTC).date()  # Tuesday
    windows = Windows("UTC", OFFICE.days, OFFICE.hours, frozenset({holiday}), True)
    assert not windows.is_open(at(1, 10))
    assert windows.next_open(at(0, 18)) == at(2, 8)


def test_window_time_zone_and_dst() -> None:
    prague = Windows("Europe/Prague", frozenset(range(7)), ((8 * 60, 9 * 60),), configured=True)
    # 2026-03-29: CET → CEST; 08:00 local is 06:00 UTC that day, 07:00 UTC the day before
    before = datetime(2026, 3, 28, 7, 30, tzinfo=UTC).timestamp()
    after = datetime(2026, 3, 29, 6, 30, tzinfo=UTC).timestamp()
    assert prague.is_open(before) and prague.is_open(after)
    assert prague.next_open(datetime(2026, 3, 28, 12, tzinfo=UTC).timestamp()) == \
        datetime(2026, 3, 29, 6, tzinfo=UTC).timestamp()


def test_new_restriction_waits_for_the_window_then_applies() -> None:
    rules = Rules(windows=OFFICE)
    evening = at(0, 20)
    held = decide("C-1", sub(), None, None, evening, rules=rules, enforced=None)
    assert held.mode is Mode.FREE and held.pending is Mode.WALLED_GARDEN
    assert held.until == at(1, 8) and "waits for the enforcement window" in held.cause
    applied = decide("C-1", sub(), None, None, at(1, 8), rules=rules, enforced=held)
    assert applied.mode is Mode.WALLED_GARDEN and applied.pending is None


def test_already_restricted_stays_restricted_outside_windows() -> None:
    rules = Rules(windows=OFFICE)
    enforced = Decision("C-1", Mode.WALLED_GARDEN, "on the restricted list", sub())
    assert decide("C-1", sub(), None, None, at(5, 3), rules=rules, enforced=enforced).mode is Mode.WALLED_GARDEN


def test_stricter_mode_waits_lighter_does_not() -> None:
    rules = Rules(windows=OFFICE)
    notice = Decision("C-1", Mode.NOTICE, "list", sub(mode=Mode.NOTICE))
    d = decide("C-1", sub(mode=Mode.WALLED_GARDEN), None, None, at(6, 12), rules=rules, enforced=notice)
    assert d.mode is Mode.NOTICE and d.pending is Mode.WALLED_GARDEN
    garden = Decision("C-1", Mode.WALLED_GARDEN, "list", sub())
    d = decide("C-1", sub(mode=Mode.NOTICE), None, None, at(6, 12), rules=rules, enforced=garden)
    assert d.mode is Mode.NOTICE and d.pending is None


def test_operator_restriction_does_not_wait() -> None:
    rules = Rules(windows=OFFICE)
    ordered = Override(True, at(6, 11), "operator alice: abuse report", sub(), Origin.OPERATOR)
    assert decide("C-1", None, ordered, None, at(6, 12), rules=rules).mode is Mode.WALLED_GARDEN


# -- escalation -----------------------------------------------------------------------------

LADDER = Rules(escalation=(EscalationStep(7 * DAY, Mode.THROTTLE), EscalationStep(14 * DAY, Mode.WALLED_GARDEN)))


def test_escalation_ladder() -> None:
    since = MONDAY_10
    listed = sub(mode=Mode.NOTICE)
    d = decide("C-1", listed, None, None, since + DAY, listed_since=since, rules=LADDER)
    assert d.mode is Mode.NOTICE and d.until == since + 7 * DAY
    d = decide("C-1", listed, None, None, since + 7 * DAY, listed_since=since, rules=LADDER)
    assert d.mode is Mode.THROTTLE and d.subscriber is not None and d.subscriber.mode is Mode.THROTTLE
    assert d.until == since + 14 * DAY and "escalated to throttle" in d.cause
    d = decide("C-1", listed, None, None, since + 15 * DAY, listed_since=since, rules=LADDER)
    assert d.mode is Mode.WALLED_GARDEN and d.until is None


def test_escalation_never_lightens_a_list_mode() -> None:
    d = decide("C-1", sub(mode=Mode.WALLED_GARDEN), None, None, MONDAY_10 + 8 * DAY, listed_since=MONDAY_10,
               rules=LADDER)
    assert d.mode is Mode.WALLED_GARDEN


def test_escalation_due_finds_only_subscribers_behind_their_step() -> None:
    inputs = PolicyInputs({"A": sub("A", Mode.NOTICE), "B": sub("B", Mode.NOTICE)}, {}, {}, rules=LADDER)
    inputs.listed_since = {"A": MONDAY_10 - 8 * DAY, "B": MONDAY_10 - DAY}
    enforced = {"A": Decision("A", Mode.NOTICE, "x", sub("A", Mode.NOTICE)),
                "B": Decision("B", Mode.NOTICE, "x", sub("B", Mode.NOTICE))}
    assert policy.escalation_due(inputs, MONDAY_10, enforced) == {"A"}


def test_apply_list_tracks_listed_since() -> None:
    inputs = PolicyInputs({}, {}, {})
    policy.apply_list(inputs, {"A": sub("A")}, now=100.0)
    policy.apply_list(inputs, {"A": sub("A"), "B": sub("B")}, now=200.0)
    assert inputs.listed_since == {"A": 100.0, "B": 200.0}
    policy.apply_list(inputs, {"B": sub("B")}, now=300.0)
    assert inputs.listed_since == {"B": 200.0}


# -- exemptions -----------------------------------------------------------------------------

def test_exemption_frees_until_expiry_then_reevaluates() -> None:
    inputs = PolicyInputs({"C-1": sub()}, {}, {})
    policy.record_exemption(inputs, "C-1", Exemption("vulnerable", MONDAY_10 + DAY, "oxygen concentrator",
                                                     "operator alice", MONDAY_10))
    d = inputs.decide("C-1", MONDAY_10)
    assert d.mode is Mode.FREE and d.until == MONDAY_10 + DAY and "vulnerable household" in d.cause
    assert inputs.next_change(MONDAY_10) == MONDAY_10 + DAY
    assert policy.expire(inputs, MONDAY_10 + DAY) == {"C-1"}
    assert inputs.decide("C-1", MONDAY_10 + DAY).mode is Mode.WALLED_GARDEN


def test_list_exemption() -> None:
    listed = sub(exempt_until=MONDAY_10 + DAY, exempt_category="arrangement")
    assert decide("C-1", listed, None, None, MONDAY_10).mode is Mode.FREE
    assert decide("C-1", listed, None, None, MONDAY_10 + DAY).mode is Mode.WALLED_GARDEN
    inputs = PolicyInputs({"C-1": listed}, {}, {})
    assert inputs.next_change(MONDAY_10) == MONDAY_10 + DAY


def test_operator_restriction_after_exemption_wins_billing_does_not() -> None:
    ex = [Exemption("dispute", MONDAY_10 + DAY, "", "event e1", MONDAY_10)]
    billing = Override(True, MONDAY_10 + 60, "event e2 (subscriber.restricted)", sub())
    assert decide("C-1", None, billing, None, MONDAY_10 + 120, exemptions=ex).mode is Mode.FREE
    person = Override(True, MONDAY_10 + 60, "operator bob: fraud", sub(), Origin.OPERATOR)
    assert decide("C-1", None, person, None, MONDAY_10 + 120, exemptions=ex).mode is Mode.WALLED_GARDEN


def test_clear_exemption_by_category() -> None:
    inputs = PolicyInputs({"C-1": sub()}, {}, {})
    for category in ("dispute", "outage"):
        policy.record_exemption(inputs, "C-1", Exemption(category, MONDAY_10 + DAY, "", "x", MONDAY_10))
    policy.clear_exemption(inputs, "C-1", "dispute")
    assert inputs.decide("C-1", MONDAY_10).mode is Mode.FREE     # the outage still holds
    policy.clear_exemption(inputs, "C-1", "outage")
    assert inputs.decide("C-1", MONDAY_10).mode is Mode.WALLED_GARDEN
    assert "C-1" not in inputs.exemptions


# -- promises -------------------------------------------------------------------------------

def test_promise_frees_until_term_and_lapses() -> None:
    inputs = PolicyInputs({"C-1": sub()}, {}, {})
    policy.record_promise(inputs, Promise("C-1", MONDAY_10, MONDAY_10 + 3 * DAY))
    assert inputs.decide("C-1", MONDAY_10 + DAY).mode is Mode.FREE
    assert inputs.next_change(MONDAY_10) == MONDAY_10 + 3 * DAY
    assert policy.expire(inputs, MONDAY_10 + 3 * DAY) == {"C-1"}
    assert inputs.promises["C-1"][-1].outcome == "lapsed"
    assert inputs.decide("C-1", MONDAY_10 + 3 * DAY).mode is Mode.WALLED_GARDEN


def test_payment_keeps_a_promise() -> None:
    inputs = PolicyInputs({"C-1": sub()}, {}, {})
    policy.record_promise(inputs, Promise("C-1", MONDAY_10, MONDAY_10 + 3 * DAY))
    policy.record_payment(inputs, "C-1", MONDAY_10 + DAY, 3 * DAY, "event p1")
    assert inputs.promises["C-1"][-1].outcome == "kept"


# -- properties -----------------------------------------------------------------------------

modes = st.sampled_from([Mode.NOTICE, Mode.THROTTLE, Mode.WALLED_GARDEN])
times = st.floats(min_value=MONDAY_10 - 30 * DAY, max_value=MONDAY_10 + 30 * DAY, allow_nan=False)
enforced_modes = st.sampled_from(list(Mode))


@st.composite
def situations(draw: st.DrawFn) -> dict:
    now = draw(times)
    listed = sub(mode=draw(modes)) if draw(st.booleans()) else None
    override = None
    if draw(st.booleans()):
        restrict = draw(st.booleans())
        who = draw(st.sampled_from(["operator alice: x", "event e (subscriber.restricted)"]))
        override = Override(restrict, draw(times), who, sub(mode=draw(modes)) if restrict else None,
                            Origin.OPERATOR if who.startswith("operator") else Origin.BILLING)
    grace = None
    if draw(st.booleans()):
        paid = draw(times)
        grace = Grace(paid, paid + draw(st.floats(0, 5 * DAY)), "event p")
    exemptions = []
    if draw(st.booleans()):
        set_at = draw(times)
        exemptions.append(Exemption(draw(st.sampled_from(list(CATEGORIES))), set_at + draw(st.floats(1, 30 * DAY)),
                                    "", "x", set_at))
    enforced_mode = draw(enforced_modes)
    enforced = None if enforced_mode is Mode.FREE else Decision("C-1", enforced_mode, "before", sub(mode=enforced_mode))
    windows = OFFICE if draw(st.booleans()) else Windows.always()
    since = draw(st.none() | times)
    return dict(listed=listed, override=override, grace=grace, exemptions=exemptions, now=now, enforced=enforced,
                rules=Rules(windows=windows, escalation=LADDER.escalation if draw(st.booleans()) else ()),
                since=since)


def run(s: dict, **changes) -> Decision:
    s = {**s, **changes}
    return decide("C-1", s["listed"], s["override"], s["grace"], s["now"], exemptions=s["exemptions"],
                  listed_since=s["since"], rules=s["rules"], enforced=s["enforced"])


@settings(max_examples=400, deadline=None)
@given(situations())
def test_a_window_never_delays_a_lift(s: dict) -> None:
    """Whatever the windows, the result is never stricter than both the enforced mode and the
    result without windows: windows only hold back tightening."""
    with_windows = run(s)
    without = run(s, rules=Rules(escalation=s["rules"].escalation))
    enforced = s["enforced"].mode if s["enforced"] else Mode.FREE
    assert policy.SEVERITY[with_windows.mode] <= max(policy.SEVERITY[without.mode], policy.SEVERITY[enforced])
    if policy.SEVERITY[without.mode] <= policy.SEVERITY[enforced]:
        assert with_windows.mode is without.mode, "a lift or a lighter mode is applied at once"


@settings(max_examples=400, deadline=None)
@given(situations())
def test_an_active_exemption_always_wins_over_the_list(s: dict) -> None:
    override = s["override"]
    if override is not None and override.restrict and override.operator:
        return  # a person's later restriction is the one exception (tested above)
    if any(e.active(s["now"]) for e in s["exemptions"]):
        assert run(s).mode is Mode.FREE


@settings(max_examples=300, deadline=None)
@given(situations(), st.floats(1, 10 * DAY))
def test_exemption_expiry_happens_at_its_instant(s: dict, length: float) -> None:
    exemption = Exemption("vulnerable", s["now"] + length, "", "x", s["now"] - 1)
    listed = sub()
    inputs = PolicyInputs({"C-1": listed}, {}, {}, rules=Rules())
    policy.record_exemption(inputs, "C-1", exemption)
    assert inputs.decide("C-1", exemption.until - 0.001).mode is Mode.FREE
    assert inputs.next_change(s["now"]) == exemption.until
    assert "C-1" in policy.expire(inputs, exemption.until)
    assert inputs.decide("C-1", exemption.until).mode is Mode.WALLED_GARDEN


@settings(max_examples=300, deadline=None)
@given(situations())
def test_decision_until_is_in_the_future(s: dict) -> None:
    d = run(s)
    if d.until is not None:
        assert d.until > s["now"]


@pytest.mark.parametrize("step_days", [7, 14])
def test_escalation_instant_is_exact(step_days: int) -> None:
    listed = sub(mode=Mode.NOTICE)
    before = decide("C-1", listed, None, None, MONDAY_10 + step_days * DAY - 0.001, listed_since=MONDAY_10,
                    rules=LADDER)
    on = decide("C-1", listed, None, None, MONDAY_10 + step_days * DAY, listed_since=MONDAY_10, rules=LADDER)
    assert policy.SEVERITY[on.mode] > policy.SEVERITY[before.mode]
